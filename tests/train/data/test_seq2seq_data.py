"""Encoder-decoder data (train/data/seq2seq.py): T5 span corruption (its statistics, its
lengths, its rows in the pipeline, seeded and restored), and text-to-text examples from
JSONL and (mocked) TFDS, packed on both sides, alone or mixed."""

from __future__ import annotations

import itertools
import json
import logging
import random
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import t5
from modeling.vocab import EOS_ID, NUM_SPECIAL
from train import families
from train.data import seq2seq
from train.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()
FIRST = BYTES.vocab_size  # the first sentinel id: sentinels follow the vocabulary
DENSITY, MEAN_SPAN = 0.15, 3.0


def reconstruct(inputs_N, targets_N, first: int = FIRST) -> tuple[np.ndarray, np.ndarray]:
  """(original tokens, noise mask) from a corrupted pair, written independently of the code
  under test: each sentinel of the inputs is replaced by the tokens that follow the same
  sentinel in the targets. Both sides must end with EOS and use every sentinel once."""
  inputs_N, targets_N = [int(t) for t in inputs_N], [int(t) for t in targets_N]
  assert inputs_N[-1] == EOS_ID and targets_N[-1] == EOS_ID
  spans, current = {}, None
  for t in targets_N[:-1]:
    if t >= first:
      assert t not in spans, "a sentinel twice in the targets"
      current = spans[t] = []
    else:
      assert current is not None, "targets must start with a sentinel"
      current.append(t)
  tokens, mask = [], []
  for t in inputs_N[:-1]:
    if t >= first:
      span = spans.pop(t)
      assert span, "an empty noise span"
      tokens += span
      mask += [True] * len(span)
    else:
      tokens.append(t)
      mask.append(False)
  assert not spans, f"sentinels {sorted(spans)} of the targets are not in the inputs"
  return np.array(tokens), np.array(mask)


def t5_counts(length: int) -> tuple[int, int]:
  """(noise tokens, noise spans) as T5's random_spans_noise_mask computes them."""
  noise = min(max(int(np.round(length * DENSITY)), 1), length - 1)
  return noise, max(int(np.round(noise / MEAN_SPAN)), 1)


def sentinels(ids_N) -> np.ndarray:
  ids_N = np.asarray(ids_N)
  return ids_N[ids_N >= FIRST]


# ---- span corruption ------------------------------------------------------------------------


def test_span_corruption_statistics_over_many_draws():
  rng = np.random.default_rng(0)
  odd = (2 * rng.integers(4, 300, 1000) + 1).tolist()  # 9 to 599 tokens
  lengths = [568] * 1000 + odd
  noise_total = spans_total = 0
  spans_568, mask_568 = [], []
  for length in lengths:
    tokens_N = rng.integers(NUM_SPECIAL, FIRST, length)
    inputs_N, targets_N = seq2seq.span_corrupt(tokens_N, rng, DENSITY, MEAN_SPAN, FIRST)
    assert inputs_N.dtype == targets_N.dtype == np.int32
    original_N, mask_N = reconstruct(inputs_N, targets_N)
    np.testing.assert_array_equal(original_N, tokens_N)
    noise, spans = t5_counts(length)
    # The realized density is T5's exactly, per chunk: round(L * 0.15) tokens in round(noise / 3)
    # spans, each sentinel once, in order from the first, on both sides.
    assert mask_N.sum() == noise, length
    expected = FIRST + np.arange(spans)
    np.testing.assert_array_equal(sentinels(inputs_N), expected)
    np.testing.assert_array_equal(sentinels(targets_N), expected)
    assert len(inputs_N) == length - noise + spans + 1 and len(targets_N) == noise + spans + 1
    assert not mask_N[0] and mask_N[-1]  # kept first, noise last (T5's interleaving)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], mask_N, [0]]))))[::2]
    noise_total, spans_total = noise_total + noise, spans_total + spans
    if length == 568:
      spans_568.append(runs)
      mask_568.append(mask_N)
  # Mean span length: per chunk spans = round(noise / 3), so |noise - 3 spans| <= 1.5 and the
  # pooled mean is within 1.5 * chunks / spans of 3 (0.07 here); a mean from some other
  # count of spans (one more or one fewer per chunk) would be off by about 0.1 to 0.3.
  pooled = noise_total / spans_total
  assert abs(pooled - MEAN_SPAN) <= 1.5 * len(lengths) / spans_total < 0.075, pooled
  spans_N = np.concatenate(spans_568)
  assert spans_N.mean() == pytest.approx(85 / 28)  # 568 tokens: 85 noise tokens in 28 spans
  # The split of 85 into 28 spans is uniform over compositions (T5's random segmentation): a
  # span has length 1 with probability (28 - 1) / (85 - 1); 28,000 spans, s.e. about 0.003.
  assert np.mean(spans_N == 1) == pytest.approx(27 / 84, abs=0.012)
  assert spans_N.max() > 6  # not all near 3
  # Noise falls anywhere: inside the chunk each position is noise about 15% of the time.
  rate_N = np.mean(mask_568, axis=0)
  assert rate_N[0] == 0 and rate_N[-1] == 1
  for part in np.array_split(rate_N[20:-20], 4):
    assert part.mean() == pytest.approx(DENSITY, abs=0.02)


