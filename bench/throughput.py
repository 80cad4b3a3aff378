"""Time the compiled train step and report MFU against this machine's measured matmul peak.

python -m bench.throughput --config=configs/gpt.py:size=S --config.data.seq_len=256 --config.train.batch_size=16

Model FLOPs per token are 6N + 12 * layers * heads * head_dim * seq_len (PaLM
appendix B, as in nanoGPT's estimate_mfu), N = the weights used in matmuls.
The peak is the best float32 (or model.dtype) square-matmul rate measured in
the same run. The batch is synthetic (full-length documents), so data
loading is excluded. Last line: tokens_per_sec=... mfu=... peak_gflops=...

With --compare=key=value,... a variant is timed in the same process, alternating with the
config for --rounds rounds; the last line is then ratio_step_s=<variant / config>. Each
side's trained parameters, optimizer-state bytes and frozen bytes are printed too, so
LoRA against full fine-tuning is one command:

python -m bench.throughput --config=configs/gpt.py:size=S,task=sft \
    --config.data.name=jsonl:any.jsonl --compare=model.lora.rank=8

With --profile=DIR the timed steps are traced with the JAX profiler into
DIR/plugins/profile/<date_time>/ (`tensorboard --logdir DIR`, the Profile tab; or XProf).
"""

import copy
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from modeling.flops import flops_per_token
from modeling.transformer import DTYPES
from train import console, sharding
from train.data import make_tokenizer
from train.metrics import measure_matmul_peak
from train.optim import make_optimizer
from train.profiling import StepProfiler
from train.trainer import abstract_state, config_train_step
from train.validation import validate_config

config_flags.DEFINE_config_file(
  "config", "configs/gpt.py:size=S", "preset config file", lock_config=True
)
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_integer("peak_n", 2048, "matmul size for the peak measurement")
flags.DEFINE_list(
  "compare",
  [],
  "key=value overrides of a variant timed in the same run, alternating with the config "
  "(e.g. model.quant=bitnet158); prints the variant's step time over the config's",
)
flags.DEFINE_integer("rounds", 3, "--compare: alternating timings of each side")
flags.DEFINE_string("profile", "", "a folder: trace the timed steps with the JAX profiler there")
FLAGS = flags.FLAGS


def benchmark(config, steps: int, warmup: int, peak_n: int, profile: str = "") -> dict[str, float]:
  wiring = validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  tokenizer = make_tokenizer(config.data.tokenizer)
  model, objective = wiring.build(config, tokenizer)
  tx = make_optimizer(config.train)
  abstract, shardings, init_fn = abstract_state(config, model, tx, mesh, rules)
  b, length = config.train.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batch = {}
  for key, n in wiring.batch_lengths(config).items():  # one example per row, every slot used
    if key.endswith("positions"):
      batch[key] = np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy()
    elif key.endswith("segment_ids") or key.endswith("mask"):
      batch[key] = np.ones((b, n), np.int32)
    else:
      batch[key] = rng.integers(8, model.cfg.vocab_size, (b, n), dtype=np.int32)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = sharding.sharded_init(init_fn, jax.random.PRNGKey(0), shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    step = sharding.jit_train_step(
      config_train_step(config, model, objective, tx), shardings, sharding.batch_sharding(mesh)
    )
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    profiler = StepProfiler(profile, 1, steps if profile else 0)
    for i in range(1, steps + 1):
      profiler.begin(i, state)
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      profiler.end(i, state)
  if profiler.path:
    print(f"profile of the {steps} timed steps: {profiler.path}")
  peak = measure_matmul_peak(peak_n, DTYPES[config.model.dtype]) * jax.device_count()
  step_s = float(np.median(times))
  tps = b * length / step_s
  flops = flops_per_token(model.cfg, length, wiring.target_len(config))
  return {
    "compile_s": compile_s,
    "step_s": step_s,
    "tokens_per_sec": tps,
    "model_gflops_per_step": flops * b * length / 1e9,
    "mfu": tps * flops / peak,
    "peak_gflops": peak / 1e9,
    "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
    "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(state.opt_state)),
    "frozen_bytes": sum(x.nbytes for x in jax.tree.leaves(state.frozen)),
    "loss": float(metrics["train/loss"]),
  }


def variant_of(config, overrides: list[str]):
  """A copy of `config` with `key=value` overrides, each parsed as the key's current type;
  derived keys follow them (a deep copy keeps the field references)."""
  out = copy.deepcopy(config)
  with out.unlocked():
    for item in overrides:
      key, sep, value = item.partition("=")
      if not sep:
        raise app.UsageError(f"--compare={item!r}: expected key=value")
      *parents, leaf = key.split(".")
      node = out
      for part in parents:
        node = node[part]
      old = node[leaf]
      node[leaf] = value.lower() in ("1", "true") if isinstance(old, bool) else type(old)(value)
  return out


def report(r: dict) -> None:
  print(
    f"params={r['params']:,} compile_s={r['compile_s']:.1f} step_s={r['step_s']:.4f} "
    f"model_gflops_per_step={r['model_gflops_per_step']:.1f} devices={jax.device_count()}"
  )
  print(f"optimizer_bytes={r['optimizer_bytes']:,} frozen_bytes={r['frozen_bytes']:,}")
  print(
    f"tokens_per_sec={r['tokens_per_sec']:.0f} mfu={r['mfu']:.3f} peak_gflops={r['peak_gflops']:.1f}"
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(None)
  if not FLAGS.compare:
    report(benchmark(FLAGS.config, FLAGS.steps, FLAGS.warmup, FLAGS.peak_n, FLAGS.profile))
    return
  variant = variant_of(FLAGS.config, FLAGS.compare)
  times = {"config": [], "variant": []}
  last = {}
  for i in range(FLAGS.rounds):
    for name, cfg in (("config", FLAGS.config), ("variant", variant)):
      r = last[name] = benchmark(cfg, FLAGS.steps, FLAGS.warmup, FLAGS.peak_n)
      times[name].append(r["step_s"])
      print(
        f"round {i + 1} {name}: step_s={r['step_s']:.4f} tokens_per_sec={r['tokens_per_sec']:.0f}"
      )
  for name in ("config", "variant"):  # trained parameters and their optimizer state (Adam)
    r = last[name]
    print(
      f"{name}: trained params={r['params']:,} optimizer_bytes={r['optimizer_bytes']:,} "
      f"frozen_bytes={r['frozen_bytes']:,}"
    )
  base, var = (float(np.median(times[k])) for k in ("config", "variant"))
  print(f"config step_s={base:.4f} variant ({','.join(FLAGS.compare)}) step_s={var:.4f}")
  print(f"ratio_step_s={var / base:.3f}")


if __name__ == "__main__":
  app.run(main)
