"""Metrics of decoded text: exact match, ROUGE-1/2/L (Google's `rouge-score`) and BLEU
(`sacrebleu`), under the metric names of docs/ARCHITECTURE.md.

Exact match is a fraction in [0, 1] (after stripping surrounding whitespace); ROUGE is the
mean F-measure and BLEU the corpus score, both on the 0-100 scale papers report.
"""

from __future__ import annotations

import numpy as np


def exact_match(predictions: list[str], references: list[str]) -> float:
  _check(predictions, references)
  return float(
    np.mean([p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)])
  )


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (Porter stemming, as in the T5 paper)."""
  from rouge_score import rouge_scorer

  _check(predictions, references)
  kinds = ("rouge1", "rouge2", "rougeL")
  scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
  scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
  return {k: 100.0 * float(np.mean([s[k].fmeasure for s in scores])) for k in kinds}


def bleu(predictions: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu's defaults: 13a tokenization, one reference per example)."""
  import sacrebleu

  _check(predictions, references)
  return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
  """eval/exact_match, eval/rouge1, eval/rouge2, eval/rougeL, eval/bleu."""
  out = {"eval/exact_match": exact_match(predictions, references)}
  out.update({f"eval/{k}": v for k, v in rouge(predictions, references).items()})
  out["eval/bleu"] = bleu(predictions, references)
  return out


def _check(predictions: list[str], references: list[str]) -> None:
  if len(predictions) != len(references) or not references:
    raise ValueError(
      f"{len(predictions)} predictions for {len(references)} references: need as many, > 0"
    )
