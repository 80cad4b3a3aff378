"""Writes a preference set (for DPO and its kin) from real text, the Python standard library,
where the preferred property can be measured on whatever a model generates: string literals in
single quotes rather than double.

  python -m train.data.make_preference_task --out_dir=runs/prefs --train=2000 --eval=200

Writes `train.jsonl` and `eval.jsonl` under `--out_dir`, one pair a line, as
`train.data.chat.read_preferences` reads it:

  {"prompt": <up to --context characters of a source file, ending before a line or mid-line
              before its first string literal>,
   "chosen": <the rest of that line, verbatim>,
   "rejected": <the same text with each single-quoted literal in double quotes>,
   "file": <path relative to the stdlib>, "line": <1-based line number>}

A line is used only when every quote character on it belongs to a one-line, unprefixed,
single-quoted literal (strings and comments lexed as Python does, so a quote in a docstring or a
comment never counts) whose content has no quote or backslash: the swap then changes the quotes and nothing else, and chosen != rejected.
Files are split by `pystdlib.split_of`, the corpus's own split: train rows come from its train
files and eval rows from its validation files. Files are read in an order shuffled by `--seed`,
at most `--per_file` lines from each, until enough rows are found, so a run reads a few hundred
files, not the whole library.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import json
import math
import os
import random
import re

from absl import app, flags

from train.data import pystdlib

FLAGS = flags.FLAGS
# allow_override: make_instruct_task defines the same four, and a test loads both.
flags.DEFINE_string(
  "out_dir", None, "directory to write train.jsonl and eval.jsonl", allow_override=True
)
flags.DEFINE_integer("train", 2000, "training pairs", allow_override=True)
flags.DEFINE_integer("eval", 200, "evaluation pairs (from other files)", allow_override=True)
flags.DEFINE_integer("seed", 0, "random seed", allow_override=True)
flags.DEFINE_integer("context", 200, "most characters of prompt")
flags.DEFINE_integer("per_file", 4, "most pairs taken from one file")
flags.DEFINE_float("mid_line", 0.5, "share of prompts that end mid-line, before the literal")

_CUT_AFTER = " ([{,="  # a mid-line prompt ends after one of these
_PREFIXES = "rRbBuUfF"
# a comment, or a string literal with its prefix, as Python's tokenizer would find it in order
_STRING_OR_COMMENT = re.compile(
  r"#[^\n]*"
  r"|[rRbBuUfF]{0,2}(?:'''(?:[^'\\]|\\.|'(?!''))*'''"
  r'|"""(?:[^"\\]|\\.|"(?!""))*"""'
  r"|'(?:[^'\\\n]|\\.)*'"
  r'|"(?:[^"\\\n]|\\.)*")',
  re.DOTALL,
)


def prefers_single_quotes(text: str) -> bool | None:
  """Whether the first string literal in `text` (outside comments) is in single quotes; None
  when there is none. Works on any text, so it scores generated code that may not parse."""
  for m in _STRING_OR_COMMENT.finditer(text):
    if m[0][0] != "#":
      return m[0].lstrip(_PREFIXES)[0] == "'"
  return None


def property_rate(texts) -> tuple[float, int]:
  """(share of texts preferring single quotes, texts that have a literal at all); nan when none
  has one."""
  got = [p for p in map(prefers_single_quotes, texts) if p is not None]
  return (sum(got) / len(got) if got else math.nan), len(got)


def swap_quotes(text: str) -> str:
  """The rejected answer: every single quote made a double quote."""
  return text.replace("'", '"')


def _clean_literal(segment: str) -> bool:
  return len(segment) >= 2 and segment[0] == segment[-1] == "'" and "'" not in segment[1:-1]


def line_starts(text: str) -> list[int]:
  """The offset in `text` where each line (split at "\\n") begins, and one past the end."""
  return [0, *itertools.accumulate(len(s) + 1 for s in text.split("\n"))]


def swappable_lines(text: str) -> list[tuple[int, int]]:
  """(0-based line, column of its first literal) of each line of Python source whose quote
  characters all belong to clean single-quoted one-line literals.

  Strings and comments are found by one left-to-right regex scan (_STRING_OR_COMMENT), which
  lexes them as Python does: a quote inside a comment or a docstring never counts. The scan is
  ~50x faster than `ast` over the same files, which is what keeps the command to seconds."""
  starts, lines = line_starts(text), text.split("\n")
  spans, inside_multiline = collections.defaultdict(list), set()
  for m in _STRING_OR_COMMENT.finditer(text):
    if m[0][0] == "#":
      continue  # a quote in a comment fails the count below
    first = bisect.bisect_right(starts, m.start()) - 1
    last = bisect.bisect_right(starts, m.end() - 1) - 1
    if first == last:
      spans[first].append((m.start() - starts[first], m.end() - starts[first]))
    else:
      inside_multiline.update(range(first, last + 1))
  found = []
  for i, line_spans in sorted(spans.items()):
    line = lines[i]
    if i in inside_multiline or not line.isprintable():
      continue
    if '"' in line or "\\" in line or line.count("'") != 2 * len(line_spans):
      continue  # a quote outside the literals, or one that the swap could not undo
    if all(_clean_literal(line[a:b]) for a, b in line_spans):
      found.append((i, line_spans[0][0]))
  return found


def make_pair(text: str, starts: list[int], i: int, col: int, rng, context: int, mid_line):
  """One row for line `i` of `text` (first literal at `col`), or None when nothing precedes it."""
  line = text[starts[i] : starts[i + 1] - 1]
  cuts = [c for c in range(1, col + 1) if line[c - 1] in _CUT_AFTER and line[:c].strip()]
  cut = rng.choice(cuts) if cuts and rng.random() < mid_line else 0
  end = starts[i] + cut
  start = max(0, end - context)
  prompt = text[start:end]
  if start and text[start - 1] != "\n":  # begin at a line start where that leaves some text
    _, newline, rest = prompt.partition("\n")
    if newline and rest.strip():
      prompt = rest
  if not prompt.strip():
    return None
  chosen = line[cut:]
  return {"prompt": prompt, "chosen": chosen, "rejected": swap_quotes(chosen), "line": i + 1}


def read_source(rel_path: str) -> str:
  """A stdlib file's text, decoded as the pystdlib corpus decodes it."""
  return (pystdlib.stdlib_dir() / rel_path).read_bytes().decode("utf-8", errors="replace")


def collect(paths, count: int, rng, context: int, per_file: int, mid_line: float, taken: set):
  """`count` rows from `paths` in order, at most `per_file` from each, prompts not in `taken`
  (which grows with them)."""
  rows = []
  for rel_path in paths:
    text = read_source(rel_path)
    found, starts = swappable_lines(text), line_starts(text)
    for i, col in rng.sample(found, min(per_file, len(found))):
      row = make_pair(text, starts, i, col, rng, context, mid_line)
      if row and row["prompt"] not in taken:
        taken.add(row["prompt"])
        rows.append({**row, "file": rel_path})
        if len(rows) == count:
          return rows
  raise ValueError(f"found {len(rows)} of {count} pairs in {len(paths)} files: ask for fewer")


def make_splits(n_train: int, n_eval: int, seed: int, context: int, per_file: int, mid_line):
  """(train rows, eval rows): from pystdlib's train and validation files respectively."""
  files = pystdlib.list_files(pystdlib.stdlib_dir())
  taken, splits = set(), {}
  for name, split, count in (("train", "train", n_train), ("eval", "validation", n_eval)):
    rng = random.Random(f"{seed}:{name}")  # eval rows do not depend on --train
    paths = [p for p in files if pystdlib.split_of(p) == split]
    rng.shuffle(paths)
    splits[name] = collect(paths, count, rng, context, per_file, mid_line, taken)
  return splits["train"], splits["eval"]


def main(argv) -> None:
  del argv
  f = FLAGS
  if not f.out_dir:
    raise app.UsageError("--out_dir is required")
  train, held_out = make_splits(f.train, f.eval, f.seed, f.context, f.per_file, f.mid_line)
  os.makedirs(f.out_dir, exist_ok=True)
  for name, rows in (("train", train), ("eval", held_out)):
    with open(os.path.join(f.out_dir, f"{name}.jsonl"), "w") as out:
      out.writelines(json.dumps(r) + "\n" for r in rows)
  n_files = len({r["file"] for r in train}), len({r["file"] for r in held_out})
  print(
    f"wrote {len(train)} train pairs ({n_files[0]} files) and {len(held_out)} eval pairs "
    f"({n_files[1]} files) to {f.out_dir}"
  )


if __name__ == "__main__":
  app.run(main)
