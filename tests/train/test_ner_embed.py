"""NER (a tag per word, entity-level F1) and sentence embeddings (contrastive, scored by
Spearman): words and pairs as rows, JSONL and TFDS sources with errors that name file and
line, the objectives and summaries against seqeval and NumPy, and both tasks trained end to
end."""

from __future__ import annotations

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqeval.metrics
import tensorflow_datasets as tfds

from configs import bert
from modeling.vocab import CLS_ID, FOURFOLD, NUM_SPECIAL, SEP_ID
from tests.tiny_models import abstract_init, draw_params, tiny_config
from train import families, trainer
from train.data import validate_source
from train.data.labeled import (
  encode_rows,
  encode_words,
  labeled_eval_batches,
  load_pairs,
  load_tagged,
  tag_names,
)
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics
from train.objectives import summarize_ner, tag_sequences

TOK = ByteTokenizer()
TAGS = "O,B-PER,I-PER,B-LOC,I-LOC"
OUT, B_PER, I_PER, B_LOC, I_LOC = range(5)
CONLL_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def ids(text: str) -> list[int]:
  return [b + NUM_SPECIAL for b in text.encode()]


def write_lines(path, lines: list) -> str:
  """JSONL from records (dicts) and raw lines (str); returns the `jsonl:` source name."""
  path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
  return f"jsonl:{path}"


def ner_config(name: str = "conll2003", seq_len: int = 32, **task_keys):
  c = tiny_config("bert", "task=ner", name=name, seq_len=seq_len)
  c.task.update(task_keys)
  return c


def embed_config(name: str, seq_len: int = 32, **task_keys):
  # arch=bert: post-norm, so the pooled states are the last block's outputs
  c = tiny_config("bert", "arch=bert,task=embed", name=name, text_field="s1", seq_len=seq_len)
  c.task.update(dict(text_pair_field="s2", label_field="score"))
  c.task.update(task_keys)
  return c


def small_run(c, **train) -> None:
  c.model.dropout = 0.0
  c.train.update(dict(eval_steps=0, checkpoint_every=0, peak_tflops=1.0, warmup_steps=0))
  c.train.update(train)


# --- NER: words as rows ----------------------------------------------------------------------


def test_encode_words_puts_each_tag_on_the_words_first_byte():
  ids_N, labels_N, kept = encode_words(["Hi", "é", "Bob"], [B_PER, OUT, B_LOC], TOK, 32)
  assert ids_N[:4].tolist() == [CLS_ID, ord("H") + 8, ord("i") + 8, ord(" ") + 8]
  space = ids(" ")
  assert ids_N.tolist() == [CLS_ID, *ids("Hi"), *space, *ids("é"), *space, *ids("Bob"), SEP_ID]
  #                       [CLS]  H      i   ' '  é (2 bytes)  ' '  B      o   b  [SEP]
  assert labels_N.tolist() == [-1, B_PER, -1, -1, OUT, -1, -1, B_LOC, -1, -1, -1]
  assert kept == 3 and ids_N.dtype == labels_N.dtype == np.int32


@pytest.mark.parametrize(
  "seq_len, kept",
  # Rows with 1, 2, 3 words need 4, 7 and 11 tokens ([CLS] Hi ' ' é ' ' Bob [SEP]).
  [(2, 0), (3, 0), (4, 1), (6, 1), (7, 2), (10, 2), (11, 3), (64, 3)],
)
def test_encode_words_truncates_between_words(seq_len, kept):
  words = ["Hi", "é", "Bob"]
  ids_N, labels_N, n = encode_words(words, [B_PER, OUT, B_LOC], TOK, seq_len)
  assert n == kept and len(ids_N) == len(labels_N) <= seq_len
  assert ids_N[0] == CLS_ID and ids_N[-1] == SEP_ID
  assert TOK.decode(ids_N) == " ".join(words[:kept])  # whole words only
  assert labels_N[labels_N >= 0].tolist() == [B_PER, OUT, B_LOC][:kept]