def test_span_corruption_of_short_chunks():
  rng = np.random.default_rng(1)
  for length in range(2, 12):
    tokens_N = rng.integers(NUM_SPECIAL, FIRST, length)
    inputs_N, targets_N = seq2seq.span_corrupt(tokens_N, rng, DENSITY, MEAN_SPAN, FIRST)
    original_N, mask_N = reconstruct(inputs_N, targets_N)
    np.testing.assert_array_equal(original_N, tokens_N)
    assert 1 <= mask_N.sum() <= length - 1 and not mask_N[0]


@pytest.mark.parametrize(
  ("inputs_len", "expected"), [(512, (568, 114)), (128, (141, 29)), (64, None), (33, None)]
)
def test_span_lengths_are_t5s(inputs_len, expected):
  raw, targets = seq2seq.span_lengths(inputs_len, DENSITY, MEAN_SPAN)
  if expected is not None:
    assert (raw, targets) == expected
  # T5's compute_input_and_target_lengths: the longest raw chunk whose inputs still fit.
  noise, spans = t5_counts(raw)
  assert raw - noise + spans + 1 <= inputs_len and targets == noise + spans + 1
  noise, spans = t5_counts(raw + 1)
  assert raw + 1 - noise + spans + 1 > inputs_len


def _pretrain_config(tmp_path, docs: list[str], seq_len: int = 64, shuffle_window: int = 1):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  c = t5.get_config("size=tiny,task=pretrain")
  c.data.name = f"jsonl:{path}"
  c.data.seq_len = seq_len
  c.data.shuffle_window = shuffle_window
  return c


def _span_train(config, batch_size: int = 4):
  """The encdec pretraining task's own training data (as the trainer builds it)."""
  task = families.resolve(config).task
  return task.train_iterator(config, BYTES, batch_size=batch_size, seed=config.seed)


def _row_chunks(batch: dict) -> list[np.ndarray]:
  return [
    reconstruct(i[s > 0], t[ts > 0])[0]
    for i, s, t, ts in zip(
      batch["tokens"],
      batch["segment_ids"],
      batch["targets"],
      batch["targets_segment_ids"],
      strict=True,
    )
  ]


def test_span_rows_fill_both_sides_exactly_and_cover_the_stream(tmp_path):
  # One document, rows unshuffled: the stream is its tokens and EOS, again and again.
  doc = "".join(random.Random(0).choice("abcdefgh ") for _ in range(300))
  config = _pretrain_config(tmp_path, [doc])
  raw, tgt_len = seq2seq.span_lengths(64, DENSITY, MEAN_SPAN)
  assert seq2seq.target_len(config) == tgt_len == 14
  chunks = []
  for batch in itertools.islice(_span_train(config), 6):
    assert {k: v.shape for k, v in batch.items()} == {
      "tokens": (4, 64),
      "segment_ids": (4, 64),
      "positions": (4, 64),
      "targets": (4, tgt_len),
      "targets_segment_ids": (4, tgt_len),
      "targets_positions": (4, tgt_len),
    }
    # No padding and nothing cut: every row is one full example on both sides.
    assert (batch["segment_ids"] == 1).all() and (batch["targets_segment_ids"] == 1).all()
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(64), (4, 1)))
    np.testing.assert_array_equal(batch["targets_positions"], np.tile(np.arange(tgt_len), (4, 1)))
    assert (batch["tokens"][:, -1] == EOS_ID).all() and (batch["targets"][:, -1] == EOS_ID).all()
    assert (sentinels(batch["tokens"]) < FIRST + config.task.num_sentinels).all()
    chunks += _row_chunks(batch)
  assert all(len(c) == raw for c in chunks)
  stream = np.tile(np.concatenate([BYTES.encode(doc), [EOS_ID]]), 8)
  np.testing.assert_array_equal(np.concatenate(chunks), stream[: raw * len(chunks)])


