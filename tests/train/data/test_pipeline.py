"""Packing, shuffling, checkpointing and evaluation batches of the data pipeline."""

from __future__ import annotations

import itertools
import json
import pathlib
import random
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import base
from modeling.vocab import EOS_ID, NUM_SPECIAL
from train.data import pipeline
from train.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()


def _cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def _docs(n: int, seed: int = 0) -> list[str]:
  """Distinct documents of varied length (some longer than a row)."""
  rng = random.Random(seed)
  return [
    f"<{i}:" + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, 40))) + ">"
    for i in range(n)
  ]


def _jsonl(tmp_path: pathlib.Path, docs: list[str]) -> str:
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return f"jsonl:{path}"


def _rows(batches) -> np.ndarray:
  return np.concatenate([b["tokens"] for b in batches])


def _stream_docs(tokens_RL: np.ndarray) -> list[str]:
  """The documents of a packed stream, in order (padding dropped, split at EOS)."""
  flat = tokens_RL.reshape(-1)
  flat = flat[flat != 0]
  pieces = np.split(flat, np.flatnonzero(flat == EOS_ID) + 1)
  return [BYTES.decode(p) for p in pieces if len(p) and p[-1] == EOS_ID]


def test_eval_packing_matches_hand_computation(tmp_path):
  cfg = _cfg(eval_name=_jsonl(tmp_path, ["abc", "de", "fghijk"]), seq_len=6)
  batches = list(pipeline.eval_batches(cfg, BYTES, batch_size=2))
  t = {c: ord(c) + NUM_SPECIAL for c in "abcdefghijk"}
  E = EOS_ID
  # Docs with EOS: [a b c E] [d e E] [f g h i j k E], cut into rows of 6.
  tokens = [
    [t["a"], t["b"], t["c"], E, t["d"], t["e"]],
    [E, t["f"], t["g"], t["h"], t["i"], t["j"]],
    [t["k"], E, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],  # padding row of the final batch
  ]
  segment_ids = [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0], [0] * 6]
  positions = [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4], [0, 1, 0, 0, 0, 0], [0] * 6]
  assert len(batches) == 2
  for key, expected in [("tokens", tokens), ("segment_ids", segment_ids), ("positions", positions)]:
    got = np.concatenate([b[key] for b in batches])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.array(expected), err_msg=key)


def test_train_packing_matches_hand_computation(tmp_path):
  (tmp_path / "doc.txt").write_bytes(b"abcde")  # 5 bytes: all of it is train
  cfg = _cfg(name=f"text:{tmp_path}/doc.txt", seq_len=4, shuffle_window=1)
  a, b, c, d, e = (ord(ch) + NUM_SPECIAL for ch in "abcde")
  E = EOS_ID
  # The stream a b c d e E a b c d e E ... cut into rows of 4; the second document of
  # row 1 starts a new segment at position 0, and each row starts at position 0.
  tokens = [[a, b, c, d], [e, E, a, b], [c, d, e, E]]
  segment_ids = [[1, 1, 1, 1], [1, 1, 2, 2], [1, 1, 1, 1]]
  positions = [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3]]
  for batch in itertools.islice(_train(cfg, batch_size=3), 2):
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["segment_ids"], segment_ids)
    np.testing.assert_array_equal(batch["positions"], positions)


def _check_row_structure(batch: dict[str, np.ndarray]) -> None:
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  for row_t, row_s, row_p in zip(tokens, seg, pos, strict=True):
    assert row_s[0] == 1 and row_p[0] == 0
    step = np.diff(row_s)
    assert set(step.tolist()) <= {0, 1}
    starts = np.flatnonzero(step == 1) + 1
    assert (row_p[starts] == 0).all()  # positions restart at each document start
    inside = np.flatnonzero(step == 0) + 1
    assert (row_p[inside] == row_p[inside - 1] + 1).all()
    assert (row_t[starts - 1] == EOS_ID).all()  # a document ends with EOS before the next


def _train(cfg, *, batch_size=2, seed=0, **kw):
  return pipeline.train_iterator(cfg, BYTES, batch_size=batch_size, seed=seed, **kw)


