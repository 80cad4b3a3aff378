"""Writes a token-classification set from the Python standard library: the words of a source
line are its Python tokens, and the entities are found by Python's own tokenizer, never by hand.
Real text, made offline, reproducible.

  python -m train.data.make_ner_task --output=runs/stdlib_ner.jsonl

Entity types, tagged BIO (task.tag_names=O,B-CALL,I-CALL,B-DEF,I-DEF,B-STR,I-STR,B-NUM,I-NUM):
  CALL  what a call calls: a name or dotted name right before "(" (`os.path.join` is 5 words)
  DEF   the name a `def` or `class` statement defines
  STR   a string literal
  NUM   a number literal
A name is a CALL or not by what follows it, so the tags need context on both sides.

Each JSONL record is `{"tokens": [...], "tags": [...], "file": <path relative to the stdlib>}`,
one logical line of `--min_words` to `--max_words` tokens (lines holding a multi-line token or
an f-string are skipped). Lines come from the `.py` files of `--packages`, shuffled with
`--seed`, so the last 10% (fourfold's validation split for local JSONL) mixes files.
"""

from __future__ import annotations

import collections
import io
import json
import keyword
import os
import random
import sysconfig
import tokenize

from absl import app, flags

TAG_NAMES = ["O", "B-CALL", "I-CALL", "B-DEF", "I-DEF", "B-STR", "I-STR", "B-NUM", "I-NUM"]
SKIPPED = {tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
SKIPPED |= {getattr(tokenize, "TYPE_COMMENT", -1)}
FSTRING = {getattr(tokenize, n, -1) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")}

FLAGS = flags.FLAGS
flags.DEFINE_string("output", None, "JSONL file to write")
flags.DEFINE_list(
  "packages", ["asyncio", "email", "unittest", "xml", "json", "http"], "stdlib packages read"
)
flags.DEFINE_integer("min_words", 4, "shortest line kept, in tokens")
flags.DEFINE_integer("max_words", 40, "longest line kept, in tokens")
flags.DEFINE_integer("max_records", 8000, "lines kept (after shuffling)")
flags.DEFINE_integer("seed", 0, "shuffle seed")


def tag_line(toks: list[tokenize.TokenInfo]) -> list[str]:
  """BIO tags of one logical line's tokens."""
  words = [t.string for t in toks]
  tags = ["O"] * len(toks)
  for i, t in enumerate(toks):
    if t.type == tokenize.STRING:
      tags[i] = "B-STR"
    elif t.type == tokenize.NUMBER:
      tags[i] = "B-NUM"
    elif t.type == tokenize.NAME and i and words[i - 1] in ("def", "class"):
      tags[i] = "B-DEF"
    elif t.type == tokenize.OP and t.string == "(" and i:
      end = i - 1  # the callee: NAME (. NAME)* ending right before "("
      if toks[end].type != tokenize.NAME or keyword.iskeyword(words[end]) or tags[end] != "O":
        continue
      start = end
      while start >= 2 and words[start - 1] == "." and toks[start - 2].type == tokenize.NAME:
        start -= 2
      tags[start] = "B-CALL"
      for j in range(start + 1, end + 1):
        tags[j] = "I-CALL"
  return tags


def lines_of(source: str) -> list[list[tokenize.TokenInfo]]:
  """The logical lines of a module as token lists (NEWLINE ends one)."""
  out, line = [], []
  try:
    for t in tokenize.generate_tokens(io.StringIO(source).readline):
      if t.type == tokenize.NEWLINE:
        out.append(line)
        line = []
      elif t.type not in SKIPPED:
        line.append(t)
  except (tokenize.TokenError, SyntaxError):  # a file tokenize cannot read: keep what it read
    pass
  return out


def make_records(
  packages: list[str], min_words: int, max_words: int, max_records: int, seed: int
) -> list[dict]:
  stdlib = sysconfig.get_paths()["stdlib"]
  records = []
  for package in packages:
    path = os.path.join(stdlib, package)
    if not os.path.isdir(path):
      raise ValueError(f"--packages: {package!r} is not a package directory in {stdlib}")
    for root, _, files in sorted(os.walk(path)):
      for name in sorted(f for f in files if f.endswith(".py")):
        file = os.path.join(root, name)
        rel = os.path.relpath(file, stdlib)
        with open(file, encoding="utf-8", errors="replace") as f:
          source = f.read()
        for toks in lines_of(source):
          words = [t.string for t in toks]
          if not min_words <= len(words) <= max_words:
            continue
          if any("\n" in w for w in words) or any(t.type in FSTRING for t in toks):
            continue
          records.append({"tokens": words, "tags": tag_line(toks), "file": rel})
  random.Random(seed).shuffle(records)
  return records[:max_records]


def main(argv) -> None:
  del argv
  records = make_records(
    FLAGS.packages, FLAGS.min_words, FLAGS.max_words, FLAGS.max_records, FLAGS.seed
  )
  if not records:
    raise ValueError(
      f"--packages={FLAGS.packages}: no lines of {FLAGS.min_words} to {FLAGS.max_words} tokens"
    )
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
  with open(FLAGS.output, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  entities = collections.Counter(t[2:] for r in records for t in r["tags"] if t.startswith("B-"))
  print(
    f"wrote {len(records)} lines to {FLAGS.output}; entities {dict(entities)}; "
    f"--config.task.tag_names={','.join(TAG_NAMES)}"
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("output")
  app.run(main)
