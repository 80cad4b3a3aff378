"""Writes a synthetic text-to-text set: reverse or sort a short random string. A task
with one right answer per input, so exact match measures whether a model learned it.

  python -m train.data.make_seq2seq_task --output=runs/reverse.jsonl --task=reverse

Each JSONL record is `{"inputs": "reverse: <string>", "targets": <answer>}`, strings of
`--min_len` to `--max_len` characters from `--alphabet`, made with `--seed`. Inputs are
distinct, so the last 10% (fourfold's validation split for local JSONL) holds strings
never seen in training.
"""

from __future__ import annotations

import json
import os
import random

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "JSONL file to write", required=True)
flags.DEFINE_enum("task", "reverse", ["reverse", "sort"], "what the target does to the string")
flags.DEFINE_integer("count", 20000, "examples")
flags.DEFINE_integer("min_len", 4, "shortest string")
flags.DEFINE_integer("max_len", 12, "longest string")
flags.DEFINE_string("alphabet", "abcdefghijklmnopqrstuvwxyz", "characters of the strings")
flags.DEFINE_integer("seed", 0, "random seed")

TASKS = {"reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s))}


def make_records(task: str, count: int, min_len: int, max_len: int, alphabet: str, seed: int):
  """`count` distinct strings and their answers."""
  if not 1 <= min_len <= max_len:
    raise ValueError(f"--min_len={min_len}, --max_len={max_len}: need 1 <= min_len <= max_len")
  possible = sum(len(set(alphabet)) ** n for n in range(min_len, max_len + 1))
  if count > possible // 2:
    raise ValueError(f"--count={count}: at most {possible // 2} distinct strings fit these lengths")
  rng, seen, records = random.Random(seed), set(), []
  while len(records) < count:
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
    if s not in seen:
      seen.add(s)
      records.append({"inputs": f"{task}: {s}", "targets": TASKS[task](s)})
  return records


def main(argv) -> None:
  del argv
  f = FLAGS
  records = make_records(f.task, f.count, f.min_len, f.max_len, f.alphabet, f.seed)
  os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
  with open(f.output, "w") as out:
    out.writelines(json.dumps(r) + "\n" for r in records)
  print(f"wrote {len(records)} {f.task} examples to {f.output}")


if __name__ == "__main__":
  app.run(main)