def test_train_batches_have_segment_structure(tmp_path):
  cfg = _cfg(name=_jsonl(tmp_path, _docs(50)), seq_len=32, shuffle_window=4)
  it = _train(cfg, batch_size=3)
  for batch in itertools.islice(it, 20):
    assert set(batch) == {"tokens", "segment_ids", "positions"}
    assert all(v.shape == (3, 32) and v.dtype == np.int32 for v in batch.values())
    assert (batch["segment_ids"] > 0).all()  # endless stream: no padding
    _check_row_structure(batch)


def _epochs(cfg, n_docs: int, n_epochs: int, **kw) -> list[list[str]]:
  """Documents of the first epochs of the (unshuffled-rows) stream, epoch by epoch."""
  rows = []
  docs: list[str] = []
  it = _train(cfg, **kw)
  while len(docs) <= n_docs * n_epochs:
    rows.append(next(it)["tokens"])
    docs = _stream_docs(np.concatenate(rows))
  return [docs[e * n_docs : (e + 1) * n_docs] for e in range(n_epochs)]


def test_every_document_once_per_epoch_in_a_new_order(tmp_path):
  corpus = _docs(60)
  cfg = _cfg(name=_jsonl(tmp_path, corpus), seq_len=16, shuffle_window=1)
  train_docs = corpus[:54]  # the last 10% of the records are validation
  epochs = _epochs(cfg, len(train_docs), 3)
  for epoch in epochs:
    assert sorted(epoch) == sorted(train_docs)
  assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
  assert epochs[0] != train_docs


def test_window_shuffle_permutes_rows_within_windows(tmp_path):
  cfg = _cfg(name=_jsonl(tmp_path, _docs(60)), seq_len=16, shuffle_window=1)
  plain = _rows(itertools.islice(_train(cfg), 24))
  cfg.shuffle_window = 8
  shuffled = _rows(itertools.islice(_train(cfg), 24))  # 48 rows: 6 windows of 8
  assert not np.array_equal(plain, shuffled)
  for w in range(6):
    window = slice(8 * w, 8 * (w + 1))
    assert sorted(map(tuple, plain[window])) == sorted(map(tuple, shuffled[window]))


def test_seeds_change_the_order(tmp_path):
  cfg = _cfg(name=_jsonl(tmp_path, _docs(60)), seq_len=16, shuffle_window=4)
  a = _rows(itertools.islice(_train(cfg, seed=0), 5))
  b = _rows(itertools.islice(_train(cfg, seed=1), 5))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, _rows(itertools.islice(_train(cfg, seed=0), 5)))


def test_processes_read_disjoint_shards(tmp_path):
  corpus = _docs(60)
  cfg = _cfg(name=_jsonl(tmp_path, corpus), seq_len=16, shuffle_window=1, shards=2)
  (p0,) = _epochs(cfg, 27, 1, process_index=0, process_count=2)
  (p1,) = _epochs(cfg, 27, 1, process_index=1, process_count=2)
  assert not set(p0) & set(p1)
  assert sorted(p0 + p1) == sorted(corpus[:54])


