"""Writes a text-classification set from the Python standard library: which package a
snippet of source code comes from. Real text, made offline, reproducible.

  python -m train.data.make_classify_task --output=runs/stdlib_packages.jsonl

Each JSONL record is `{"text": <snippet>, "label": <class id>, "package": <name>}`, a
snippet being a blank-line-separated block of at least `--min_chars` characters from a
`.py` file of one of `--packages`. Records are shuffled with `--seed`, so the last 10%
(fourfold's validation split for local JSONL) mixes all classes.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sysconfig

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "JSONL file to write")
flags.DEFINE_list("packages", ["asyncio", "email", "unittest", "xml"], "one class per package")
flags.DEFINE_integer("min_chars", 80, "shortest snippet kept")
flags.DEFINE_integer("max_per_class", 1500, "snippets kept per package (the first ones, shuffled)")
flags.DEFINE_integer("seed", 0, "shuffle seed")


def snippets(package_dir: str, min_chars: int) -> list[str]:
  out = []
  for root, _, files in sorted(os.walk(package_dir)):
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
          out += [b.strip("\n") for b in f.read().split("\n\n") if len(b.strip()) >= min_chars]
  return out


def make_records(packages: list[str], min_chars: int, max_per_class: int, seed: int) -> list:
  stdlib = sysconfig.get_paths()["stdlib"]
  rng = random.Random(seed)
  records = []
  for label, package in enumerate(packages):
    path = os.path.join(stdlib, package)
    if not os.path.isdir(path):
      raise ValueError(f"--packages: {package!r} is not a package directory in {stdlib}")
    found = snippets(path, min_chars)
    rng.shuffle(found)
    records += [{"text": t, "label": label, "package": package} for t in found[:max_per_class]]
  rng.shuffle(records)
  return records


def main(argv) -> None:
  del argv
  records = make_records(FLAGS.packages, FLAGS.min_chars, FLAGS.max_per_class, FLAGS.seed)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  counts = collections.Counter(r["package"] for r in records)
  print(f"wrote {len(records)} records to {FLAGS.output}: {dict(counts)}")


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main)