def test_encode_words_stops_at_the_first_word_that_does_not_fit():
  # "b" would fit after "a", but the words kept are a prefix: the rest are all dropped.
  ids_N, labels_N, kept = encode_words(["a", "abcdefgh", "b"], [B_PER, OUT, B_LOC], TOK, 6)
  assert kept == 1 and ids_N.tolist() == [CLS_ID, *ids("a"), SEP_ID]
  assert labels_N.tolist() == [-1, B_PER, -1]
  # An empty word still takes a piece, so it keeps its tag.
  ids_N, labels_N, kept = encode_words(["", "x"], [B_PER, OUT], TOK, 16)
  assert kept == 2 and TOK.decode(ids_N) == "? x" and labels_N.tolist() == [-1, B_PER, -1, OUT, -1]


class Pieces:
  """A SentencePiece-like tokenizer (marks word starts itself): one id per character."""

  is_byte_level = False
  vocab_size = 300
  specials = FOURFOLD

  def encode(self, text):
    return np.asarray([NUM_SPECIAL + ord(ch) % 200 for ch in text], np.int32)


def test_encode_words_adds_no_space_for_piece_tokenizers():
  ids_N, labels_N, kept = encode_words(["ab", "c"], [B_PER, OUT], Pieces(), 16)
  assert kept == 2 and len(ids_N) == 5  # [CLS] a b c [SEP]
  assert labels_N.tolist() == [-1, B_PER, -1, OUT, -1]


# --- NER: JSONL sources ----------------------------------------------------------------------

SENTENCES = [
  (["Alice", "met", "Bob"], ["B-PER", "O", "B-PER"]),
  (["in", "New", "York"], ["O", "B-LOC", "I-LOC"]),
]


def test_load_tagged_from_jsonl_with_tag_names_or_ids(tmp_path):
  by_name = ner_config(
    write_lines(tmp_path / "names.jsonl", [{"tokens": w, "ner": t} for w, t in SENTENCES]),
    tag_names=TAGS,
  )
  rows = load_tagged(by_name, TOK, "train")
  assert rows["tokens"].shape == rows["labels"].shape == (2, 32)
  names = TAGS.split(",")
  for i, (words, tags) in enumerate(SENTENCES):
    tokens_L, labels_L = rows["tokens"][i], rows["labels"][i]
    assert TOK.decode(tokens_L) == " ".join(words)
    assert tokens_L[0] == CLS_ID and tokens_L[tokens_L > 0][-1] == SEP_ID
    starts = np.flatnonzero(labels_L >= 0)
    assert labels_L[starts].tolist() == [names.index(t) for t in tags]
    assert tokens_L[starts].tolist() == [ids(w)[0] for w in words]  # first bytes
  np.testing.assert_array_equal(rows["segment_ids"], rows["tokens"] > 0)
  np.testing.assert_array_equal(rows["positions"], np.arange(32) * rows["segment_ids"])
  assert not rows["token_types"].any() and rows["weight"].tolist() == [1, 1]
  np.testing.assert_array_equal(rows["dropped"], [[-1], [-1]])  # nothing truncated

  by_id = ner_config(
    write_lines(
      tmp_path / "ids.jsonl",
      [{"tokens": w, "ner": [names.index(x) for x in t]} for w, t in SENTENCES],
    ),
    tag_names=TAGS,
  )
  for key, value in load_tagged(by_id, TOK, "train").items():
    np.testing.assert_array_equal(value, rows[key], err_msg=key)


@pytest.mark.parametrize(
  "record, error",
  [
    ({"words": ["a"], "ner": ["O"]}, "no field 'tokens' (task.tokens_field='tokens')"),
    ({"tokens": ["a"]}, "no field 'ner' (task.label_field='ner')"),
    ({"tokens": ["a", "b"], "ner": ["O"]}, "2 words but 1 tags"),
    ({"tokens": ["a"], "ner": ["B-ORG"]}, "tag 'B-ORG' is not one of task.tag_names"),
    ({"tokens": ["a"], "ner": [5]}, "tag id 5 is outside [0, 5)"),
    ({"tokens": ["a"], "ner": [-1]}, "tag id -1 is outside [0, 5)"),
    ({"tokens": ["a"], "ner": [1.7]}, "tag 1.7 is neither a tag name nor an integer tag id"),
    ({"tokens": ["a"], "ner": [True]}, "tag True is neither a tag name nor an integer tag id"),
    ({"tokens": ["a"], "ner": [None]}, "tag None is neither a tag name nor an integer tag id"),
  ],
  ids=[
    "no-tokens",
    "no-tags",
    "lengths",
    "unknown-tag",
    "id-too-big",
    "id-negative",
    "float-tag",
    "bool-tag",
    "null-tag",
  ],
)
def test_load_tagged_errors_name_file_and_line(record, error, tmp_path):
  good = {"tokens": ["a"], "ner": ["O"]}
  config = ner_config(write_lines(tmp_path / "x.jsonl", [good, "", record]), tag_names=TAGS)
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'x.jsonl'}:3: {error}")):
    load_tagged(config, TOK, "train")