def test_span_rows_need_enough_sentinels_and_target_room(tmp_path):
  config = _pretrain_config(tmp_path, ["abc"])
  config.task.num_sentinels = 3  # a 68-token chunk has 3 spans: enough
  seq2seq.span_rows_fn(config, FIRST)
  config.data.seq_len = 512  # 28 spans
  with pytest.raises(ValueError, match=r"task\.num_sentinels=3: .* raise it to >= 28"):
    seq2seq.span_rows_fn(config, FIRST)
  config.task.num_sentinels = 100
  config.data.target_len = 100
  with pytest.raises(ValueError, match=r"data\.target_len=100: .* needs 114 target tokens"):
    seq2seq.target_len(config)


def _same(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    for x, y in zip(a, b, strict=True)
  )


def _docs(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [
    f"<{i}:" + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(5, 60))) + ">"
    for i in range(n)
  ]


def test_span_rows_restore_exactly(tmp_path):
  config = _pretrain_config(tmp_path, _docs(80), shuffle_window=4)
  it = _span_train(config)
  list(itertools.islice(it, 5))
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  expected = list(itertools.islice(it, 4))
  fresh = _span_train(config)
  fresh.set_state(state)
  assert _same(list(itertools.islice(fresh, 4)), expected)
  assert not _same(list(itertools.islice(_span_train(config), 4)), expected)  # the state matters


def test_span_rows_restart_the_same_and_differ_with_config_seed(tmp_path):
  doc = "".join(random.Random(1).choice("abcdefgh ") for _ in range(500))
  config = _pretrain_config(tmp_path, [doc])
  first = list(itertools.islice(_span_train(config), 3))
  assert _same(list(itertools.islice(_span_train(config), 3)), first)
  config.seed = 1
  other = list(itertools.islice(_span_train(config), 3))
  # Same chunks of the one document, other noise spans.
  for a, b in zip(first, other, strict=True):
    for x, y in zip(_row_chunks(a), _row_chunks(b), strict=True):
      np.testing.assert_array_equal(x, y)
    assert all((a["tokens"][r] != b["tokens"][r]).any() for r in range(4))


# ---- text-to-text from JSONL ---------------------------------------------------------------


def _write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def _seq2seq_config(name: str, seq_len: int = 48, target_len: int = 24):
  c = t5.get_config("size=tiny,task=seq2seq")
  c.data.name = name
  c.data.seq_len = seq_len
  c.data.target_len = target_len
  return c


def _pairs_of(batches) -> list[tuple[list[int], list[int]]]:
  """(input ids, target ids) of each packed example, by segment id, row by row; checks that
  positions restart at 0 in every segment on both sides."""
  out = []
  for b in batches:
    for r in range(len(b["tokens"])):
      seg, tseg = b["segment_ids"][r], b["targets_segment_ids"][r]
      ids = sorted(set(seg[seg > 0].tolist()))
      assert ids == sorted(set(tseg[tseg > 0].tolist())), "the sides' segments differ"
      assert ids == list(range(1, len(ids) + 1))
      for s in ids:
        for key, side in (("", seg), ("targets_", tseg)):
          np.testing.assert_array_equal(
            b[key + "positions"][r][side == s], np.arange(sum(side == s))
          )
        out.append((b["tokens"][r][seg == s].tolist(), b["targets"][r][tseg == s].tolist()))
  return out


def _encoded(text: str, length: int) -> list[int]:
  return BYTES.encode(text)[: length - 1].tolist() + [EOS_ID]


def test_jsonl_missing_field_names_file_and_line(tmp_path):
  records = (
    [{"inputs": "a", "targets": "b"}] * 2
    + [{"inputs": "c"}]
    + [{"inputs": "d", "targets": "e"}] * 20
  )
  name = _write_jsonl(tmp_path / "bad.jsonl", records)
  with pytest.raises(
    ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:3: no field 'targets'")
  ):
    seq2seq.seq2seq_train_iterator(_seq2seq_config(name), BYTES, batch_size=2, seed=0)


@pytest.fixture
def absl_log(caplog):
  caplog.set_level(logging.INFO, logger="absl")
  return caplog


