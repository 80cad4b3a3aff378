"""launch/sweep.py on a tiny ablation (results.json, summarize, resuming without retraining,
a bad module), and configs/ablations/bitnet_vs_fp.py's grid and summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

from tests.conftest import STEPS, run_sweep
from train.metrics import read_metrics
from train.validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = ["quant=none", "quant=bitnet158"]


def run_files(workdir):
  """Per run: the bytes of metrics.jsonl and the mtimes of what trainer.run writes."""
  out = {}
  for arg in GRID:
    d = workdir / arg
    out[arg] = (
      (d / "metrics.jsonl").read_bytes(),
      (d / "config.json").stat().st_mtime_ns,
      (d / "loss.png").stat().st_mtime_ns,
      sorted(os.listdir(d / "checkpoints")),
    )
  return out


def without_step(metrics):
  return {k: v for k, v in metrics.items() if k != "step"}


def test_sweep_writes_results_and_resumes_without_retraining(sweep_run):
  module, workdir, first = sweep_run
  assert first.returncode == 0, first.stderr[-3000:]
  assert "==== [1/2] quant=none" in first.stdout and "==== [2/2] quant=bitnet158" in first.stdout
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results) == sorted(GRID)
  for arg in GRID:
    r = results[arg]
    assert math.isfinite(r["metrics"]["eval/loss"])
    last = read_metrics(workdir / arg)[-1]  # the run's last metrics line, at the last step
    assert last["step"] == STEPS and without_step(r["metrics"]) == without_step(last)
    line = f"SUMMARY {arg} params={r['params']} eval_loss={r['metrics']['eval/loss']:.4f}"
    assert line in first.stdout  # summarize's output is printed
  # the bitnet158 run has the same parameters plus SubLN's scale and bias in the attention
  # (width d_model) and MLP (width d_ff) of both blocks of gpt size=tiny (d_model 64, d_ff 256)
  assert results["quant=bitnet158"]["params"] - results["quant=none"]["params"] == 2 * 2 * (
    64 + 256
  )

  before = run_files(workdir)
  again = run_sweep(str(module), str(workdir))
  assert again.returncode == 0, again.stderr[-3000:]
  assert run_files(workdir) == before  # nothing retrained, rewritten or re-plotted
  reread = json.loads((workdir / "results.json").read_text())
  assert sorted(reread) == sorted(GRID)
  for arg in GRID:  # read back from metrics.jsonl
    assert reread[arg]["params"] == results[arg]["params"]
    assert without_step(reread[arg]["metrics"]) == without_step(results[arg]["metrics"])
  assert "model: decoder" not in again.stdout  # trainer.run prints this when it starts
  for arg in GRID:
    assert f"SUMMARY {arg} params={results[arg]['params']}" in again.stdout


def test_sweep_refuses_a_module_without_grid(tmp_path):
  module = tmp_path / "no_grid.py"
  module.write_text("def get_config(arg):\n  pass\n\n\ndef summarize(results, outdir):\n  pass\n")
  r = run_sweep(str(module), str(tmp_path / "runs"))
  assert r.returncode != 0
  assert f"--config='{module}': an ablation module defines GRID" in r.stderr
  assert not (tmp_path / "runs").exists()


# ---- configs/ablations/bitnet_vs_fp.py ----------------------------------------------------


@pytest.fixture(scope="module")
def bitnet_vs_fp():
  path = os.path.join(REPO, "configs", "ablations", "bitnet_vs_fp.py")
  spec = importlib.util.spec_from_file_location("bitnet_vs_fp", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bitnet_vs_fp_grid_configs_are_valid(bitnet_vs_fp, tmp_path):
  text = tmp_path / "corpus.txt"  # the offline route: a local copy of Tiny Shakespeare
  text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
  grid = bitnet_vs_fp.GRID
  assert len(grid) == len(set(grid)) == 6
  for arg in grid:
    c = bitnet_vs_fp.get_config(arg)
    size, quant = arg.split(",")
    assert (c.data.name, c.data.eval_split) == ("tiny_shakespeare", "validation+test")
    c.data.name = f"text:{text}"
    validate_config(c)
    expected = bitnet_vs_fp.SIZES[size.split("=")[1]]
    assert {k: c.model[k] for k in expected} == expected
    assert c.model.quant == quant.split("=")[1]
    if c.model.quant == "none":
      assert (c.train.schedule, c.train.learning_rate) == ("cosine", 1e-3)
    else:
      assert (c.train.schedule, c.train.learning_rate) == ("two_stage", 2e-3)
      assert c.train.cooldown_learning_rate == 5e-4
  # every run sees the same data in the same order
  configs = [bitnet_vs_fp.get_config(a) for a in grid]
  assert len({(c.seed, c.data.seq_len, c.train.batch_size, c.train.steps) for c in configs}) == 1


def test_bitnet_vs_fp_summarize(bitnet_vs_fp, tmp_path):
  def run(params, loss):
    return {"params": params, "metrics": {"step": 1500, "eval/loss": loss}}

  results = {
    "size=2x64,quant=none": run(100_000, 2.0),
    "size=2x64,quant=bitnet158": run(101_536, 2.2),
    "size=3x96,quant=bitnet158": run(301_000, 1.9),  # listed before its pair
    "size=3x96,quant=none": run(300_000, 1.9),
    "size=4x128,quant=none": run(700_000, 1.5),  # no bitnet158 run yet: no row
  }
  table = bitnet_vs_fp.summarize(results, str(tmp_path))
  rows = table.splitlines()
  assert rows[0].startswith("| size | parameters |") and rows[1].startswith("| --- |")
  assert rows[2:] == [
    "| 2x64 | 100,000 | 2.0000 | 2.2000 | 1.100 |",
    "| 3x96 | 300,000 | 1.9000 | 1.9000 | 1.000 |",
  ]
  assert (tmp_path / "results.md").read_text() == table + "\n"
  assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  empty = tmp_path / "empty"
  empty.mkdir()
  table = bitnet_vs_fp.summarize({"size=2x64,quant=none": run(1, 2.0)}, str(empty))
  assert len(table.splitlines()) == 2  # header only
  assert (empty / "results.md").exists() and not (empty / "gap.png").exists()
