"""`python -m eval.main`: a trained workdir's task metrics, equal to the run's own eval."""

import json
import os
import subprocess
import sys

import pytest

from configs import bert
from train import trainer
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def classify_workdir(tmp_path_factory):
  """A tiny encoder trained for a few steps on a JSONL task: does a text mention 'cat'?"""
  root = tmp_path_factory.mktemp("cls")
  words = ["dog", "bird", "fish", "cat", "tree", "car"]
  with open(root / "data.jsonl", "w") as f:
    for i in range(120):
      text = " ".join(words[(i * 7 + j * 3) % 6] for j in range(1 + i % 4))
      f.write(json.dumps({"text": text, "label": int("cat" in text)}) + "\n")
  c = bert.get_config("size=tiny,task=classify")
  c.data.update(name=f"jsonl:{root / 'data.jsonl'}", text_field="text", seq_len=32)
  c.model.dropout = 0.0
  c.train.update(
    dict(steps=6, batch_size=8, eval_every=6, eval_steps=0, checkpoint_every=6, peak_tflops=1.0)
  )
  workdir = root / "run"
  trainer.run(c, str(workdir))
  return workdir


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
  )


def test_eval_main_reproduces_the_runs_final_eval(classify_workdir):
  out = run_cli("eval.main", f"--workdir={classify_workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  final = [r for r in read_metrics(str(classify_workdir)) if "eval/loss" in r][-1]
  table = {}
  for line in out.stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[0] == "classify":
      table[parts[1]] = float(parts[2])
  assert set(table) == {"eval/loss", "eval/accuracy", "eval/f1"}
  for key, value in table.items():
    assert value == pytest.approx(final[key], abs=1e-4)
  with open(classify_workdir / "eval_results.json") as f:
    assert json.load(f)["classify"]["eval/accuracy"] == pytest.approx(final["eval/accuracy"])


def test_eval_main_refuses_a_task_the_checkpoint_has_no_head_for(classify_workdir):
  out = run_cli("eval.main", f"--workdir={classify_workdir}", "--tasks=pretrain")
  assert out.returncode != 0
  assert "it can be evaluated on ['classify'] only" in out.stderr


def test_sampling_refuses_an_encoder(classify_workdir):
  out = run_cli("eval.sample", f"--workdir={classify_workdir}")
  assert out.returncode != 0
  assert "does not generate text; evaluate it with python -m eval.main" in out.stderr
