"""Compile the train step ahead of time for a TPU topology, on any machine.

  pip install -e '.[aot]'
  python -m launch.aot --config=configs/llama.py:size=1B --topology=v5e:2x4 \
      --config.mesh.data=1 --config.mesh.fsdp=-1

Prints the compiled memory per chip and XLA's FLOP count per step, compares them
with the chip's HBM and peak, and ends with the line `hbm_per_chip_gib=...`.
The mesh, batch and model come from the config, exactly as `train.main` reads them.
"""

from __future__ import annotations

import math
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from modeling.flops import flops_per_token
from train import console, families, sharding
from train.data import make_tokenizer
from train.optim import make_optimizer
from train.trainer import abstract_state, config_train_step
from train.validation import validate_config

# Published per-chip figures: HBM (GiB) and dense bfloat16 peak (TFLOP/s).
CHIPS = {
  "TPU v4": (32, 275),
  "TPU v5 lite": (16, 197),  # v5e
  "TPU v5": (95, 459),  # v5p
  "TPU v6 lite": (32, 918),  # v6e (Trillium)
}
GIB = 2**30


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology such as `v5e:2x4`, without a TPU (needs libtpu)."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server
  from jax.experimental import topologies

  dims = [int(d) for d in re.findall(r"\d+", topology.partition(":")[2])]
  kwargs = {}
  if dims and math.prod(dims) < 4:  # below one 4-chip host (v5e-1, v5e-2): a host of that size
    kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    return list(desc.devices)
  except Exception as e:  # libtpu missing, or a name it does not know
    raise ValueError(
      f"--topology={topology!r}: cannot build it ({type(e).__name__}: {e}). Names look like "
      "v5e:1x1, v5e:2x4, v4:2x2x2, v5p:2x2x1, v6e:2x2; install libtpu with pip install -e '.[aot]'"
    ) from e


def _lower(config: ml_collections.ConfigDict, devices: list):
  """(lowered train step, abstract state, model) for the config on these devices."""
  tokenizer = make_tokenizer(config.data.tokenizer)
  wiring = families.resolve(config)
  model, objective = wiring.build(config, tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.rules(config)
  tx = make_optimizer(config.train)
  abstract, shardings, _ = abstract_state(config, model, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {
    k: jax.ShapeDtypeStruct((config.train.batch_size, n), jnp.int32, sharding=batch_sh)
    for k, n in wiring.batch_lengths(config).items()
  }
  step = config_train_step(config, model, objective, tx)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    lowered = sharding.jit_train_step(step, shardings, batch_sh).lower(abstract, batch)
  return lowered, abstract, model


def _compile(config: ml_collections.ConfigDict, devices: list):
  """(compiled train step, abstract state, model) for the config on these devices."""
  lowered, abstract, model = _lower(config, devices)
  return lowered.compile(), abstract, model


def _state_bytes_per_chip(abstract) -> int:
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract)
  )


def xla_flops(config: ml_collections.ConfigDict, devices: list) -> float:
  """XLA's FLOPs per step per chip, layers counted one by one.

  XLA's cost analysis counts a loop body once, so a scanned stack of layers (and the
  grad-accumulation loop) would be undercounted. This compiles the model unscanned with
  one layer, then one more of each kind (dense MLP, and mixture of experts from
  `model.moe.first_dense_layers` on), grad_accum=1, and adds each kind's increment once
  per layer of that kind.
  """
  m = config.model
  moe_layers = max(m.num_layers - m.moe.first_dense_layers, 0) if m.moe.num_experts else 0
  kinds = (m.num_layers - moe_layers, moe_layers)  # (dense, moe) layers

  def flops_of(dense: int, moe: int) -> float:
    small = ml_collections.ConfigDict(config.to_dict())
    small.model.update(num_layers=dense + moe, scan_layers=False)
    small.model.moe.first_dense_layers = dense
    small.train.grad_accum = 1
    compiled, _, _ = _compile(small, devices)
    return float(compiled.cost_analysis()["flops"])

  first = (1, 0) if kinds[0] else (0, 1)
  total = base = flops_of(*first)
  for kind, more in enumerate(((1, 0), (0, 1))):
    extra = kinds[kind] - first[kind]
    if extra > 0:
      total += extra * (flops_of(first[0] + more[0], first[1] + more[1]) - base)
  return total