def _global_batches(cfg, count: int, steps: int, *, seed=0, states=None):
  """`steps` global batches of 8 rows from `count` simulated processes (each process's rows in
  order), and every process's JSON state after them; `states` resumes each process first."""
  its = [
    _train(cfg, batch_size=8 // count, seed=seed, process_index=i, process_count=count)
    for i in range(count)
  ]
  for it, state in zip(its, states or [], strict=False):
    it.set_state(state)
  batches = [
    {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    for parts in ([next(it) for it in its] for _ in range(steps))
  ]
  return batches, [json.loads(json.dumps(it.get_state())) for it in its]


def _text_corpus(tmp_path, separator: str) -> str:
  """One text file of `_docs` joined by `separator` (or by newlines), 10 KB."""
  (tmp_path / "corpus.txt").write_text((separator or "\n").join(_docs(400, seed=2)))
  return f"text:{tmp_path}/corpus.txt"


@pytest.mark.parametrize(("separator", "shards"), [("", 1), ("<|endoftext|>", 2)])
def test_global_batches_and_resume_do_not_depend_on_the_process_count(tmp_path, separator, shards):
  """One text file, without and with data.doc_separator, in pieces of data.span_bytes: one
  and two processes (simulated: their process_index / process_count) read the same global
  batches, with the default data.shards=1 (every process packs the one stream and keeps its
  rows) and with a shard per process; two processes resumed from their JSON states continue
  exactly."""
  cfg = _cfg(name=_text_corpus(tmp_path, separator), seq_len=16, shuffle_window=4)
  cfg.update(doc_separator=separator, span_bytes=256, shards=shards)
  one, _ = _global_batches(cfg, 1, 4)
  assert len({b["tokens"].tobytes() for b in one}) == 4
  two, _ = _global_batches(cfg, 2, 4)
  assert _same(two, one)
  _, states = _global_batches(cfg, 2, 2)
  assert _same(_global_batches(cfg, 2, 2, states=states)[0], one[2:])


def test_pystdlib_global_batches_do_not_depend_on_the_process_count(pystdlib_cfg):
  """The embedded corpus, no data flags: one process's global batches are two processes'."""
  cfg = _cfg(tfds_data_dir=pystdlib_cfg.tfds_data_dir, seq_len=32, shuffle_window=8)
  assert _same(_global_batches(cfg, 2, 3)[0], _global_batches(cfg, 1, 3)[0])


def test_pieces_are_framed_where_their_document_starts_and_ends(tmp_path):
  """A document read in pieces gets BOS (when the frame has one) before its first piece and
  EOS after its last, nothing between: the in-order stream is each document, framed once;
  every piece is its own segment (positions restart), as a document cut across rows is."""
  corpus = _text_corpus(tmp_path, "<|endoftext|>")
  cfg = _cfg(eval_name=corpus, seq_len=64, doc_separator="<|endoftext|>", span_bytes=12)
  frame = ((2,), (EOS_ID,))  # BOS ... EOS
  batches = list(pipeline.eval_batches(cfg, BYTES, batch_size=4, frame=frame))
  tokens = _rows(batches)
  stream = tokens[tokens != 0]
  expected = np.concatenate(
    [np.concatenate([[2], BYTES.encode(d), [EOS_ID]]) for d in _docs(400, seed=2) if d]
  )
  np.testing.assert_array_equal(stream, expected)
  segment_ids = np.concatenate([b["segment_ids"] for b in batches])
  starts = (np.diff(segment_ids, axis=1) == 1).sum() + (segment_ids[:, 0] > 0).sum()
  assert starts > len(_docs(400)) + 100  # pieces of 12 bytes: far more segments than documents


def _same(a: list[dict], b: list[dict]) -> bool:
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_resume_from_json_state_is_exact(tmp_path):
  cfg = _cfg(name=_jsonl(tmp_path, _docs(40)), seq_len=16, shuffle_window=5)
  reference = list(itertools.islice(_train(cfg), 45))
  it = _train(cfg)
  for k in range(24):  # every position; the first states have no packing remainder
    state = json.loads(json.dumps(it.get_state()))
    restored = _train(cfg)
    restored.set_state(state)
    assert _same(list(itertools.islice(restored, 5)), reference[k : k + 5]), k
    next(it)


def test_resume_with_default_window_is_fast_and_exact(pystdlib_cfg):
  it = _train(pystdlib_cfg, batch_size=16, seed=3)
  for _ in range(300):  # past the first 4096-row window
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = list(itertools.islice(it, 3))
  start = time.perf_counter()
  restored = _train(pystdlib_cfg, batch_size=16, seed=3)
  restored.set_state(state)
  got = list(itertools.islice(restored, 3))
  elapsed = time.perf_counter() - start
  assert _same(got, expected)
  assert elapsed < 10, elapsed


@pytest.fixture(scope="module")
def pystdlib_cfg(tmp_path_factory):
  return _cfg(tfds_data_dir=str(tmp_path_factory.mktemp("tfds")))  # builds in about a second


def test_pystdlib_default_is_python_source(pystdlib_cfg):
  batch = next(_train(pystdlib_cfg, batch_size=4))
  assert batch["tokens"].shape == (4, 256)
  text = BYTES.decode(batch["tokens"])
  assert sum(w in text for w in ("def ", "import ", "return", "self")) >= 2


@pytest.mark.parametrize("name", ["tiny_shakespeare", "lm1b"])
def test_tfds_names_through_the_pipeline(name):
  with tfds.testing.mock_data(num_examples=20):
    cfg = _cfg(name=name, seq_len=64, shuffle_window=8)
    batch = next(_train(cfg, batch_size=4))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: ((4, 64), np.dtype(np.int32)) for k in ("tokens", "segment_ids", "positions")
    }
    _check_row_structure(batch)
    evals = list(pipeline.eval_batches(cfg, BYTES, batch_size=4))
    assert evals and all(b["tokens"].shape == (4, 64) for b in evals)


def _eval_cfg(tmp_path, corpus):
  return _cfg(name=_jsonl(tmp_path, corpus), seq_len=16)


def test_eval_covers_the_validation_split_once_in_order(tmp_path):
  corpus = _docs(200)
  batches = list(pipeline.eval_batches(_eval_cfg(tmp_path, corpus), BYTES, batch_size=3))
  assert all(v.shape == (3, 16) for b in batches for v in b.values())
  assert _stream_docs(_rows(batches)) == corpus[180:]  # the last 10% of the records
  segment_ids = np.concatenate([b["segment_ids"] for b in batches])
  for key in ("tokens", "positions"):
    assert (np.concatenate([b[key] for b in batches])[segment_ids == 0] == 0).all()


def test_eval_pads_the_last_batch_with_zero_rows(tmp_path):
  # 20 validation docs of 5 tokens = 100 tokens = 7 rows of 16: batch 2 has 3 zero rows.
  corpus = [f"d{i:03d}" for i in range(200)]
  batches = list(pipeline.eval_batches(_eval_cfg(tmp_path, corpus), BYTES, batch_size=5))
  assert len(batches) == 2
  for key in ("tokens", "segment_ids", "positions"):
    assert (batches[1][key][2:] == 0).all(), key
  assert (batches[1]["segment_ids"][:2] > 0).any(axis=1).all()


def test_eval_is_repeatable_and_respects_max_batches(tmp_path):
  cfg = _eval_cfg(tmp_path, _docs(300))
  first = list(pipeline.eval_batches(cfg, BYTES, batch_size=2))
  assert len(first) > 3
  assert _same(first, list(pipeline.eval_batches(cfg, BYTES, batch_size=2)))
  limited = list(pipeline.eval_batches(cfg, BYTES, batch_size=2, max_batches=3))
  assert _same(limited, first[:3])


def test_eval_name_is_read_whole(tmp_path):
  (tmp_path / "eval").mkdir()
  corpus = _docs(30, seed=1)
  cfg = _cfg(name=_jsonl(tmp_path, _docs(10)), eval_name=_jsonl(tmp_path / "eval", corpus))
  cfg.seq_len = 16
  assert _stream_docs(_rows(pipeline.eval_batches(cfg, BYTES, batch_size=4))) == corpus


def test_eval_processes_get_equal_counts_and_split_the_rows(tmp_path):
  cfg = _eval_cfg(tmp_path, _docs(230))
  whole = _rows(pipeline.eval_batches(cfg, BYTES, batch_size=4))
  parts = [
    list(pipeline.eval_batches(cfg, BYTES, batch_size=2, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert len(parts[0]) == len(parts[1])
  interleaved = np.concatenate(
    [np.concatenate([a["tokens"], b["tokens"]]) for a, b in zip(*parts, strict=True)]
  )
  np.testing.assert_array_equal(interleaved, whole)


@pytest.mark.parametrize(
  ("overrides", "match"),
  [({"seq_len": 0}, r"data\.seq_len=0"), ({"shuffle_window": 0}, r"data\.shuffle_window=0")],
)
def test_bad_sizes_are_errors(tmp_path, overrides, match):
  cfg = _cfg(name=_jsonl(tmp_path, _docs(20)), **overrides)
  with pytest.raises(ValueError, match=match):
    _train(cfg)


def test_negative_seed_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"seed=-1"):
    _train(_cfg(name=_jsonl(tmp_path, _docs(20))), seed=-1)


def test_all_empty_tfds_documents_fail_instead_of_hanging():
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: [{"text": ""}] * 50):
    it = _train(_cfg(name="lm1b"))
    with pytest.raises(ValueError, match="skipped 100.00 %"):
      next(it)
