"""Evaluating a trained workdir outside of training (`python -m eval.main`, `eval.mask_curve`):
its own task's metrics, or multiple-choice benchmarks (eval/benchmarks.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from eval import benchmarks
from eval.loglik import Scorer
from modeling import diffusion
from train import families, sharding
from train.step import make_eval_step
from train.trainer import load_for_inference, run_eval


def evaluate_workdir(
  workdir: str,
  tasks: list[str],
  eval_name: str = "",
  eval_steps: int = 0,
  batch_size: int = 0,
  beam_size: int = 0,
  eval_decode: int = -1,
) -> dict[str, dict[str, float]]:
  """{task: metrics} for the checkpoint's task on its evaluation split (or `eval_name`).

  A checkpoint carries one head, so the tasks it can be evaluated on are its own.
  Seq2seq decoding: `beam_size` (0: the run's task.beam_size) and `eval_decode` examples
  decoded (-1: the run's task.eval_decode).
  """
  config, model, params, tokenizer = load_for_inference(workdir)
  own = config.task.name
  for name in tasks:
    if name != own:
      raise ValueError(
        f"--tasks={','.join(tasks)}: {workdir} holds a {config.model.family} trained for "
        f"task.name={own!r}; it can be evaluated on ['{own}'] only"
      )
  config.data.eval_name = eval_name or config.data.eval_name
  config.train.eval_steps = eval_steps
  if beam_size:
    config.task.beam_size = beam_size
  if eval_decode >= 0:
    config.task.eval_decode = eval_decode
  if batch_size:
    config.train.eval_batch_size = batch_size
  wiring = families.resolve(config)
  _, objective = wiring.build(config, tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  rows = config.train.eval_batch_size or config.train.batch_size
  if rows % jax.device_count():
    raise ValueError(f"--batch_size={rows}: must be divisible by the {jax.device_count()} devices")
  batch_sh = sharding.batch_sharding(mesh)
  eval_step = jax.jit(make_eval_step(model, objective), out_shardings=sharding.replicated(mesh))

  def to_global(local):
    return sharding.to_global(local, batch_sh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return {own: run_eval(config, wiring.task, tokenizer, params, eval_step, to_global, model)}


def split_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
  """(a workdir's own-task names, benchmark names) of `--tasks`; a name that is neither a
  benchmark nor any family's task.name is refused, listing the known tasks."""
  own_names = sorted({t for f in families.FAMILIES.values() for t in f.tasks})
  for name in tasks:
    if not benchmarks.is_benchmark(name) and name not in own_names:
      raise ValueError(
        f"--tasks: unknown task {name!r}; known: the benchmarks {', '.join(benchmarks.KNOWN)}, "
        f"or the workdir's own task.name (one of {', '.join(own_names)})"
      )
  return [t for t in tasks if not benchmarks.is_benchmark(t)], [
    t for t in tasks if benchmarks.is_benchmark(t)
  ]


def evaluate_benchmarks(
  workdir: str,
  tasks: list[benchmarks.Prepared],
  batch_size: int = 0,
  mc_samples: int = 16,
  seed: int = 0,
) -> dict[str, dict]:
  """{task: metrics} of prepared benchmark tasks under the workdir's model (eval/loglik.py's
  Scorer: every family; `batch_size` 0 is 16 rows). Progress goes to stderr."""
  scorer = Scorer.from_workdir(
    workdir, batch_size=batch_size or 16, mc_samples=mc_samples, seed=seed
  )
  # is_greedy is no benchmark metric: skip diffusion's greedy decode (a call per token)
  scorer = dataclasses.replace(scorer, check_greedy=False)
  results = {}
  for i, task in enumerate(tasks, 1):
    start = time.perf_counter()
    print(
      f"[{i}/{len(tasks)}] {task.name} on {workdir}: {len(task.items)} items, "
      f"{len(task.requests)} requests",
      file=sys.stderr,
      flush=True,
    )
    results[task.name] = benchmarks.score(scorer, task)
    print(f"{task.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  return results


def write_results(workdir: str, results: dict[str, dict]) -> dict[str, dict]:
  """Merges `results` into <workdir>/eval_results.json, writes eval_results.md; returns all."""
  path = epath.Path(workdir) / "eval_results.json"  # a local path or a bucket (gs://...)
  merged = json.loads(path.read_text()) if path.is_file() else {}
  merged.update(results)
  path.write_text(json.dumps(merged, indent=2))
  (epath.Path(workdir) / "eval_results.md").write_text(benchmarks.markdown_table({workdir: merged}))
  return merged


def report(results: dict[str, dict], prepared: list[benchmarks.Prepared], plot_dir: str) -> None:
  """Prints {workdir: {task: metrics}} as one table (with the rows each task skipped and what
  each workdir's scores are), writes each workdir's results, and with several workdirs the
  comparison table; one bar chart per benchmark task in `plot_dir`."""
  for task in prepared:
    if task.skipped:
      reasons = ", ".join(f"{n} {why}" for why, n in task.skipped.items())
      print(f"{task.name}: skipped {sum(task.skipped.values())} rows ({reasons})")
  for workdir, got in results.items():
    for line in sorted({m["scored_by"] for m in got.values() if "scored_by" in m}):
      print(f"{workdir} scored by {line}")
  print(benchmarks.text_table(results))
  for workdir, got in results.items():
    write_results(workdir, got)
    print(f"written to {os.path.join(workdir, 'eval_results.json')} and eval_results.md")
  if len(results) > 1:
    os.makedirs(plot_dir, exist_ok=True)
    with open(os.path.join(plot_dir, "eval_compare.md"), "w") as f:
      f.write(benchmarks.markdown_table(results))
    print(f"comparison table: {os.path.join(plot_dir, 'eval_compare.md')}")
  for path in benchmarks.plot_tasks(results, plot_dir):
    print(f"chart: {path}")


def mask_curve(config, model, params, tokenizer, ratios, eval_steps=0, batch_size=0, seed=0):
  """[(ratio, nats per masked token, masked tokens)] over the validation split."""
  if config.model.family != "diffusion":
    raise ValueError(
      f"--workdir holds a model.family={config.model.family!r} model; the mask curve is for "
      "'diffusion'"
    )
  if config.model.time_conditioning and config.task.schedule != "loglinear":
    raise ValueError(
      f"task.schedule={config.task.schedule!r}: a time-conditioned model's curve needs the "
      "loglinear schedule (time = mask ratio)"
    )
  bad = [r for r in ratios if not 0.0 < r <= 1.0]
  if bad:
    raise ValueError(f"--ratios: {bad} outside (0, 1]")
  task = families.resolve(config).task
  rows = batch_size or config.train.eval_batch_size or config.train.batch_size
  batches = task.eval_batches(config, tokenizer, batch_size=rows, max_batches=eval_steps)

  @jax.jit  # one compile for every ratio: the ratio is traced
  def at(batch, rng, ratio):
    def logits_fn(z_BL, t_B):
      pos_BL, seg_BL = batch["positions"], batch["segment_ids"]
      return diffusion.denoise(model, params, z_BL, pos_BL, seg_BL, t_B)

    return diffusion.masked_nll_at(logits_fn, rng, batch["tokens"], batch["segment_ids"], ratio)

  sums, counts = np.zeros(len(ratios)), np.zeros(len(ratios))
  for b, batch in enumerate(batches):
    batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    for i, r in enumerate(ratios):
      s, c = at(batch, jax.random.fold_in(jax.random.key(seed), b * len(ratios) + i), r)
      sums[i] += float(s)
      counts[i] += float(c)
    print(f"\rbatch {b + 1}", end="", flush=True)
  print()
  if not counts.any():
    raise ValueError(f"{config.data.name}: the validation split has no tokens")
  return [(r, s / c, int(c)) for r, s, c in zip(ratios, sums, counts, strict=True)]