def test_jsonl_needs_tag_names(tmp_path):
  config = ner_config(write_lines(tmp_path / "x.jsonl", [{"tokens": ["a"], "ner": [0]}]))
  with pytest.raises(ValueError, match=r"task\.tag_names=''.*jsonl:"):
    load_tagged(config, TOK, "train")


def test_truncated_sentences_keep_their_dropped_tags(tmp_path, caplog):
  records = [
    {
      "tokens": ["Alice", "met", "Bob", "in", "Paris"],
      "ner": ["B-PER", "O", "B-PER", "O", "B-LOC"],
    },
    {"tokens": ["Bob"], "ner": ["B-PER"]},
  ]
  config = ner_config(write_lines(tmp_path / "x.jsonl", records), seq_len=12, tag_names=TAGS)
  with caplog.at_level(logging.WARNING):
    rows = load_tagged(config, TOK, "train")
  # [CLS] Alice ' ' met [SEP] is 11 tokens; ' ' Bob would make it 15.
  assert TOK.decode(rows["tokens"][0]) == "Alice met"
  assert rows["labels"][0][rows["labels"][0] >= 0].tolist() == [B_PER, OUT]
  np.testing.assert_array_equal(rows["dropped"], [[B_PER, OUT, B_LOC], [-1, -1, -1]])
  assert "1 of 2 sentences are longer than data.seq_len=12" in caplog.text


# --- NER: entity-level metrics ---------------------------------------------------------------


def ner_rows(*rows) -> dict[str, np.ndarray]:
  """Per-row values as the objective returns them, from (labels, prediction, dropped, weight)."""
  keys = ("rows/labels", "rows/prediction", "rows/dropped", "rows/weight")
  return {k: np.asarray([r[i] for r in rows]) for i, k in enumerate(keys)}


X = B_LOC  # predictions off the words' first bytes: never read
# Words B-PER I-PER O B-LOC, predicted B-PER I-PER O O: the person found, the place missed.
FOUND_ONE = (
  [-1, B_PER, -1, I_PER, OUT, -1, B_LOC, -1],
  [X, B_PER, X, I_PER, OUT, X, OUT, X],
  [-1, -1],
  1,
)
# Words O B-PER, predicted right; truncation dropped B-LOC I-LOC.
TRUNCATED = (
  [-1, OUT, B_PER, -1, -1, -1, -1, -1],
  [X, OUT, B_PER, X, X, X, X, X],
  [B_LOC, I_LOC],
  1,
)
UNTRUNCATED = (*TRUNCATED[:2], [-1, -1], 1)
# Padding that pads the last eval batch: all wrong, weight 0.
PADDING = (
  [-1, OUT, OUT, OUT, OUT, OUT, OUT, -1],
  [X, B_PER, B_LOC, I_LOC, B_PER, I_PER, B_LOC, X],
  [OUT, OUT],
  0,
)


def ner_metrics(rows: dict) -> dict[str, float]:
  sums = {"loss_sum": 6.0, "weight": 4.0, "correct": 3.0}
  return summarize_ner(sums, rows, ner_config(tag_names=TAGS), True)


