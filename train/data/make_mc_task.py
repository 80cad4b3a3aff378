"""Writes a multiple-choice set of real text: which continuation of a Python stdlib snippet
is the real one. Made offline from the embedded default corpus, reproducible.

  python -m train.data.make_mc_task --mc_out_dir=runs/stdlib_mc --mc_train=1000 --mc_eval=400
  python -m eval.main --workdir=runs/ar --tasks=mc:runs/stdlib_mc/eval.jsonl

Writes `train.jsonl` and `eval.jsonl` under `--mc_out_dir`, one item a line, in the layout
`eval.main --tasks=mc:<path>` reads (docs/benchmark_tasks.md):

  {"question": <snippet>, "choices": [4 strings], "answer": <index of the real one>,
   "path": <stdlib file>, "offset": <character offset of the real continuation>}

The corpus is `pystdlib`'s (train/data/pystdlib.py: every `*.py` of the running Python's
stdlib), split by file as training splits it: `eval.jsonl` is made from the files of its
validation split only, `train.jsonl` from its training split, so a model trained on
`pystdlib` has never seen an eval snippet, and no file gives items to both.

An item cuts a file at a space between two non-space characters: the question is up to
`--mc_context_chars` characters before the space (starting at a line start where one falls
in its first half), the real continuation the `--mc_continuation_chars` characters after
it. The distractors are continuations of the same length cut the same way at random places
of other files of the same split. eval.main joins question and choice with one space (the
harness's target delimiter), so question + " " + the real choice is the file's own text.
All choices have the same length in characters, so acc_norm ranks them as acc does.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re

from absl import app, flags

from train.data import pystdlib

FLAGS = flags.FLAGS
# Prefixed names: pytest imports every make_*_task module in one process, and absl refuses
# a flag defined twice.
flags.DEFINE_string("mc_out_dir", None, "directory to write train.jsonl and eval.jsonl")
flags.DEFINE_integer("mc_train", 1000, "items from the pystdlib training split's files")
flags.DEFINE_integer("mc_eval", 400, "items from the pystdlib validation split's files")
flags.DEFINE_integer("mc_choices", 4, "choices per item: the real continuation and distractors")
flags.DEFINE_integer("mc_context_chars", 160, "most characters of the snippet (the question)")
flags.DEFINE_integer("mc_continuation_chars", 24, "characters of every choice")
flags.DEFINE_integer("mc_seed", 0, "random seed")

_CUT = re.compile(r"(?<=\S) (?=\S)")  # a space between two non-space characters
_MAX_TRIES = 50  # draws of a distractor before the item is given up


def stdlib_files(split: str) -> list[tuple[str, str]]:
  """(relative path, text) of the pystdlib files of `split` ("train" or "validation"),
  decoded as the pystdlib dataset decodes them."""
  root = pystdlib.stdlib_dir()
  out = []
  for rel_path in pystdlib.list_files(root):
    if pystdlib.split_of(rel_path) == split:
      out.append((rel_path, (root / rel_path).read_bytes().decode("utf-8", errors="replace")))
  return out


class _Cuts:
  """Every cut of every file at which `continuation` characters follow: drawn uniformly."""

  def __init__(self, files: list[tuple[str, str]], context: int, continuation: int):
    self.files, self.positions, self.ends = files, [], []
    total = 0
    for _, text in files:
      last = len(text) - 1 - continuation  # the last cut with a whole continuation after it
      found = [m.start() for m in _CUT.finditer(text, 1, last + 2)]
      if "\ufffd" in text:  # undecodable bytes: no item shows them
        found = [
          i for i in found if "\ufffd" not in text[max(0, i - context) : i + 1 + continuation]
        ]
      self.positions.append(found)
      total += len(found)
      self.ends.append(total)

  def __len__(self) -> int:
    return self.ends[-1] if self.ends else 0

  def draw(self, rng: random.Random) -> tuple[int, int]:
    """(file index, offset of the space)."""
    k = rng.randrange(len(self))
    f = bisect.bisect_right(self.ends, k)
    return f, self.positions[f][k - (self.ends[f - 1] if f else 0)]


def question_before(text: str, cut: int, context: int) -> str:
  """Up to `context` characters before `cut`, from a line start if one is in the first half."""
  start = max(0, cut - context)
  newline = text.find("\n", start, start + (cut - start) // 2)
  if start > 0 and newline >= 0:
    start = newline + 1
  return text[start:cut]


def make_items(
  files: list[tuple[str, str]],
  count: int,
  rng: random.Random,
  choices: int = 4,
  context: int = 160,
  continuation: int = 24,
) -> list[dict]:
  """`count` items from `files`, distractors from the other files among them."""
  if choices < 2:
    raise ValueError(f"--mc_choices={choices}: allowed 2 or more")
  if context < 1 or continuation < 1:
    raise ValueError(
      f"--mc_context_chars={context}, --mc_continuation_chars={continuation}: allowed 1 or more"
    )
  cuts = _Cuts(files, context, continuation)
  if len(files) < 2 or len(cuts) < count:
    raise ValueError(
      f"{count} items asked from {len(files)} files with {len(cuts)} places to cut: need "
      "two files or more and one place per item (fewer items, or shorter "
      "--mc_continuation_chars)"
    )
  used, items = set(), []
  while len(items) < count:
    f, cut = cuts.draw(rng)
    if (f, cut) in used:
      continue
    used.add((f, cut))
    path, text = files[f]
    real = text[cut + 1 : cut + 1 + continuation]
    options = [real]
    for _ in range(_MAX_TRIES):
      if len(options) == choices:
        break
      g, other = cuts.draw(rng)
      piece = files[g][1][other + 1 : other + 1 + continuation]
      if g != f and piece not in options:
        options.append(piece)
    if len(options) < choices:
      continue
    order = list(range(choices))
    rng.shuffle(order)
    items.append(
      {
        "question": question_before(text, cut, context),
        "choices": [options[i] for i in order],
        "answer": order.index(0),
        "path": path,
        "offset": cut + 1,
      }
    )
  return items


def make_splits(
  n_train: int, n_eval: int, seed: int, choices: int = 4, context: int = 160, continuation: int = 24
) -> tuple[list[dict], list[dict]]:
  """(train, eval) items: from pystdlib's training and validation files respectively."""
  if n_train < 0 or n_eval < 1:
    raise ValueError(f"--mc_train={n_train}, --mc_eval={n_eval}: allowed >= 0 and >= 1")
  out = []
  for split, count in (("train", n_train), ("validation", n_eval)):
    rng = random.Random(f"{seed}/{split}")  # each split's items whatever the other's count
    files = stdlib_files(split) if count else []
    out.append(make_items(files, count, rng, choices, context, continuation) if count else [])
  return out[0], out[1]


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = FLAGS
  if not f.mc_out_dir:
    raise app.UsageError("--mc_out_dir is required")
  train, held_out = make_splits(
    f.mc_train, f.mc_eval, f.mc_seed, f.mc_choices, f.mc_context_chars, f.mc_continuation_chars
  )
  os.makedirs(f.mc_out_dir, exist_ok=True)
  for name, records in (("train", train), ("eval", held_out)):
    if records:
      write_jsonl(os.path.join(f.mc_out_dir, f"{name}.jsonl"), records)
  print(
    f"wrote {len(train)} train and {len(held_out)} eval items ({f.mc_choices} choices, chance "
    f"{1 / f.mc_choices:.3f}) to {f.mc_out_dir}; evaluate with "
    f"--tasks=mc:{os.path.join(f.mc_out_dir, 'eval.jsonl')}"
  )


if __name__ == "__main__":
  app.run(main)