def test_empty_targets_are_skipped_and_counted(tmp_path, absl_log):
  rng = random.Random(2)
  records = [
    {"inputs": f"q{i} " + "x" * rng.randint(0, 8), "targets": "" if i % 5 == 2 else f"t{i}"}
    for i in range(100)
  ]
  name = _write_jsonl(tmp_path / "data.jsonl", records)
  config = _seq2seq_config(name)
  counts = seq2seq.Counts("test", 48, 24)
  assert seq2seq.encode_pair(("abc", ""), BYTES, 48, 24, counts) is None
  assert (counts.seen, counts.empty, counts.long_inputs) == (1, 1, 0)
  # Evaluation: the validation split's examples in order, empty targets left out, and counted.
  valid = records[90:]
  got = _pairs_of(seq2seq.seq2seq_eval_batches(config, BYTES, batch_size=2))
  kept = [r for r in valid if r["targets"]]
  assert got == [(_encoded(r["inputs"], 48), _encoded(r["targets"], 24)) for r in kept]
  empty = len(valid) - len(kept)
  assert empty == 2
  assert any(
    "of 10 examples so far, 0 had inputs longer" in m and f"{empty} empty targets (skipped)" in m
    for m in absl_log.messages
  ), absl_log.messages
  # Training: no example with an empty target, and the count is warned about.
  absl_log.clear()
  it = seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=4, seed=0)
  train_pairs = _pairs_of(itertools.islice(it, 10))
  allowed = {
    (tuple(_encoded(r["inputs"], 48)), tuple(_encoded(r["targets"], 24)))
    for r in records[:90]
    if r["targets"]
  }
  assert {(tuple(a), tuple(b)) for a, b in train_pairs} <= allowed
  assert all(len(b) > 1 for _, b in train_pairs)
  warned = [r.getMessage() for r in absl_log.records if r.levelno == logging.WARNING]
  assert any("1 empty targets (skipped)" in m for m in warned), warned
  # decode_examples: the references of the non-empty validation examples.
  ids, inputs, refs = seq2seq.decode_examples(config, BYTES, 0)
  assert refs == [r["targets"] for r in kept] and inputs == [r["inputs"] for r in kept]
  assert [i.tolist() for i in ids] == [_encoded(r["inputs"], 48) for r in kept]
  assert seq2seq.decode_examples(config, BYTES, 3)[2] == refs[:3]


def test_long_inputs_are_truncated_with_eos_and_a_warning(tmp_path, absl_log):
  records = [{"inputs": "s" * (4 + (i % 3) * 10), "targets": f"t{i}"} for i in range(60)]
  name = _write_jsonl(tmp_path / "data.jsonl", records)
  config = _seq2seq_config(name, seq_len=16, target_len=8)
  valid = records[54:]
  long = sum(len(r["inputs"]) + 1 > 16 for r in valid)
  assert long == 2
  got = _pairs_of(seq2seq.seq2seq_eval_batches(config, BYTES, batch_size=2))
  assert got == [(_encoded(r["inputs"], 16), _encoded(r["targets"], 8)) for r in valid]
  assert all(len(a) <= 16 and a[-1] == EOS_ID for a, _ in got)
  assert sum(len(a) == 16 for a, _ in got) == long
  warned = [r.getMessage() for r in absl_log.records if r.levelno == logging.WARNING]
  assert any("1 had inputs longer than data.seq_len=16 (truncated)" in m for m in warned)
  assert any(
    f"of 6 examples so far, {long} had inputs longer than data.seq_len=16 (truncated)" in m
    for m in absl_log.messages
  ), absl_log.messages


def test_packing_keeps_each_pair_on_both_sides(tmp_path):
  rng = random.Random(3)
  records = []
  for i in range(200):
    s = "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 30)))
    records.append({"inputs": f"reverse: {s}", "targets": s[::-1] + str(i)})
  name = _write_jsonl(tmp_path / "data.jsonl", records)
  config = _seq2seq_config(name, seq_len=64, target_len=48)
  encoded = [(_encoded(r["inputs"], 64), _encoded(r["targets"], 48)) for r in records]
  batches = list(seq2seq.seq2seq_eval_batches(config, BYTES, batch_size=2))
  # Every validation pair once, in order (lengths vary enough that packing into more than one
  # open row would reorder them).
  assert _pairs_of(batches) == encoded[180:]
  assert max(b["segment_ids"].max() for b in batches) >= 2  # rows do hold several examples
  for b in batches:  # padding is all zeros on both sides
    for seg, keys in (
      ("segment_ids", ("tokens", "positions")),
      ("targets_segment_ids", ("targets", "targets_positions")),
    ):
      assert all((b[k][b[seg] == 0] == 0).all() for k in keys), keys
  # Training rows: first-fit packing of both sides; every pair is a training pair, whole.
  it = seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=4, seed=0)
  train = _pairs_of(itertools.islice(it, 12))
  allowed = {(tuple(a), tuple(b)) for a, b in encoded[:180]}
  assert all((tuple(a), tuple(b)) in allowed for a, b in train)
  assert len(train) > 1.5 * 4 * 12  # about two examples a row
  assert len({(tuple(a), tuple(b)) for a, b in train}) == len(train)  # one epoch: no repeats