def test_tag_sequences_read_the_words_then_the_dropped_words():
  true, pred = tag_sequences(ner_rows(FOUND_ONE, TRUNCATED, PADDING), TAGS.split(","))
  assert true == [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER", "B-LOC", "I-LOC"]]
  assert pred == [["B-PER", "I-PER", "O", "O"], ["O", "B-PER", "O", "O"]]


def test_summarize_ner_by_hand():
  # Two entities (PER, LOC), one predicted, correctly.
  m = ner_metrics(ner_rows(FOUND_ONE))
  assert m["eval/precision"] == 1.0 and m["eval/recall"] == 0.5
  assert m["eval/f1"] == pytest.approx(2 / 3)
  assert m["eval/loss"] == 1.5 and m["eval/accuracy"] == 0.75
  # An entity lost to truncation is missed: 3 -> 4 true entities, the same 2 found.
  whole = ner_metrics(ner_rows(FOUND_ONE, UNTRUNCATED))
  cut = ner_metrics(ner_rows(FOUND_ONE, TRUNCATED))
  assert whole["eval/recall"] == pytest.approx(2 / 3) and cut["eval/recall"] == 0.5
  assert whole["eval/precision"] == cut["eval/precision"] == 1.0
  # A weight-0 row counts for nothing.
  assert ner_metrics(ner_rows(FOUND_ONE, TRUNCATED, PADDING)) == cut


def test_summarize_ner_matches_seqeval_on_random_rows():
  rng = np.random.default_rng(0)
  names = TAGS.split(",")
  n, length, width = 40, 12, 3
  labels_NL = np.where(rng.random((n, length)) < 0.6, rng.integers(0, 5, (n, length)), -1)
  pred_NL = np.where(rng.random((n, length)) < 0.7, labels_NL, rng.integers(0, 5, (n, length)))
  lost_N1 = rng.integers(0, width + 1, (n, 1))  # words truncation dropped, per sentence
  dropped_NW = np.where(np.arange(width) < lost_N1, rng.integers(0, 5, (n, width)), -1)
  weight_N = (rng.random(n) < 0.8).astype(np.float32)
  rows = {
    "rows/labels": labels_NL,
    "rows/prediction": pred_NL,
    "rows/dropped": dropped_NW,
    "rows/weight": weight_N,
  }
  true, pred = [], []
  for i in np.flatnonzero(weight_N):
    words = labels_NL[i] >= 0
    lost = [names[t] for t in dropped_NW[i] if t >= 0]
    true.append([names[t] for t in labels_NL[i][words]] + lost)
    pred.append([names[t] for t in pred_NL[i][words]] + ["O"] * len(lost))
  m = ner_metrics(rows)
  assert 0.2 < m["eval/f1"] < 0.9  # neither trivial nor perfect
  assert m["eval/f1"] == pytest.approx(seqeval.metrics.f1_score(true, pred))
  assert m["eval/precision"] == pytest.approx(seqeval.metrics.precision_score(true, pred))
  assert m["eval/recall"] == pytest.approx(seqeval.metrics.recall_score(true, pred))


# --- NER: end to end -------------------------------------------------------------------------


def capitalized_names(builder, split, **kw):
  """CoNLL-2003-shaped examples of random words: the capitalized ones are B-PER. Validation
  draws other words, so only the rule (not the words) carries over."""
  del builder, kw
  rng = np.random.default_rng(0 if split == "train" else 1)
  letters = list("abcdefghijklmnopqrstuvwxyz")
  out = []
  for _ in range(32 if split == "train" else 16):
    n = rng.integers(3, 9)
    words = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n)]
    words = [w.capitalize() if rng.random() < 0.3 else w for w in words]
    tags = [CONLL_TAGS.index("B-PER") if w[0].isupper() else 0 for w in words]
    zeros = np.zeros(n, np.int64)
    out.append({"tokens": np.array(words), "ner": np.array(tags), "pos": zeros, "chunks": zeros})
  return out


# Early evals predict no entity: seqeval warns that precision is 0 / 0 (and reports 0).
@pytest.mark.filterwarnings("ignore:Precision is ill-defined")
def test_ner_trains_on_conll2003(tmp_path):
  config = ner_config(seq_len=64)
  small_run(config, steps=40, batch_size=4, learning_rate=3e-3, min_learning_rate=3e-4)
  config.train.update(eval_every=10, log_every=10)
  with tfds.testing.mock_data(as_data_source_fn=capitalized_names):
    trainer.run(config, str(tmp_path))
  assert tag_names(config) == CONLL_TAGS  # the ClassLabel's names: 9 outputs
  evals = [r for r in read_metrics(tmp_path) if "eval/f1" in r]
  assert [r["step"] for r in evals] == [10, 20, 30, 40]
  for r in evals:
    assert {"eval/loss", "eval/accuracy", "eval/precision", "eval/recall"} <= set(r)
  first, last = evals[0], evals[-1]
  assert first["eval/f1"] < 0.5, evals  # still tags (nearly) every word O
  assert last["eval/f1"] > 0.9 and last["eval/accuracy"] > 0.9, evals
  assert last["eval/precision"] > 0.85 and last["eval/recall"] > 0.85, evals


