"""Device mesh, logical axis rules, and sharded initialization."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import base
from modeling.layers import mesh_axes

MESH_AXES = ("data", "expert", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves one -1 to 'the rest of the devices' and checks the product."""
  sizes = [mesh_cfg.get(a, 1) for a in MESH_AXES]  # a mesh saved before an axis existed: 1
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh={dict(zip(MESH_AXES, sizes, strict=True))}: at most one size may be -1")
  for axis, size in zip(MESH_AXES, sizes, strict=True):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}={size}: must be a positive size or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"mesh={dict(zip(MESH_AXES, sizes, strict=True))}: {num_devices} devices do not divide by {known}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh={dict(zip(MESH_AXES, sizes, strict=True))}: product {int(np.prod(sizes))} "
      f"must equal the device count {num_devices}"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules(config: ml_collections.ConfigDict) -> tuple:
  return tuple((name, axes) for name, axes in config.logical_axis_rules)


def validate_mesh(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Checks the mesh against the devices, the model and the batch; compiles nothing.

  Returns the resolved (data, expert, fsdp, tensor) sizes. Errors name the key and the value.
  """
  for name, axes in config.logical_axis_rules:
    for axis in mesh_axes(axes):
      if axis not in MESH_AXES:
        raise ValueError(
          f"logical_axis_rules[{name!r}]={axes!r}: {axis!r} is not a mesh axis; allowed {MESH_AXES}"
        )
  shape = mesh_shape(config.mesh, num_devices)
  sizes = dict(zip(MESH_AXES, shape, strict=True))
  m, t = config.model, config.train
  for key in ("num_heads", "num_kv_heads"):
    if m[key] % sizes["tensor"]:
      raise ValueError(
        f"mesh.tensor={sizes['tensor']}: must divide model.{key}={m[key]} "
        "(heads are split over the tensor axis)"
      )
  experts = m.moe.num_experts
  if experts and experts % sizes["expert"]:
    raise ValueError(
      f"mesh.expert={sizes['expert']}: must divide model.moe.num_experts={experts} "
      "(the experts are split over the expert axis)"
    )
  if experts and sizes["expert"] > 1 and m.moe.impl == "ragged" and m.quant != "none":
    raise ValueError(
      f"model.quant={m.quant!r}: the expert-parallel dispatch (mesh.expert={sizes['expert']}, "
      "model.moe.impl='ragged') runs jax.lax.ragged_dot, which takes no quantizer; use "
      "model.moe.impl='dense' on this mesh"
    )
  batch_axes = dict(config.logical_axis_rules).get("act_batch")
  dp = int(np.prod([sizes[a] for a in mesh_axes(batch_axes)]))
  axes = mesh_axes(batch_axes)
  eval_rows = t.eval_batch_size or t.batch_size
  for key, value, rows, per in (
    (
      "train.batch_size",
      t.batch_size,
      t.batch_size // t.grad_accum,
      f" / grad_accum={t.grad_accum}",
    ),
    ("train.eval_batch_size", t.eval_batch_size, eval_rows, f" ({eval_rows} rows)"),
  ):
    if rows % dp:
      raise ValueError(
        f"{key}={value}{per}: must be divisible by the data-parallel size {dp} "
        f"(act_batch is split over {axes}; mesh {sizes})"
      )
  return shape


def is_default_mesh(mesh_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the mesh is configs/base.py's default (FSDP over all devices), set by no flag."""
  default = base.get_config().mesh
  return all(mesh_cfg.get(a, 1) == default[a] for a in MESH_AXES)


def fitted_specs(abstract_boxed, mesh: Mesh, axis_rules: tuple, strict: bool = True):
  """(logical PartitionSpecs of a boxed tree, the arrays kept whole), each dimension checked
  against its mesh axes.

  A dimension that does not split evenly raises, naming the array (`strict`: a mesh other
  than the default), or else is kept whole on every device (the default mesh spans however
  many devices there are, whose count a small model's width need not divide).
  """
  logical = nn.get_partition_spec(abstract_boxed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(
    logical, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  shapes = jax.tree.leaves(abstract_boxed)  # the boxes' values; unbox would add constraints
  lookup = dict(axis_rules)
  specs, whole = [], []
  for (path, spec), leaf in zip(flat, shapes, strict=True):
    names = list(spec)
    for i, (dim, name) in enumerate(zip(leaf.shape, spec, strict=False)):
      if name is None:
        continue
      axes = mesh_axes(lookup.get(name))
      parts = int(np.prod([mesh.shape[a] for a in axes]))
      if dim % parts == 0:
        continue
      where = f"{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}"
      if strict:
        raise ValueError(
          f"{where}: its {name!r} dimension ({dim}) does not split over mesh axes {axes} of "
          f"total size {parts}. Change the mesh (mesh.*) or the size, or map {name!r} "
          "elsewhere in logical_axis_rules."
        )
      names[i] = None
      whole.append(f"{where} ({name!r} {dim} over {parts})")
    specs.append(PartitionSpec(*names))
  return jax.tree_util.tree_unflatten(treedef, specs), whole


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the data-parallel axes, replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(("data", "expert", "fsdp")))


def to_global(local: dict, sharding: NamedSharding) -> dict:
  """This process's rows of a batch -> global arrays sharded like `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def sharded_init(init_fn: Callable, rng: jax.Array, shardings):
  """Runs the (boxed) init jitted straight into its shardings: nothing full-size is
  built on one device. Call inside the mesh and logical-axis-rules contexts."""
  return jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)


def jit_train_step(train_step: Callable, shardings, batch_sharding: NamedSharding) -> Callable:
  """The train step with explicit in/out shardings and the state donated."""
  return jax.jit(
    train_step,
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )


def state_shardings(abstract_boxed, mesh: Mesh, axis_rules: tuple, strict: bool = True):
  """Mesh shardings of a (boxed, abstract) state from its logical axis names; with `strict`
  off, a dimension that does not split is kept whole, said in one printed line."""
  specs, whole = fitted_specs(abstract_boxed, mesh, axis_rules, strict)
  if whole and jax.process_index() == 0:
    print(
      f"mesh {dict(mesh.shape)} (the default): {len(whole)} arrays keep a dimension whole "
      f"because it does not split over the devices, e.g. {whole[0]}; set mesh.* to choose",
      flush=True,
    )
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def bytes_per_device(tree) -> dict:
  """{device: bytes of `tree`'s arrays held there}, from the arrays' addressable shards."""
  held: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return held
