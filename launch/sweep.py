"""Run an ablation's grid of configs one after another and write its results table.

python -m launch.sweep --config=configs/ablations/bitnet_vs_fp.py --workdir=runs/bitnet_vs_fp [--only=size=2x64]

The ablation module defines GRID (preset argument strings), get_config(arg) and
summarize(results, outdir). Each run trains in <workdir>/<arg> and resumes from its own
checkpoints, so rerunning the command continues an interrupted sweep; finished runs are
read back from their metrics. results.json holds each run's parameters and last metrics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time

import jax
from absl import app, flags
from etils import epath

from train import console, trainer
from train.metrics import read_metrics

flags.DEFINE_string(
  "config", None, "an ablation module, e.g. configs/ablations/bitnet_vs_fp.py", required=True
)
flags.DEFINE_string("workdir", None, "the sweep's directory", required=True)
flags.DEFINE_list("only", [], "run only the grid points containing one of these strings")
FLAGS = flags.FLAGS


def load_ablation(path: str):
  spec = importlib.util.spec_from_file_location("ablation", path)
  if spec is None or not os.path.exists(path):
    raise app.UsageError(f"--config={path!r}: no such file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for name in ("GRID", "get_config", "summarize"):
    if not hasattr(module, name):
      raise app.UsageError(f"--config={path!r}: an ablation module defines {name}")
  return module


def run_point(ablation, arg: str, workdir: str) -> dict:
  config = ablation.get_config(arg)

  def finished() -> list[dict]:
    return [
      r for r in read_metrics(workdir) if r.get("step") == config.train.steps and "eval/loss" in r
    ]

  if not finished():
    trainer.run(config, workdir)
  if not finished():
    raise RuntimeError(
      f"{arg}: the run in {workdir} stopped before step {config.train.steps} or has no "
      "eval/loss there (train.eval_every must be > 0); rerun the sweep to continue it"
    )
  last = finished()[-1]  # read back either way: one shape in results.json
  _, _, params, _ = trainer.load_for_inference(workdir)
  return {"params": int(sum(x.size for x in jax.tree.leaves(params))), "metrics": last}


def main(argv):
  del argv
  console.setup(FLAGS.workdir)
  ablation = load_ablation(FLAGS.config)
  root = epath.Path(FLAGS.workdir)  # a local path or a bucket (gs://...)
  root.mkdir(parents=True, exist_ok=True)
  path = root / "results.json"
  results = json.loads(path.read_text()) if path.exists() else {}
  grid = [a for a in ablation.GRID if not FLAGS.only or any(o in a for o in FLAGS.only)]
  for i, arg in enumerate(grid):
    start = time.perf_counter()
    print(f"==== [{i + 1}/{len(grid)}] {arg}", flush=True)
    results[arg] = run_point(ablation, arg, str(root / arg.replace(",", "_")))
    path.write_text(json.dumps(results, indent=2))
    loss = results[arg]["metrics"].get("eval/loss")
    print(f"==== {arg}: eval/loss {loss} ({time.perf_counter() - start:.0f} s)", flush=True)
  print(ablation.summarize(results, FLAGS.workdir), flush=True)


if __name__ == "__main__":
  app.run(main)
