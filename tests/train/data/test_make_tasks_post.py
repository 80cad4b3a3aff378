"""python -m train.data.make_instruct_task and make_preference_task: the post-training sets.
Instruct answers are checked against `answer`, preference rows against Python's own tokenizer
and the stdlib files they quote; both read back through train.data.chat with nothing skipped."""

import io
import json
import math
import tokenize

import pytest
from absl import flags
from absl.testing import flagsaver

from train.data import chat, make_instruct_task, make_preference_task, pystdlib
from train.data.make_preference_task import prefers_single_quotes, property_rate


def run_main(module, **flag_values) -> None:
  """The command's main in this process, with these flags set."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**flag_values):
    module.main([])


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def instruct_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("instruct")
  run_main(make_instruct_task, out_dir=str(out), train=600, eval=100, seed=3)
  return out


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("prefs")
  run_main(make_preference_task, out_dir=str(out), train=60, eval=30, seed=1)
  return out


# ---- instruct


def test_answer_of_each_instruction():
  assert make_instruct_task.answer("reverse: kqzt") == "tzqk"
  assert make_instruct_task.answer("sort: kqzt") == "kqtz"
  assert make_instruct_task.answer("count: kqzta") == "5"
  assert make_instruct_task.answer("upper: kqzt") == "KQZT"
  with pytest.raises(ValueError, match="expected"):
    make_instruct_task.answer("shout: kqzt")


def test_instruct_rows_are_prompts_with_their_answers(instruct_dir):
  tasks = set()
  for split, count in (("train", 600), ("eval", 100)):
    rows = read_jsonl(instruct_dir / f"{split}.jsonl")
    assert len(rows) == count
    for r in rows:
      user, assistant = r["messages"]
      assert user["role"] == "user" and assistant["role"] == "assistant"
      task, letters = user["content"].split(": ")
      assert 3 <= len(letters) <= 8 and letters.isalpha() and letters.islower()
      assert assistant["content"] == make_instruct_task.answer(user["content"])
      tasks.add(task)
  assert tasks == set(make_instruct_task.TASKS)


def test_instruct_eval_prompts_are_not_in_train(instruct_dir):
  prompts = {
    split: [r["messages"][0]["content"] for r in read_jsonl(instruct_dir / f"{split}.jsonl")]
    for split in ("train", "eval")
  }
  assert len(set(prompts["train"])) == 600 and len(set(prompts["eval"])) == 100
  assert not set(prompts["train"]) & set(prompts["eval"])


def test_instruct_reads_back_as_conversations(instruct_dir):
  for split, count in (("train", 600), ("eval", 100)):
    convs, counts = chat.read_conversations(str(instruct_dir / f"{split}.jsonl"))
    assert len(convs) == counts.read == count and not counts.skipped


def test_instruct_is_deterministic_given_the_seed():
  one = make_instruct_task.make_splits(50, 10, list(make_instruct_task.TASKS), 3, 8, seed=7)
  assert one == make_instruct_task.make_splits(50, 10, list(make_instruct_task.TASKS), 3, 8, 7)
  assert one != make_instruct_task.make_splits(50, 10, list(make_instruct_task.TASKS), 3, 8, 8)


# ---- preference


def test_prefers_single_quotes_reads_the_first_literal():
  assert prefers_single_quotes("x = f('a', \"b\")") is True
  assert prefers_single_quotes("x = f(\"a\", 'b')") is False
  assert prefers_single_quotes('# don\'t\nx = "a"') is False  # a comment's quote is no literal
  assert prefers_single_quotes("return r'\\d+'") is True
  assert prefers_single_quotes('"""doc"""') is False
  assert prefers_single_quotes("x = y + 1") is None
  assert prefers_single_quotes("it's") is None  # an apostrophe opens no finished literal
  assert property_rate(["f('a')", 'f("a")', "f('b')", "g()"]) == (2 / 3, 3)
  rate, counted = property_rate(["g()"])
  assert math.isnan(rate) and counted == 0


def string_tokens_on(path: str, line: int) -> list[tuple[str, bool]]:
  """(text, whether it spans more than one line) of each string token Python's own tokenizer
  finds touching `line` (1-based) of the stdlib file."""
  text = make_preference_task.read_source(path)
  kinds = {tokenize.STRING, getattr(tokenize, "FSTRING_START", -1)}
  return [
    (t.string, t.start[0] != t.end[0])
    for t in tokenize.generate_tokens(io.StringIO(text).readline)
    if t.type in kinds and t.start[0] <= line <= t.end[0]
  ]


def test_preference_rows_quote_the_stdlib_and_differ_only_in_quotes(prefs_dir):
  for split, count in (("train", 60), ("eval", 30)):
    rows = read_jsonl(prefs_dir / f"{split}.jsonl")
    assert len(rows) == count and len({r["prompt"] for r in rows}) == count
    for r in rows:
      source = make_preference_task.read_source(r["file"])
      line = source.split("\n")[r["line"] - 1]
      chosen, rejected, prompt = r["chosen"], r["rejected"], r["prompt"]
      # chosen is the true rest of the line, and the prompt the real text right before it
      assert line.endswith(chosen) and prompt.endswith(line[: len(line) - len(chosen)])
      assert (prompt + chosen + "\n") in source + "\n" and 0 < len(prompt) <= 200
      # rejected is chosen with single quotes made double, and nothing else
      assert chosen != rejected and len(chosen) == len(rejected)
      assert all(a == b or (a, b) == ("'", '"') for a, b in zip(chosen, rejected, strict=True))
      assert prefers_single_quotes(chosen) is True and prefers_single_quotes(rejected) is False
      # by Python's tokenizer: the line's strings are one-line, unprefixed, single-quoted, and
      # hold every quote of the line (none in a comment, a docstring or an escape)
      strings = string_tokens_on(r["file"], r["line"])
      assert strings and not any(multi for _, multi in strings), (r, strings)
      assert all(s[0] == s[-1] == "'" and "'" not in s[1:-1] for s, _ in strings), strings
      assert line.count("'") == 2 * len(strings) and '"' not in line and "\\" not in line


def test_preference_splits_come_from_disjoint_files(prefs_dir):
  files = {s: {r["file"] for r in read_jsonl(prefs_dir / f"{s}.jsonl")} for s in ("train", "eval")}
  assert not files["train"] & files["eval"]
  assert {pystdlib.split_of(f) for f in files["train"]} == {"train"}
  assert {pystdlib.split_of(f) for f in files["eval"]} == {"validation"}
  assert len(files["train"]) >= 60 // 4  # --per_file caps rows per file


def test_preference_reads_back_as_pairs(prefs_dir):
  for split, count in (("train", 60), ("eval", 30)):
    pairs, counts = chat.read_preferences(str(prefs_dir / f"{split}.jsonl"))
    assert len(pairs) == counts.read == count and not counts.skipped
    for chosen, rejected in pairs:
      assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"


def test_preference_is_deterministic_and_eval_ignores_train_size():
  one = make_preference_task.make_splits(20, 10, seed=5, context=200, per_file=4, mid_line=0.5)
  two = make_preference_task.make_splits(20, 10, seed=5, context=200, per_file=4, mid_line=0.5)
  more = make_preference_task.make_splits(40, 10, seed=5, context=200, per_file=4, mid_line=0.5)
  assert one == two and one[1] == more[1]
  assert one != make_preference_task.make_splits(20, 10, 6, 200, 4, 0.5)
