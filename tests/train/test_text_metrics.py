"""Metrics of decoded text (train/text_metrics.py) against hand-computed values and against the
reference packages (rouge-score, sacrebleu) called directly."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from train import text_metrics as metrics

PREDICTIONS = [
  "police killed the gunman after a standoff that lasted three hours",
  "The cats were running across the old wooden bridge.",
  "A new study finds coffee may lower the risk of heart disease",
  "the economy grew by 3 percent in the second quarter",
]
REFERENCES = [
  "the gunman was shot dead by police after a three-hour standoff",
  "The cat runs across an old bridge made of wood.",
  "coffee drinkers may have a lower risk of heart disease, a study finds",
  "the economy grew 3 percent in the second quarter, officials said",
]


def test_rouge_equals_rouge_score_with_stemming():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  scores = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
  got = metrics.rouge(PREDICTIONS, REFERENCES)
  assert set(got) == {"rouge1", "rouge2", "rougeL"}
  for key in got:
    expected = 100 * np.mean([s[key].fmeasure for s in scores])
    assert got[key] == pytest.approx(expected, rel=1e-9), key
  assert 0 < got["rouge2"] < got["rougeL"] <= got["rouge1"] < 100


def test_rouge_hand_computed():
  # 'the cat sat' vs 'the cat': unigrams P 2/3, R 1 -> F 0.8; bigrams P 1/2, R 1 -> F 2/3;
  # the longest common subsequence is 'the cat', as for unigrams.
  got = metrics.rouge(["the cat sat"], ["the cat"])
  assert got["rouge1"] == pytest.approx(80.0)
  assert got["rouge2"] == pytest.approx(200 / 3)
  assert got["rougeL"] == pytest.approx(80.0)
  # The mean over examples, F-measure of each; Porter stemming: 'cats running' is 'cat run'.
  got = metrics.rouge(["the cat sat", "cats running", "dog"], ["the cat", "cat run", "bird"])
  assert got["rouge1"] == pytest.approx((80.0 + 100.0 + 0.0) / 3)
  # ROUGE-L is about order, ROUGE-1 is not.
  got = metrics.rouge(["c b a"], ["a b c"])
  assert got["rouge1"] == pytest.approx(100.0) and got["rougeL"] == pytest.approx(100 / 3)


def test_bleu_equals_sacrebleus_corpus_score():
  expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
  assert metrics.bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected, rel=1e-9)
  assert 0 < expected < 100
  # Corpus BLEU pools the n-gram counts over examples (precisions 7/8, 5/6, 4/4, 3/3 here):
  # far from the mean of the sentence scores (100 and nearly 0).
  preds, refs = ["the cat sat on the mat", "hello there"], ["the cat sat on the mat", "hello world"]
  assert metrics.bleu(preds, refs) == pytest.approx(100 * (7 / 8 * 5 / 6) ** 0.25, rel=1e-6)
  assert sacrebleu.sentence_bleu(preds[1], [refs[1]]).score < 50


def test_bleu_hand_computed():
  assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
  # n-gram precisions 5/6, 3/5, 2/4, 1/3 at equal lengths (no brevity penalty).
  got = metrics.bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
  assert got == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, rel=1e-6)
  # Brevity penalty exp(1 - 6 / 4) when the 4-word output is all correct.
  got = metrics.bleu(["the cat sat on"], ["the cat sat on the mat"])
  assert got == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-6)
  assert metrics.bleu(["x y z w"], ["a b c d"]) == 0.0


def test_exact_match_strips_whitespace():
  assert metrics.exact_match([" abc\n", "abd", "x"], ["abc", "abc", " x"]) == pytest.approx(2 / 3)
  assert metrics.exact_match(["a b"], ["a  b"]) == 0.0  # inner whitespace counts
  assert metrics.exact_match(["Abc"], ["abc"]) == 0.0  # and case


def test_text_metrics_names_and_ranges():
  got = metrics.text_metrics(PREDICTIONS[:3] + [REFERENCES[3]], REFERENCES)
  assert list(got) == [
    "eval/exact_match",
    "eval/rouge1",
    "eval/rouge2",
    "eval/rougeL",
    "eval/bleu",
  ]
  assert got["eval/exact_match"] == 0.25
  assert all(0 < v < 100 for v in got.values())
  same = metrics.text_metrics(REFERENCES, REFERENCES)
  assert same == {
    "eval/exact_match": 1.0,
    "eval/rouge1": pytest.approx(100),
    "eval/rouge2": pytest.approx(100),
    "eval/rougeL": pytest.approx(100),
    "eval/bleu": pytest.approx(100),
  }


@pytest.mark.parametrize(
  "fn", [metrics.exact_match, metrics.rouge, metrics.bleu, metrics.text_metrics]
)
def test_length_mismatch_and_empty_are_errors(fn):
  with pytest.raises(ValueError, match="2 predictions for 1 references"):
    fn(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="0 predictions for 0 references"):
    fn([], [])
