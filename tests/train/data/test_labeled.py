"""Labeled examples for fine-tuning: the [CLS] a [SEP] (b [SEP]) row layout and truncation,
JSONL and TFDS sources with errors that name file and line, and the train / eval iterators
(checkpointable, reshuffled, split across processes, padded last batch)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import bert
from modeling.vocab import CLS_ID, NUM_SPECIAL, SEP_ID
from train.data import validate_source
from train.data.labeled import (
  encode_rows,
  labeled_eval_batches,
  labeled_train_iterator,
  load_labeled,
)
from train.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
C, S = CLS_ID, SEP_ID


def ids(text: str) -> list[int]:
  return [b + NUM_SPECIAL for b in text.encode()]


def labeled_config(name: str, task: str = "classify", seq_len: int = 16, **task_keys):
  c = bert.get_config(f"size=tiny,task={task}")
  c.data.name = name
  c.data.text_field = "text"
  c.data.seq_len = seq_len
  c.task.text_pair_field = ""
  c.task.update(task_keys)
  return c


def write_lines(path, lines: list) -> str:
  """JSONL from records (dicts) and raw lines (str); returns the `jsonl:` source name."""
  path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
  return f"jsonl:{path}"


def rows_of(n: int, seq_len: int = 12) -> dict[str, np.ndarray]:
  """n single-text rows labeled 0..n-1, each text distinct."""
  rows, _ = encode_rows([(f"t{i}", None) for i in range(n)], TOK, seq_len)
  rows["label"] = np.arange(n, dtype=np.int32)
  rows["weight"] = np.ones(n, np.float32)
  return rows


# --- row layout ------------------------------------------------------------------------------


def test_single_text_rows():
  rows, truncated = encode_rows([("abc", None), ("hello!", None), ("", None)], TOK, 8)
  assert truncated == 0
  assert set(rows) == {"tokens", "token_types", "segment_ids", "positions"}
  assert all(v.shape == (3, 8) and v.dtype == np.int32 for v in rows.values())
  np.testing.assert_array_equal(
    rows["tokens"],
    [[C, *ids("abc"), S, 0, 0, 0], [C, *ids("hello!"), S], [C, S, 0, 0, 0, 0, 0, 0]],
  )
  np.testing.assert_array_equal(rows["token_types"], np.zeros((3, 8)))
  np.testing.assert_array_equal(rows["segment_ids"], [[1] * 5 + [0] * 3, [1] * 8, [1, 1] + [0] * 6])
  np.testing.assert_array_equal(
    rows["positions"], [[0, 1, 2, 3, 4, 0, 0, 0], list(range(8)), [0, 1] + [0] * 6]
  )


def test_pair_rows():
  rows, truncated = encode_rows([("ab", "xyz"), ("q", "")], TOK, 10)
  assert truncated == 0
  np.testing.assert_array_equal(
    rows["tokens"],
    [[C, *ids("ab"), S, *ids("xyz"), S, 0, 0], [C, *ids("q"), S, S, 0, 0, 0, 0, 0, 0]],
  )
  np.testing.assert_array_equal(
    rows["token_types"], [[0] * 4 + [1] * 4 + [0] * 2, [0, 0, 0, 1] + [0] * 6]
  )
  np.testing.assert_array_equal(rows["segment_ids"], [[1] * 8 + [0] * 2, [1] * 4 + [0] * 6])
  np.testing.assert_array_equal(rows["positions"], [[*range(8), 0, 0], [0, 1, 2, 3] + [0] * 6])


def test_truncation_cuts_the_longer_text_and_counts_rows():
  texts = [
    ("a" * 8, None),  # exactly fills 10: not truncated
    ("a" * 9, None),
    ("a" * 10, "bb"),  # the pair has room for 7 tokens: the short text stays whole
    ("aa", "b" * 10),
    ("a" * 10, "b" * 9),  # both long: cut alternately, down to 3 + 4 or 4 + 3
    ("a" * 4, "b" * 3),  # exactly fills 10
  ]
  rows, truncated = encode_rows(texts, TOK, 10)
  assert truncated == 4
  tokens = rows["tokens"]
  np.testing.assert_array_equal(tokens[0], [C, *ids("a" * 8), S])
  np.testing.assert_array_equal(tokens[1], [C, *ids("a" * 8), S])
  np.testing.assert_array_equal(tokens[2], [C, *ids("a" * 5), S, *ids("bb"), S])
  np.testing.assert_array_equal(tokens[3], [C, *ids("aa"), S, *ids("b" * 5), S])
  np.testing.assert_array_equal(tokens[5], [C, *ids("aaaa"), S, *ids("bbb"), S])
  kept_a, kept_b = (int((tokens[4] == ids(ch)[0]).sum()) for ch in "ab")
  assert kept_a + kept_b == 7 and abs(kept_a - kept_b) == 1, tokens[4]
  assert (rows["segment_ids"] == 1).all()  # every row is full
  np.testing.assert_array_equal(rows["token_types"][4], [0] * (kept_a + 2) + [1] * (kept_b + 1))


@pytest.mark.parametrize(("pair", "seq_len"), [(None, 3), ("b", 4)], ids=["single", "pair"])
def test_seq_len_too_short_is_refused(pair, seq_len):
  for too_short in (1, seq_len):
    with pytest.raises(ValueError, match=f"data.seq_len={too_short}: too short"):
      encode_rows([("a", pair)], TOK, too_short)
  # One more fits a token of each text, cut from longer ones: two texts cut to one token each.
  rows, truncated = encode_rows([("abc", pair and "bcd")], TOK, seq_len + 1)
  want = [C, *ids("ab"), S] if pair is None else [C, *ids("a"), S, *ids("b"), S]
  np.testing.assert_array_equal(rows["tokens"][0], want)
  assert truncated == 1


# --- JSONL sources ---------------------------------------------------------------------------


GOOD = {"text": "fine", "label": 1, "other": "pair", "score": 0.5}
BAD_ROWS = {
  "no-text": ({"label": 0}, {}, "no field 'text' (data.text_field='text')"),
  "no-label": ({"text": "x"}, {}, "no field 'label' (task.label_field='label')"),
  "no-pair": (
    {"text": "x", "label": 0},
    {"text_pair_field": "other"},
    "no field 'other' (task.text_pair_field='other')",
  ),
  "label-too-big": (dict(GOOD, label=2), {}, "label 2 is not a class id in [0, 2)"),
  "label-negative": (dict(GOOD, label=-1), {}, "label -1 is not a class id in [0, 2)"),
  "label-float": (dict(GOOD, label=1.0), {}, "label 1.0 is not a class id"),
  "label-string": (dict(GOOD, label="1"), {}, "label '1' is not a class id"),
  "label-bool": (dict(GOOD, label=True), {}, "label True is not a class id"),
  "many-labels": (dict(GOOD, label=2), {"num_labels": 3}, None),  # fine with 3 classes
}


@pytest.mark.parametrize("case", BAD_ROWS, ids=list(BAD_ROWS))
def test_jsonl_label_and_field_errors_name_file_and_line(case, tmp_path):
  record, task_keys, error = BAD_ROWS[case]
  path = tmp_path / "rows.jsonl"
  config = labeled_config(write_lines(path, [GOOD, "", record, GOOD]), **task_keys)
  if error is None:
    rows = load_labeled(config, TOK, "train", regression=False)
    np.testing.assert_array_equal(rows["label"], [1, 2, 1])
    return
  with pytest.raises(ValueError) as e:
    load_labeled(config, TOK, "train", regression=False)
  assert str(e.value).startswith(f"{path}:3: "), str(e.value)  # the blank line 2 counts
  assert error in str(e.value), str(e.value)


@pytest.mark.parametrize(
  ("label", "shown"), [("high", "'high'"), (None, "None"), ([1.0], "[1.0]")], ids=str
)
def test_jsonl_regression_label_must_be_a_number(label, shown, tmp_path):
  path = tmp_path / "rows.jsonl"
  config = labeled_config(write_lines(path, [GOOD, dict(GOOD, label=label)]), task="regress")
  with pytest.raises(ValueError, match="not a number") as e:
    load_labeled(config, TOK, "train", regression=True)
  assert str(e.value).startswith(f"{path}:2: label {shown} is not a number"), str(e.value)


@pytest.mark.parametrize(
  ("line", "error"),
  [('{"text": "a", "label"', "not valid JSON"), ("[1, 2]", "not a JSON object")],
  ids=["invalid", "not-an-object"],
)
def test_jsonl_syntax_errors_name_file_and_line(line, error, tmp_path):
  path = tmp_path / "rows.jsonl"
  # Past the 90% cut too: every line is parsed whichever split is asked for.
  name = write_lines(path, [GOOD] * 30 + [line])
  for split in ("train", "validation"):
    with pytest.raises(ValueError) as e:
      load_labeled(labeled_config(name), TOK, split, regression=False)
    assert f"data.name={name!r}: {path}:31: {error}" in str(e.value), str(e.value)


def test_jsonl_splits_and_label_dtypes(tmp_path):
  records = [{"text": f"row {i}", "label": i % 2, "score": i / 4} for i in range(25)]
  name = write_lines(tmp_path / "rows.jsonl", records)
  classify = labeled_config(name, seq_len=12)
  train = load_labeled(classify, TOK, "train", regression=False)
  val = load_labeled(classify, TOK, "validation", regression=False)
  assert len(train["label"]) == 23 and len(val["label"]) == 2  # the last 10%, rounded down
  assert train["label"].dtype == np.int32 and train["weight"].dtype == np.float32
  np.testing.assert_array_equal(train["weight"], np.ones(23))
  np.testing.assert_array_equal(val["tokens"][1], [C, *ids("row 24"), S, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.concatenate([train["label"], val["label"]]), np.arange(25) % 2)

  classify.data.eval_name = name
  everything = load_labeled(classify, TOK, "all", regression=False)
  np.testing.assert_array_equal(everything["label"], np.arange(25) % 2)

  regress = labeled_config(name, task="regress", seq_len=12, label_field="score")
  assert regress.task.text_pair_field == ""
  scores = load_labeled(regress, TOK, "train", regression=True)["label"]
  assert scores.dtype == np.float32
  np.testing.assert_array_equal(scores, np.arange(23, dtype=np.float32) / 4)
  ints = load_labeled(labeled_config(name, task="regress", seq_len=12), TOK, "train", True)
  assert ints["label"].dtype == np.float32 and ints["label"][1] == 1.0


def test_text_sources_have_no_labels():
  for name in ("pystdlib", "text:/tmp/*.txt"):
    with pytest.raises(ValueError, match="needs labeled examples"):
      load_labeled(labeled_config(name), TOK, "train", regression=False)


def test_truncation_is_logged_with_a_count(tmp_path, caplog):
  texts = ["short", "x" * 40, "also short", "y" * 15, "z" * 14] + ["ok"] * 5
  name = write_lines(tmp_path / "rows.jsonl", [{"text": t, "label": 0} for t in texts])
  config = labeled_config(name, seq_len=16)  # room for 14 bytes
  with caplog.at_level(logging.WARNING):
    load_labeled(config, TOK, "train", regression=False)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"{name} train: 2 of 9 examples are longer than data.seq_len=16" in " ".join(warnings)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    load_labeled(config, TOK, "validation", regression=False)  # just "ok": nothing cut
  assert not [r for r in caplog.records if "truncated" in r.getMessage()]


# --- eval batches ----------------------------------------------------------------------------


def test_eval_batches_cover_every_example_once_in_order():
  rows = rows_of(11)
  batches = list(labeled_eval_batches(rows, batch_size=4))
  assert len(batches) == 3
  for b in batches:
    assert set(b) == set(rows) and all(v.shape[0] == 4 for v in b.values())
  last = batches[-1]
  np.testing.assert_array_equal(last["weight"], [1, 1, 1, 0])
  assert (last["segment_ids"][3] == 0).all() and (last["segment_ids"][:3].sum(1) > 0).all()
  real = {k: np.concatenate([b[k] for b in batches])[:11] for k in rows}
  for k in rows:
    np.testing.assert_array_equal(real[k], rows[k], err_msg=k)
  np.testing.assert_array_equal(rows["weight"], np.ones(11))  # the source is left alone
  np.testing.assert_array_equal(rows["segment_ids"][0], [1] * 4 + [0] * 8)

  assert len(list(labeled_eval_batches(rows, batch_size=4, max_batches=2))) == 2
  assert len(list(labeled_eval_batches(rows, batch_size=4, max_batches=5))) == 3
  exact = list(labeled_eval_batches(rows_of(8), batch_size=4))
  assert len(exact) == 2 and all((b["weight"] == 1).all() for b in exact)


@pytest.mark.parametrize("n", [9, 11, 16])
def test_two_processes_eval_batches_concatenate_to_the_global_ones(n):
  rows = rows_of(n)
  whole = list(labeled_eval_batches(rows, batch_size=4))
  parts = [
    list(labeled_eval_batches(rows, batch_size=2, process_index=p, process_count=2)) for p in (0, 1)
  ]
  assert len(parts[0]) == len(parts[1]) == len(whole)  # every process steps alike
  for g, (a, b) in enumerate(zip(*parts, strict=True)):
    for k in rows:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[g][k], err_msg=k)
  weight = np.concatenate([b["weight"] for b in whole])
  assert weight.sum() == n and (weight[n:] == 0).all()
  with pytest.raises(ValueError, match="process_index=2"):
    next(labeled_eval_batches(rows, batch_size=2, process_index=2, process_count=2))


# --- train iterator --------------------------------------------------------------------------


def labels_of(it, n: int) -> np.ndarray:
  return np.stack([next(it)["label"] for _ in range(n)])


def test_train_iterator_reshuffles_every_epoch():
  rows = rows_of(10)
  it = labeled_train_iterator(rows, batch_size=5, seed=0)
  first = next(it)
  assert set(first) == set(rows) and first["tokens"].shape == (5, 12)
  i = first["label"]
  np.testing.assert_array_equal(first["tokens"], rows["tokens"][i])
  epochs = np.concatenate([i, labels_of(it, 7).ravel()]).reshape(4, 10)
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))
  assert len({tuple(e) for e in epochs}) == 4, epochs
  assert list(epochs[0]) != list(range(10))
  other = labeled_train_iterator(rows, batch_size=5, seed=1)
  assert labels_of(other, 2).ravel().tolist() != epochs[0].tolist()


def test_train_iterator_resumes_from_its_state():
  rows = rows_of(10)
  it = labeled_train_iterator(rows, batch_size=4, seed=3)
  labels_of(it, 3)  # into the second epoch, mid-batch across the boundary
  state = json.loads(json.dumps(it.get_state()))  # the checkpoint holds JSON
  want = labels_of(it, 6)
  resumed = labeled_train_iterator(rows, batch_size=4, seed=3)
  resumed.set_state(state)
  np.testing.assert_array_equal(labels_of(resumed, 6), want)
  fresh = labeled_train_iterator(rows, batch_size=4, seed=3)
  assert not np.array_equal(labels_of(fresh, 6), want)


def test_train_iterator_with_a_shard_per_process_reads_disjoint_examples():
  """data.shards = processes (the pod setting): example k is read by process k % 2 only.
  (With the default one shard every process deals from the one global order:
  tests/train/data/test_finetune_processes.py.)"""
  rows = rows_of(10)
  seen = [
    labels_of(
      labeled_train_iterator(
        rows, batch_size=5, seed=0, process_index=p, process_count=2, shards=2
      ),
      4,
    )
    for p in (0, 1)
  ]
  assert set(seen[0].ravel()) == {0, 2, 4, 6, 8} and set(seen[1].ravel()) == {1, 3, 5, 7, 9}


def test_train_iterator_needs_a_full_batch():
  with pytest.raises(ValueError, match="3 training examples .* cannot fill its 4 rows"):
    labeled_train_iterator(rows_of(3), batch_size=4, seed=0)
  with pytest.raises(ValueError, match="7 training examples .* cannot fill its 8 rows"):
    labeled_train_iterator(rows_of(7), batch_size=4, seed=0, process_index=1, process_count=2)
  with pytest.raises(ValueError, match=r"3 training examples \(shard 1 of data.shards=2\)"):
    labeled_train_iterator(
      rows_of(7), batch_size=4, seed=0, process_index=1, process_count=2, shards=2
    )
  labeled_train_iterator(rows_of(8), batch_size=4, seed=0, process_index=1, process_count=2)


# --- TFDS (mocked) with the configs/bert.py task defaults -----------------------------------


def glue_config(task: str, seq_len: int):
  """configs/bert.py's defaults for the task. The trainer validates `data.name` before it
  loads anything, which registers TFDS's text datasets (glue among them): so do we."""
  config = bert.get_config(f"size=tiny,task={task}")
  config.data.seq_len = seq_len
  validate_source(config.data.name)
  return config