# --- embeddings: pairs as rows ---------------------------------------------------------------

PAIRS = [
  {"s1": "a cat", "s2": "a feline", "score": 4.5},
  {"s1": "dogs bark", "s2": "cats meow", "score": 1.0},
  {"s1": "hello", "s2": "hi", "score": 4.0},
  {"s1": "x", "s2": "y", "score": 3.99},
]


def test_load_pairs_trains_on_positives_and_evaluates_on_all(tmp_path):
  name = write_lines(tmp_path / "p.jsonl", PAIRS)
  config = embed_config(name, min_score=4.0)
  train = load_pairs(config, TOK, "train")  # 4 records: all are in the train split
  assert set(train) == {
    *(f"{k}{s}" for k in ("tokens", "positions", "segment_ids", "token_types") for s in ("", "_b")),
    "label",
    "weight",
  }
  assert [TOK.decode(t) for t in train["tokens"]] == ["a cat", "hello"]
  assert [TOK.decode(t) for t in train["tokens_b"]] == ["a feline", "hi"]
  assert train["label"].tolist() == [4.5, 4.0] and train["weight"].tolist() == [1, 1]
  assert train["tokens"].shape == train["tokens_b"].shape == (2, 32)
  for s in ("", "_b"):  # each text is a row of its own: [CLS] text [SEP]
    tokens_NL = train[f"tokens{s}"]
    assert (tokens_NL[:, 0] == CLS_ID).all() and not train[f"token_types{s}"].any()
    assert [t[t > 0][-1] for t in tokens_NL] == [SEP_ID, SEP_ID]
    np.testing.assert_array_equal(train[f"segment_ids{s}"], tokens_NL > 0)

  config.data.eval_name = name
  evaluated = load_pairs(config, TOK, "all")
  assert [TOK.decode(t) for t in evaluated["tokens"]] == [p["s1"] for p in PAIRS]
  np.testing.assert_allclose(evaluated["label"], [p["score"] for p in PAIRS], rtol=1e-6)


def test_load_pairs_errors(tmp_path):
  name = write_lines(tmp_path / "p.jsonl", [PAIRS[0], "", {"s1": "a", "s2": "b", "score": "hi"}])
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'p.jsonl'}:3: score 'hi' is not")):
    load_pairs(embed_config(name), TOK, "train")
  nan = tmp_path / "nan.jsonl"
  nan.write_text('{"s1": "a", "s2": "b", "score": NaN}\n')
  with pytest.raises(ValueError, match=re.escape(f"{nan}:1: score nan is not a finite number")):
    load_pairs(embed_config(f"jsonl:{nan}"), TOK, "train")
  with pytest.raises(ValueError, match=re.escape("task.text_pair_field=''")):
    load_pairs(embed_config(name, text_pair_field=""), TOK, "train")
  name = write_lines(tmp_path / "q.jsonl", [PAIRS[0], {"s1": "a", "score": 5}])
  with pytest.raises(ValueError, match=re.escape("q.jsonl:2: no field 's2'")):
    load_pairs(embed_config(name), TOK, "train")
  low = write_lines(tmp_path / "low.jsonl", [PAIRS[1]])
  with pytest.raises(ValueError, match=r"no pairs \(task.min_score=4.0\)"):
    load_pairs(embed_config(low), TOK, "train")
  config = embed_config(low, label_field="")
  config.data.eval_name = low
  with pytest.raises(ValueError, match=re.escape("task.label_field=''")):
    load_pairs(config, TOK, "all")


