"""python -m train.data.make_mc_task: "which continuation of this stdlib snippet is real".

Checked against the stdlib files themselves: the right choice is the file's own text after
the question, the distractors are text of other files of the same pystdlib split, every
choice has the same length, and no file gives items to both splits."""

import glob
import json
import os
import random
import re
import subprocess
import sys

import pytest
from absl import flags

from eval import benchmarks
from train.data import make_mc_task, pystdlib

REPO = __file__.rsplit("/tests/", 1)[0]
CONT = 32


@pytest.fixture(scope="module")
def splits():
  return make_mc_task.make_splits(40, 200, seed=0, context=120, continuation=CONT)


def test_items_are_the_files_own_text_against_other_files_distractors(splits):
  train, held_out = splits
  assert (len(train), len(held_out)) == (40, 200)
  root = pystdlib.stdlib_dir()
  texts = dict(make_mc_task.stdlib_files("validation"))
  for item in held_out:
    assert pystdlib.split_of(item["path"]) == "validation"
    text, offset, q = texts[item["path"]], item["offset"], item["question"]
    assert text[offset - 1] == " " and not text[offset - 2].isspace()
    assert 0 < len(q) <= 120 and text[offset - 1 - len(q) : offset - 1] == q
    assert item["choices"][item["answer"]] == text[offset : offset + CONT]
    assert {len(c) for c in item["choices"]} == {CONT}
    assert len(set(item["choices"])) == 4
    others = [t for p, t in texts.items() if p != item["path"]]
    for k, choice in enumerate(item["choices"]):
      if k != item["answer"]:
        assert any(choice in t for t in others), choice
  assert all(pystdlib.split_of(i["path"]) == "train" for i in train)
  assert not {i["path"] for i in train} & {i["path"] for i in held_out}
  assert (root / train[0]["path"]).is_file()
  # the right answer sits anywhere: 200 draws of 4 places, each about 50 times
  counts = [sum(i["answer"] == k for i in held_out) for k in range(4)]
  assert all(25 <= c <= 75 for c in counts), counts


def test_a_seed_fixes_the_items_and_each_split_ignores_the_others_count(splits):
  again = make_mc_task.make_splits(0, 200, seed=0, context=120, continuation=CONT)
  assert again[1] == splits[1] and again[0] == []
  other = make_mc_task.make_splits(0, 200, seed=1, context=120, continuation=CONT)
  assert other[1] != splits[1]


def test_make_items_on_small_files():
  files = [("a.py", "x = 1\ndef alpha(beta, gamma):\n  return beta + gamma\n"), ("b.py", "y " * 40)]
  items = make_mc_task.make_items(files, 3, random.Random(0), choices=2, context=10, continuation=4)
  for item in items:
    text = dict(files)[item["path"]]
    assert item["choices"][item["answer"]] == text[item["offset"] : item["offset"] + 4]
  with pytest.raises(ValueError, match="need two files or more"):
    make_mc_task.make_items(files[:1], 1, random.Random(0), continuation=4)
  with pytest.raises(ValueError, match="place per item"):
    make_mc_task.make_items(files, 10_000, random.Random(0), continuation=4)
  with pytest.raises(ValueError, match="--mc_choices=1"):
    make_mc_task.make_items(files, 1, random.Random(0), choices=1)


def test_cli_writes_what_eval_main_reads(tmp_path):
  cmd = [sys.executable, "-m", "train.data.make_mc_task", f"--mc_out_dir={tmp_path}"]
  out = subprocess.run(
    [*cmd, "--mc_train=5", "--mc_eval=30", "--mc_choices=3"],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr
  assert "chance 0.333" in out.stdout
  rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert len(rows) == 30 and len((tmp_path / "train.jsonl").read_text().splitlines()) == 5
  task = benchmarks.prepare(f"mc:{tmp_path / 'eval.jsonl'}", benchmarks.Options())
  assert len(task.items) == 30 and not task.skipped
  texts = dict(make_mc_task.stdlib_files("validation"))
  for row, k in zip(rows, range(0, len(task.requests), 3), strict=True):
    context, continuation = task.requests[k + row["answer"]]
    start = row["offset"] - 1 - len(row["question"])
    assert context + continuation == texts[row["path"]][start : row["offset"] + 24]


def test_its_flags_clash_with_no_other_make_task_module():
  """absl refuses a flag defined twice, and pytest imports these modules in one process."""
  mine = {f.name for f in flags.FLAGS.get_flags_for_module(make_mc_task)}
  assert "mc_out_dir" in mine
  for path in glob.glob(os.path.join(REPO, "train", "data", "make_*_task.py")):
    if not path.endswith("make_mc_task.py"):
      with open(path) as f:
        theirs = set(re.findall(r'DEFINE_[a-z]+\(\s*"(\w+)"', f.read()))
      assert theirs and not mine & theirs, path