def compile_train_step(
  config: ml_collections.ConfigDict, devices: list, flops: bool = True
) -> dict:
  """Compiles one train step for `devices`: memory per chip, FLOPs, and whether it fits.

  When XLA refuses to compile because the program exceeds the chip's HBM, the memory is
  XLA's required temporaries plus this chip's share of the state, and `fits` is False.
  """
  wiring = validate_config(config)
  sharding.validate_mesh(config, len(devices))
  lowered, abstract, model = _lower(config, devices)
  try:
    mem = lowered.compile().memory_analysis()
    state_bytes, temp_bytes = mem.argument_size_in_bytes, mem.temp_size_in_bytes
    hbm = (
      state_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + temp_bytes
      + mem.generated_code_size_in_bytes
    )
    hbm_gib = CHIPS.get(devices[0].device_kind, (None, None))[0]
    fits = None if hbm_gib is None else hbm <= hbm_gib * GIB
  except jax.errors.JaxRuntimeError as e:
    needed = re.search(r"HLO temporaries \(([\d.]+)([MGT])\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not needed:
      raise
    state_bytes = _state_bytes_per_chip(abstract)
    temp_bytes = float(needed.group(1)) * 1024 ** "MGT".index(needed.group(2)) * 2**20
    hbm, fits = state_bytes + temp_bytes, False
  tokens = config.train.batch_size * config.data.seq_len
  return {
    "chip": devices[0].device_kind,
    "chips": len(devices),
    "mesh": dict(
      zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, len(devices)), strict=True)
    ),
    "params": sum(x.size for x in jax.tree.leaves(abstract.params)),
    "state_bytes": state_bytes,
    "logical_state_bytes": _state_bytes_per_chip(abstract),
    "temp_bytes": temp_bytes,
    "hbm_bytes": hbm,
    "fits": fits,
    "xla_flops_per_chip": xla_flops(config, devices) if flops else None,
    "model_flops": flops_per_token(model.cfg, config.data.seq_len, wiring.target_len(config))
    * tokens,
    "tokens": tokens,
  }


def report(r: dict) -> str:
  hbm_gib, peak = CHIPS.get(r["chip"], (None, None))
  lines = [
    f"{r['chip']} x {r['chips']}, mesh {r['mesh']}, {r['params'] / 1e6:.1f}M parameters, "
    f"{r['tokens']:,} tokens per step",
    f"memory per chip: {r['hbm_bytes'] / GIB:.2f} GiB (state in {r['state_bytes'] / GIB:.2f}, "
    f"temporaries {r['temp_bytes'] / GIB:.2f})"
    + (f" of {hbm_gib} GiB HBM: {'fits' if r['fits'] else 'DOES NOT FIT'}" if hbm_gib else ""),
  ]
  flops = r["xla_flops_per_chip"]
  if flops is None:
    lines.append(f"model FLOPs per step (the 6N + attention formula): {r['model_flops']:.3e}")
  else:
    lines.append(
      f"XLA FLOPs per step: {flops:.3e} per chip, {flops * r['chips']:.3e} in all "
      f"(the 6N + attention formula of perf/mfu: {r['model_flops']:.3e})"
    )
  if flops is not None and peak:
    seconds = flops / (peak * 1e12)
    lines.append(
      f"step time at the chip's bfloat16 peak ({peak} TFLOP/s): {seconds * 1e3:.1f} ms; "
      f"at 40% MFU: {seconds / 0.4 * 1e3:.1f} ms ({r['tokens'] / (seconds / 0.4):,.0f} tokens/s)"
    )
  lines.append(f"hbm_per_chip_gib={r['hbm_bytes'] / GIB:.3f}")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  console.setup(None)
  from absl import flags

  flags_ = flags.FLAGS
  devices = topology_devices(flags_.topology)
  result = compile_train_step(flags_.config, devices, flops=flags_.flops)
  print(report(result), flush=True)
  if result["fits"] is False:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "a preset: configs/<name>.py[:args]")
  flags.DEFINE_string("topology", "v5e:2x4", "TPU topology: v5e:1x1, v5e:2x4, v4:2x2x2, ...")
  flags.DEFINE_bool("flops", True, "also count XLA's FLOPs per step (two more small compiles)")
  flags.mark_flags_as_required(["config"])
  app.run(main)