def test_stsb_mock_loads_pairs_with_the_embed_defaults():
  config = bert.get_config("size=tiny,task=embed")
  config.data.seq_len = 64
  validate_source(config.data.name)  # registers glue (as training does)
  with tfds.testing.mock_data(num_examples=8):
    source = tfds.builder(config.data.name).as_data_source(split="train")
    scores = np.asarray([float(source[i]["label"]) for i in range(len(source))])
    config.task.min_score = -1e9
    train = load_pairs(config, TOK, "train")
    assert [TOK.decode(t) for t in train["tokens"]] == [source[i]["sentence1"] for i in range(8)]
    assert [TOK.decode(t) for t in train["tokens_b"]] == [source[i]["sentence2"] for i in range(8)]
    np.testing.assert_allclose(train["label"], scores, rtol=1e-6)
    config.task.min_score = float(np.median(scores))
    positives = load_pairs(config, TOK, "train")
    np.testing.assert_allclose(positives["label"], scores[scores >= np.median(scores)], rtol=1e-6)
    evaluated = load_pairs(config, TOK, "validation")
    assert len(evaluated["label"]) == 8


# --- embeddings: the objective ---------------------------------------------------------------


def pair_rows(pairs: list[tuple[str, str]], scores: list[float], seq_len: int = 32):
  rows, _ = encode_rows([(a, None) for a, _ in pairs], TOK, seq_len)
  rows_b, _ = encode_rows([(b, None) for _, b in pairs], TOK, seq_len)
  rows.update({f"{k}_b": v for k, v in rows_b.items()})
  rows["label"] = np.asarray(scores, np.float32)
  rows["weight"] = np.ones(len(pairs), np.float32)
  return rows


def logsumexp(x, axis):
  top = x.max(axis=axis, keepdims=True)
  return np.log(np.exp(x - top).sum(axis=axis)) + top.squeeze(axis)


def test_embed_loss_is_symmetric_info_nce_over_mean_pooled_unit_embeddings():
  temperature = 0.1
  config = embed_config("jsonl:unused", temperature=temperature)
  config.model.dropout = 0.0
  model, objective = families.resolve(config).build(config, TOK)
  assert model.cfg.head == "pool" and model.cfg.pooling == "mean"
  params = draw_params(abstract_init(model.cfg), seed=1)
  pairs = [("a cat sat", "the cat sits"), ("dogs bark", "a dog barks"), ("hello", "hi there")]
  rows = pair_rows(pairs, [4.5, 4.0, 5.0])

  def embed(prefix):  # [B, D] from the pool head, and the last layer's states [B, L, D]
    seg_BL = rows["segment_ids" + prefix]
    out_BD, state = model.apply(
      {"params": params},
      rows["tokens" + prefix],
      rows["positions" + prefix],
      seg_BL,
      token_types_BL=rows["token_types" + prefix],
      capture_intermediates=lambda mdl, method: mdl.name == "block_1" and method == "__call__",
      mutable=["intermediates"],
    )
    x_BLD = np.asarray(state["intermediates"]["block_1"]["__call__"][0][0], np.float64)
    mean_BD = (x_BLD * seg_BL[..., None]).sum(1) / seg_BL.sum(1, keepdims=True)
    np.testing.assert_allclose(out_BD[0], mean_BD, rtol=1e-5, atol=1e-5)  # mean pooling
    return np.asarray(out_BD[0], np.float64)

  a_BD, b_BD = embed(""), embed("_b")
  a_BD /= np.linalg.norm(a_BD, axis=-1, keepdims=True)
  b_BD /= np.linalg.norm(b_BD, axis=-1, keepdims=True)
  sim_BB = a_BD @ b_BD.T / temperature
  diag_B = np.diagonal(sim_BB)
  loss_B = 0.5 * (logsumexp(sim_BB, 1) - diag_B) + 0.5 * (logsumexp(sim_BB, 0) - diag_B)

  step = jax.jit(lambda params, batch: objective(model, params, batch, jax.random.key(0), True))
  out = jax.device_get(step(params, rows))
  assert float(out["loss_sum"]) == pytest.approx(loss_B.sum(), rel=1e-5)
  assert float(out["weight"]) == 3
  assert float(out["correct"]) == (sim_BB.argmax(1) == np.arange(3)).sum()
  cosine_B = np.sum(a_BD * b_BD, -1)
  np.testing.assert_allclose(out["rows/prediction"], cosine_B, rtol=1e-5, atol=1e-6)
  assert (np.abs(out["rows/prediction"]) <= 1 + 1e-6).all()
  assert out["rows/target"].tolist() == [4.5, 4.0, 5.0]

  # Weight-0 rows are neither pairs nor anyone's negatives: the sums stay those of the 3 pairs
  # with the padding of the last eval batch (a copy of row 0 with its segments zeroed), and
  # with a weight-0 copy of row 0 left whole (unmasked, it would be a negative as close to
  # row 0 as row 0's own second text).
  (padded,) = labeled_eval_batches(rows, batch_size=4)
  assert padded["weight"].tolist() == [1, 1, 1, 0] and not padded["segment_ids"][3].any()
  duplicated = {k: np.concatenate([v, v[:1]]) for k, v in rows.items()}
  duplicated["weight"][3] = 0
  for batch in (duplicated, padded):
    more = jax.device_get(step(params, batch))
    for key in ("loss_sum", "weight", "correct"):
      assert float(more[key]) == pytest.approx(float(out[key]), rel=1e-5), key
    np.testing.assert_allclose(more["rows/prediction"][:3], out["rows/prediction"], rtol=1e-5)
    assert np.isfinite(more["rows/prediction"]).all()


