"""Device mesh, logical axis rules, and sharded initialization."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Resolves one -1 to 'the rest of the devices' and checks the product."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split over the data-parallel axes, replicated over tensor."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


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


def state_shardings(abstract_boxed, mesh: Mesh, axis_rules: tuple):
  """Mesh shardings of a (boxed, abstract) state from its logical axis names."""
  logical = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(logical, mesh, axis_rules)
