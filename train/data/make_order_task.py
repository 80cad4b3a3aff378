"""Writes a line-order classification set from the Python standard library: is a short
run of real source code lines in its original line order (label 0) or are its lines shuffled
(label 1)? Both classes hold the same lines, so a bag of words cannot tell them apart; the
order (indentation after a colon, a definition before its use) can.

  python -m train.data.make_order_task --output=runs/stdlib_order.jsonl

Each record is `{"text": <lines>, "label": 0 | 1, "package": <name>}`: the blank-line-
separated blocks of the `.py` files of `--packages` are cut into consecutive runs of lines,
each the longest that fits in `--max_chars` (at least `--min_lines`, all different). Each
run gives one record, its class drawn with probability 1/2; records are shuffled with `--seed`, so the last 10% (fourfold's
validation split for local JSONL) mixes both classes and all packages.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "JSONL file to write")
flags.DEFINE_list(
  "packages",
  "asyncio,email,unittest,xml,json,http,logging,concurrent,importlib,multiprocessing,urllib,"
  "idlelib,lib2to3,tkinter,ctypes,html,wsgiref,xmlrpc,sqlite3".split(","),
  "stdlib packages the blocks come from",
)
flags.DEFINE_integer("max_chars", 120, "longest block kept (byte tokens: fits a 128 context)")
flags.DEFINE_integer("min_lines", 4, "fewest lines of a block")
flags.DEFINE_integer("seed", 0, "class draws, permutations and record order")


def blocks(package_dir: str):
  """The blank-line-separated blocks of the package's .py files, in file order."""
  for root, _, files in sorted(os.walk(package_dir)):
    for name in sorted(f for f in files if f.endswith(".py")):
      with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
        yield from (b.strip("\n") for b in f.read().split("\n\n") if b.strip())


def windows(block: str, max_chars: int, min_lines: int):
  """Consecutive runs of the block's lines, each the longest that fits in max_chars; those of
  fewer than min_lines lines, or repeating a line (a permutation could leave it unchanged),
  are skipped."""
  kept: list[str] = []
  for line in [*block.split("\n"), None]:
    if line is not None and len("\n".join([*kept, line])) <= max_chars:
      kept.append(line)
      continue
    if len(kept) >= min_lines and len(set(kept)) == len(kept):
      yield kept
    kept = [] if line is None or len(line) > max_chars else [line]


def make_records(packages: list[str], max_chars: int, min_lines: int, seed: int) -> list[dict]:
  stdlib = sysconfig.get_paths()["stdlib"]
  rng = random.Random(seed)
  records = []
  for package in packages:
    path = os.path.join(stdlib, package)
    if not os.path.isdir(path):
      raise ValueError(f"--packages: {package!r} is not a package directory in {stdlib}")
    for lines in (w for b in blocks(path) for w in windows(b, max_chars, min_lines)):
      label = rng.random() < 0.5
      if label:
        order = list(lines)
        while order == lines:
          rng.shuffle(order)
        lines = order
      records.append({"text": "\n".join(lines), "label": int(label), "package": package})
  rng.shuffle(records)
  return records


def main(argv) -> None:
  del argv
  records = make_records(FLAGS.packages, FLAGS.max_chars, FLAGS.min_lines, FLAGS.seed)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  print(f"wrote {len(records)} records to {FLAGS.output}")


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main)