def test_sst2_mock_loads_with_the_classify_defaults():
  config = glue_config("classify", seq_len=48)
  assert (config.data.name, config.data.text_field) == ("glue/sst2", "sentence")
  with tfds.testing.mock_data(num_examples=12):
    for split in ("train", "validation"):
      rows = load_labeled(config, TOK, split, regression=False)
      assert rows["tokens"].shape == (12, 48) and rows["label"].shape == (12,)
      assert rows["label"].dtype == np.int32 and set(rows["label"]) <= {0, 1}
      assert (rows["tokens"][:, 0] == C).all() and (rows["token_types"] == 0).all()
      assert (rows["segment_ids"].sum(1) > 2).all()
      np.testing.assert_array_equal(rows["weight"], np.ones(12))


def test_stsb_mock_loads_pairs_with_the_regress_defaults():
  config = glue_config("regress", seq_len=64)
  assert (config.data.name, config.data.text_field) == ("glue/stsb", "sentence1")
  assert config.task.text_pair_field == "sentence2"
  with tfds.testing.mock_data(num_examples=12):
    rows = load_labeled(config, TOK, "validation", regression=True)
  assert rows["tokens"].shape == (12, 64) and rows["label"].dtype == np.float32
  assert np.isfinite(rows["label"]).all() and len(set(rows["label"])) > 1
  assert (rows["token_types"] == 1).any(1).all()  # every row has its second sentence
  assert ((rows["tokens"] == S).sum(1) == 2).all()
  # The second sentence's tokens (type 1) are all real tokens.
  assert (rows["segment_ids"][rows["token_types"] == 1] == 1).all()


def test_tfds_field_names_are_checked():
  config = glue_config("classify", seq_len=16)
  config.data.text_field = "text"
  with (
    tfds.testing.mock_data(num_examples=4),
    pytest.raises(ValueError, match="data.text_field='text': not a feature of 'glue/sst2'"),
  ):
    load_labeled(config, TOK, "train", regression=False)
