"""python -m train.data.make_ner_task: BIO tags of stdlib source lines, checked against Python's
tokenizer, and loadable by the NER task with the tag names it prints."""

import ast
import json
import keyword
import re
import subprocess
import sys

from configs import bert
from train.data.labeled import load_tagged
from train.data.tokenizers import ByteTokenizer

REPO = __file__.rsplit("/tests/", 1)[0]
TAGS = "O,B-CALL,I-CALL,B-DEF,I-DEF,B-STR,I-STR,B-NUM,I-NUM"


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
  """(type, start, end) spans of a valid BIO sequence."""
  out = []
  for i, t in enumerate(tags):
    if t.startswith("B-"):
      out.append((t[2:], i, i + 1))
    elif t.startswith("I-"):
      assert out and out[-1][0] == t[2:] and out[-1][2] == i, tags  # I- continues its B-
      out[-1] = (t[2:], out[-1][1], i + 1)
  return out


def test_tags_follow_pythons_tokenizer(tmp_path):
  path = tmp_path / "ner.jsonl"
  cmd = [sys.executable, "-m", "train.data.make_ner_task", f"--output={path}"]
  out = subprocess.run(
    [*cmd, "--packages=json", "--max_records=300"], cwd=REPO, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr
  assert f"--config.task.tag_names={TAGS}" in out.stdout
  records = [json.loads(line) for line in path.read_text().splitlines()]
  assert 50 < len(records) <= 300
  seen = set()
  for r in records:
    words, tags = r["tokens"], r["tags"]
    assert len(words) == len(tags) and 4 <= len(words) <= 40 and r["file"].startswith("json/")
    assert set(tags) <= set(TAGS.split(","))
    called = set()
    for kind, a, b in entities(tags):
      seen.add(kind)
      span = words[a:b]
      if kind == "CALL":  # a (dotted) name right before "("
        assert b < len(words) and words[b] == "(", (words, tags)
        assert all(w.isidentifier() for w in span[::2]) and set(span[1::2]) <= {"."}
        assert not keyword.iskeyword(span[-1]), (words, tags)  # `if (` is no call
        assert a == 0 or words[a - 1] != "." or not words[a - 2].isidentifier()  # whole chain
        called.add(b)
      elif kind == "DEF":
        assert b - a == 1 and words[a - 1] in ("def", "class")
      elif kind == "STR":
        node = ast.parse(span[0], mode="eval").body  # a literal or an f-string
        assert b - a == 1 and isinstance(node, ast.Constant | ast.JoinedStr), span
        assert isinstance(node, ast.JoinedStr) or isinstance(node.value, str | bytes)
      else:
        assert b - a == 1 and re.fullmatch(r"[0-9][0-9_.xXoObBeEjJa-fA-F+-]*", span[0])
    # every "(" right after a name the tagger left untagged follows a keyword (if, in, ...)
    for i, w in enumerate(words):
      if w == "(" and i and words[i - 1].isidentifier() and tags[i - 1] == "O":
        assert keyword.iskeyword(words[i - 1]), (words, tags)
  assert seen == {"CALL", "DEF", "STR", "NUM"}

  config = bert.get_config("size=tiny,task=ner")
  config.data.name = f"jsonl:{path}"
  config.data.seq_len = 128
  config.task.update(tokens_field="tokens", label_field="tags", tag_names=TAGS)
  rows = load_tagged(config, ByteTokenizer(), "train")
  assert len(rows["tokens"]) == len(records) - len(records) // 10
