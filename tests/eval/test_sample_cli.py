"""python -m eval.sample on a trained tiny workdir."""

import os
import subprocess
import sys

import tensorflow_datasets as tfds

from configs import gpt
from tests.train.test_trainer import tiny
from train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(workdir, *flags):
  cmd = [sys.executable, "-m", "eval.sample", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def test_sample_cli_greedy_is_deterministic_and_continues_the_prompt(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    trainer.run(tiny(gpt, steps=4), str(tmp_path))
  a = sample(tmp_path, "--prompt=abc", "--num_tokens=20", "--temperature=0", "--num_samples=2")
  assert a.returncode == 0, a.stderr
  texts = a.stdout.split("---- sample ")[1:]
  assert len(texts) == 2 and all(t.split("\n", 1)[1].startswith("abc") for t in texts)
  assert texts[0].split("\n", 1)[1] == texts[1].split("\n", 1)[1]  # greedy ignores the seed
  b = sample(
    tmp_path, "--prompt=abc", "--num_tokens=20", "--temperature=1.0", "--top_k=5", "--top_p=0.9"
  )
  assert b.returncode == 0 and "---- sample 1/1 (20 network calls, " in b.stdout
  # --steps belongs to the diffusion samplers: an AR model refuses it, naming its own flags.
  c = sample(tmp_path, "--prompt=abc", "--num_tokens=20", "--steps=8")
  assert c.returncode != 0 and "---- sample" not in c.stdout
  assert (
    "--steps: model.family='decoder' samplers read only ['--temperature', '--top_k'" in c.stderr
  )


def test_sample_cli_rejects_a_workdir_without_a_run(tmp_path):
  r = sample(tmp_path, "--prompt=abc")
  assert r.returncode != 0 and "no config.json" in r.stderr