# --- embeddings: end to end ------------------------------------------------------------------


def translation_pairs(n: int, seed: int = 0) -> list[dict]:
  """Sentences of four words and their word-for-word translations (score 5), or random
  sentences of the other language (score: the translated words they share). The languages
  share no word, so the scores barely follow an untrained encoder's similarities."""
  rng = np.random.default_rng(seed)
  a_words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
  b_words = "one two three four five six seven eight nine ten".split()
  translate = dict(zip(a_words, b_words, strict=True))
  out = []
  for _ in range(n):
    a = list(rng.choice(a_words, 4))
    if rng.random() < 0.5:
      b, score = [translate[w] for w in a], 5.0
    else:
      b = list(rng.choice(b_words, 4))
      score = float(len({translate[w] for w in a} & set(b)))
    out.append({"s1": " ".join(a), "s2": " ".join(b), "score": score})
  return out


def test_embed_trains_on_jsonl_pairs(tmp_path):
  config = embed_config(write_lines(tmp_path / "pairs.jsonl", translation_pairs(600)), seq_len=48)
  # One warmup step: step 1 updates with a learning rate of 0, so its eval is the untrained one.
  small_run(config, steps=60, batch_size=8, learning_rate=2e-3, min_learning_rate=2e-4)
  config.train.update(warmup_steps=1, eval_every=1, log_every=1)
  trainer.run(config, str(tmp_path / "run"))
  evals = {r["step"]: r for r in read_metrics(tmp_path / "run") if "eval/spearman" in r}
  assert sorted(evals) == list(range(1, 61))
  first, last = evals[1], evals[60]
  assert {"eval/loss", "eval/accuracy", "eval/pearson"} <= set(last)
  assert last["eval/spearman"] > 0.65 and last["eval/pearson"] > 0.6, last
  assert last["eval/spearman"] > first["eval/spearman"] + 0.3, (first, last)
  # (Not eval/loss: the eval pairs include unrelated ones, which the contrastive loss scores as
  # if they were positives, so it rises as the encoder learns to tell them apart.)
  train_loss = [evals[s]["train/loss"] for s in range(1, 61)]
  assert np.mean(train_loss[-10:]) < 0.5 * train_loss[0], train_loss


def test_embed_eval_counts_only_positive_pairs():
  """Pairs scored below task.min_score are negatives for the others, never positives: the
  loss and accuracy are over positive pairs only (eval keeps every scored pair)."""
  c = bert.get_config("size=tiny,task=embed")
  c.data.seq_len = 32
  model, objective = families.resolve(c).build(c, TOK)
  pairs = [("alpha beta", "beta alpha"), ("gamma", "delta"), ("eta theta", "theta eta")]
  batch = {k: jnp.asarray(v) for k, v in pair_rows(pairs, [5.0, 0.5, 4.5]).items()}
  tokens = batch["tokens"]
  params = model.init(jax.random.key(0), tokens, batch["positions"], batch["segment_ids"])
  sums = objective(model, params["params"], batch, jax.random.key(1), True)
  assert float(sums["weight"]) == 2.0  # the pair scored 0.5 is not a positive
  batch["label"] = jnp.asarray([5.0, 5.0, 4.5])
  assert float(objective(model, params["params"], batch, jax.random.key(1), True)["weight"]) == 3.0