def test_mixture_rates_and_bad_specs(tmp_path):
  names = []
  for src in "ab":
    (tmp_path / src).mkdir()
    records = [{"inputs": f"{src}: {i}", "targets": f"{src}{i}"} for i in range(100)]
    names.append(_write_jsonl(tmp_path / src / "data.jsonl", records))
  config = _seq2seq_config("pystdlib", seq_len=32, target_len=16)
  config.task.mixture = f"{names[0]}@3;{names[1]}@1"
  assert seq2seq.parse_mixture(config) == [(names[0], 3.0), (names[1], 1.0)]
  it = seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=8, seed=0)
  texts = [BYTES.decode(a) for a, _ in _pairs_of(itertools.islice(it, 25))]
  share = np.mean([t.startswith("a: ") for t in texts])
  assert len(texts) > 400 and share == pytest.approx(0.75, abs=0.04), (len(texts), share)
  # Evaluation: each source's validation split, one after the other.
  refs = seq2seq.decode_examples(config, BYTES, 0)[2]
  assert refs == [f"a{i}" for i in range(90, 100)] + [f"b{i}" for i in range(90, 100)]
  for spec in (f"{names[0]}", f"{names[0]}@0", f"{names[0]}@x", "@2", f"{names[0]}@-1"):
    config.task.mixture = spec
    with pytest.raises(ValueError, match=r"task\.mixture=.*not 'source@rate'"):
      seq2seq.parse_mixture(config)
  config.task.mixture = " ; "
  with pytest.raises(ValueError, match=r"task\.mixture=' ; ': no source"):
    seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=8, seed=0)


def test_pretraining_sources_are_refused_for_seq2seq():
  config = _seq2seq_config("pystdlib")
  with pytest.raises(ValueError, match=r"data\.name='pystdlib': task\.name='seq2seq' needs"):
    seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=2, seed=0)


# ---- text-to-text from TFDS (mocked) --------------------------------------------------------

TFDS_CASES = {
  "cnn_dailymail": ("article", "highlights", "summarize: "),
  "wmt14_translate/de-en": ("de", "en", "translate German to English: "),
}


def _mock_records(source_field: str, target_field: str, n: int = 6) -> list[dict]:
  rng = random.Random(4)
  return [
    {
      source_field: f"text {i} ".encode() + bytes(rng.choice(b"abcdefg ") for _ in range(20)),
      target_field: f"ref {i} {'x' * i}".encode(),
    }
    for i in range(n)
  ]


@pytest.mark.parametrize("name", list(TFDS_CASES))
def test_tfds_templates_through_the_pipeline(name):
  source_field, target_field, prefix = TFDS_CASES[name]
  records = _mock_records(source_field, target_field)
  config = _seq2seq_config(name, seq_len=96, target_len=24)
  with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: records):
    batch = next(seq2seq.seq2seq_train_iterator(config, BYTES, batch_size=2, seed=0))
    pairs = [(BYTES.decode(a), BYTES.decode(b)) for a, b in _pairs_of([batch])]
    evals = _pairs_of(seq2seq.seq2seq_eval_batches(config, BYTES, batch_size=2))
    ids, inputs, refs = seq2seq.decode_examples(config, BYTES, 0)
    config.task.templates = "flan"
    flan = [seq2seq.TextPairs(config, name, "validation")[i][0] for i in range(len(records))]
  texts = {r[source_field].decode(): r[target_field].decode() for r in records}
  assert pairs and all(a.startswith(prefix) and texts[a[len(prefix) :]] == b for a, b in pairs)
  expected = [(prefix + r[source_field].decode(), r[target_field].decode()) for r in records]
  assert [(BYTES.decode(a), BYTES.decode(b)) for a, b in evals] == expected
  assert inputs == [a for a, _ in expected] and refs == [b for _, b in expected]
  assert [BYTES.decode(i) for i in ids] == inputs and all(i[-1] == EOS_ID for i in ids)
  # Flan phrasings: one of the template's instructions per example, filled with its text.
  phrasings = seq2seq.TEMPLATES[name].flan
  for text, r in zip(flan, records, strict=True):
    field = r[source_field].decode()
    assert text in [p.replace("{" + source_field + "}", field) for p, _ in phrasings]
