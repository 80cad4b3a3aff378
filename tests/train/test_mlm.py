"""Masked language modeling: BERT's 80/10/10 corruption, the objective's sums, and an encoder
pretrained end to end (metrics, resume)."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import bert
from modeling.vocab import MASK_ID, NUM_SPECIAL
from tests.tiny_models import random_params, short_run, tiny_config
from train import families, trainer
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics
from train.objectives import mask_tokens

VOCAB = ByteTokenizer.vocab_size
PROBS = (0.15, 0.8, 0.1)  # mask_prob, mask_token_prob, random_token_prob: BERT's
mask_fn = jax.jit(mask_tokens, static_argnums=(3, 4, 5, 6))


def packed_tokens(seed: int, shape: tuple[int, int]):
  """Ordinary tokens with some special ids among them; rows end with padding whose token ids
  are ordinary, so only the segment id marks them."""
  rng = np.random.default_rng(seed)
  tokens_BL = rng.integers(NUM_SPECIAL, VOCAB, shape)
  special_BL = rng.random(shape) < 0.05
  tokens_BL[special_BL] = rng.integers(0, NUM_SPECIAL, special_BL.sum())
  length = shape[1]
  idx_L = np.arange(length)
  seg_BL = np.zeros(shape, np.int64)
  for row, end in enumerate(rng.integers(length // 2, length + 1, shape[0])):
    seg_BL[row] = np.where(idx_L < end, 1 + (idx_L >= end // 2), 0)
  return tokens_BL.astype(np.int32), seg_BL.astype(np.int32)


def within(share: float, p: float, n: int, sigmas: float = 5.0) -> bool:
  return abs(share - p) < sigmas * np.sqrt(p * (1 - p) / n)


def test_masking_follows_berts_proportions():
  counts = dict(eligible=0, selected=0, masked=0, replaced=0, kept=0)
  replacements = []
  for seed in range(8):
    tokens_BL, seg_BL = packed_tokens(seed, (64, 512))
    inputs_BL, selected_BL = (
      np.asarray(a) for a in mask_fn(jax.random.key(seed), tokens_BL, seg_BL, VOCAB, *PROBS)
    )
    eligible_BL = (seg_BL > 0) & (tokens_BL >= NUM_SPECIAL)
    assert not selected_BL[~eligible_BL].any()  # never special tokens, never padding
    assert (seg_BL == 0).sum() > 1000 and (eligible_BL & (seg_BL > 0)).sum() > 1000
    np.testing.assert_array_equal(inputs_BL[~selected_BL], tokens_BL[~selected_BL])
    chosen_N, inputs_N = tokens_BL[selected_BL], inputs_BL[selected_BL]
    replaced_N = (inputs_N != MASK_ID) & (inputs_N != chosen_N)
    assert ((inputs_N == MASK_ID) | (inputs_N >= NUM_SPECIAL) & (inputs_N < VOCAB)).all()
    replacements.append(inputs_N[replaced_N])
    counts["eligible"] += eligible_BL.sum()
    counts["selected"] += selected_BL.sum()
    counts["masked"] += (inputs_N == MASK_ID).sum()
    counts["replaced"] += replaced_N.sum()
    counts["kept"] += (inputs_N == chosen_N).sum()

  n, selected = counts["eligible"], counts["selected"]
  assert within(selected / n, 0.15, n), counts
  assert within(counts["masked"] / selected, 0.8, selected), counts
  # A random token equals the original with probability 1 / 256: then it counts as kept.
  same = 1 / (VOCAB - NUM_SPECIAL)
  assert within(counts["replaced"] / selected, 0.1 * (1 - same), selected), counts
  assert within(counts["kept"] / selected, 0.1 + 0.1 * same, selected), counts
  # Random tokens are ordinary tokens, all of them: ~2,800 draws cover the 256 ids.
  replacements = np.concatenate(replacements)
  assert len(replacements) > 2500
  assert replacements.min() == NUM_SPECIAL and replacements.max() == VOCAB - 1


def test_masks_depend_on_the_rng_only():
  tokens_BL, seg_BL = packed_tokens(0, (8, 128))
  a = mask_fn(jax.random.key(1), tokens_BL, seg_BL, VOCAB, *PROBS)
  again = mask_fn(jax.random.key(1), tokens_BL, seg_BL, VOCAB, *PROBS)
  other = mask_fn(jax.random.key(2), tokens_BL, seg_BL, VOCAB, *PROBS)
  np.testing.assert_array_equal(again[0], a[0])
  np.testing.assert_array_equal(again[1], a[1])
  selected = np.asarray(a[1])
  assert (np.asarray(other[1]) != selected).sum() > 0.5 * selected.sum()
  assert (np.asarray(other[0]) != np.asarray(a[0])).any()


# --- the objective ---------------------------------------------------------------------------


class Recorder:
  """A model whose `apply` records the input tokens and logits of every call."""

  def __init__(self, model):
    self.model, self.calls = model, []
    self._apply = jax.jit(model.apply, static_argnames="deterministic")

  def apply(self, variables, tokens_BL, *args, **kwargs):
    out = self._apply(variables, tokens_BL, *args, **kwargs)
    self.calls.append((np.asarray(tokens_BL), np.asarray(out[0], np.float64)))
    return out


def mlm_setup(**task):
  config = bert.get_config("size=tiny,arch=bert")
  config.data.seq_len = 32
  config.task.update(task)
  model, objective = families.resolve(config).build(config, ByteTokenizer())
  tokens_BL, seg_BL = packed_tokens(3, (4, 32))
  pos_BL = np.zeros_like(seg_BL)
  for row in range(4):
    for s in (1, 2):
      pos_BL[row, seg_BL[row] == s] = np.arange((seg_BL[row] == s).sum())
  batch = {"tokens": tokens_BL, "segment_ids": seg_BL, "positions": pos_BL}
  return Recorder(model), objective, random_params(model.cfg), batch


def test_mlm_objective_counts_the_selected_tokens():
  # With every selected token shown as [MASK], the selected tokens are visible in the input.
  model, objective, params, batch = mlm_setup(mask_token_prob=1.0, random_token_prob=0.0)
  sums = objective(model, params, batch, jax.random.key(0), deterministic=True)
  (inputs_BL, logits_BLV), tokens_BL = model.calls[0], batch["tokens"]
  masked_BL = inputs_BL == MASK_ID
  np.testing.assert_array_equal(inputs_BL[~masked_BL], tokens_BL[~masked_BL])
  assert masked_BL.sum() >= 5 and not (masked_BL & (tokens_BL < NUM_SPECIAL)).any()
  assert not (masked_BL & (batch["segment_ids"] == 0)).any()
  assert float(sums["weight"]) == masked_BL.sum()
  # The loss and accuracy are those of the original tokens at the masked positions.
  logits_NV, targets_N = logits_BLV[masked_BL], tokens_BL[masked_BL]
  top_N = logits_NV.max(-1)
  lse_N = top_N + np.log(np.exp(logits_NV - top_N[:, None]).sum(-1))
  nll_N = lse_N - logits_NV[np.arange(len(targets_N)), targets_N]
  np.testing.assert_allclose(float(sums["loss_sum"]), nll_N.sum(), rtol=1e-5)
  correct = (logits_NV.argmax(-1) == targets_N).sum()
  assert float(sums["mlm_correct"]) == correct <= masked_BL.sum()


def test_mlm_objective_with_berts_corruption():
  model, objective, params, batch = mlm_setup()
  first = objective(model, params, batch, jax.random.key(0), deterministic=True)
  again = objective(model, params, batch, jax.random.key(0), deterministic=True)
  other = objective(model, params, batch, jax.random.key(1), deterministic=True)
  changed = [(inputs_BL != batch["tokens"]).sum() for inputs_BL, _ in model.calls]
  assert changed[0] > 0 and changed[2] > 0
  np.testing.assert_array_equal(model.calls[1][0], model.calls[0][0])
  assert (model.calls[2][0] != model.calls[0][0]).any()
  for sums, n_changed in ((first, changed[0]), (other, changed[2])):
    assert np.isfinite(float(sums["loss_sum"])) and float(sums["loss_sum"]) > 0
    assert n_changed <= float(sums["weight"])  # some selected tokens are kept as they are
    assert 0 <= float(sums["mlm_correct"]) <= float(sums["weight"])
  assert {k: float(v) for k, v in again.items()} == {k: float(v) for k, v in first.items()}
  assert float(other["loss_sum"]) != float(first["loss_sum"])


# --- end to end ------------------------------------------------------------------------------


def tiny_bert(**train):
  c = tiny_config("bert", "arch=bert", 0.0, name="tiny_shakespeare", seq_len=32, shuffle_window=16)
  return short_run(
    c, 30, **{"learning_rate": 3e-3, "min_learning_rate": 3e-4, "eval_every": 30, **train}
  )


def by_step(workdir, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def test_bert_pretrains_and_resumes_exactly(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  with tfds.testing.mock_data(num_examples=8):
    last = trainer.run(tiny_bert(), str(straight))
    # Resume from the mid-run checkpoint: a copy of the run as it was after step 15.
    shutil.copytree(straight / "checkpoints" / "15", resumed / "checkpoints" / "15")
    resumed_last = trainer.run(tiny_bert(), str(resumed))

  assert sorted(os.listdir(straight / "checkpoints")) == ["15", "30"]
  loss = by_step(straight, "train/loss")
  assert sorted(loss) == list(range(1, 31))
  assert sorted(by_step(straight, "train/mlm_accuracy")) == list(range(1, 31))
  assert "train/accuracy" not in read_metrics(straight)[0]
  first, late = np.mean([loss[s] for s in range(1, 4)]), np.mean([loss[s] for s in range(26, 31)])
  assert late < first - 1.0, loss
  # At init the tied head's logits are small: the first loss is near a uniform guess's
  # (log V + 0.077 on this data; logits 3x larger would add about 0.7).
  assert loss[1] == pytest.approx(np.log(VOCAB), abs=0.1), loss[1]
  assert 0 < last["eval/mlm_accuracy"] <= 1 and last["train/mlm_accuracy"] > 0
  assert np.isfinite(last["eval/loss"]) and last["eval/loss"] < first - 1.0
  assert "eval/bits_per_byte" not in last and "eval/accuracy" not in last
  assert set(by_step(straight, "eval/mlm_accuracy")) == {30}

  # The masks of a step come from fold_in(seed, step): the resumed steps see the same ones.
  resumed_loss = by_step(resumed, "train/loss")
  assert sorted(resumed_loss) == list(range(16, 31))
  assert resumed_loss == {s: loss[s] for s in range(16, 31)}
  assert resumed_last["eval/loss"] == last["eval/loss"]
  assert resumed_last["eval/mlm_accuracy"] == last["eval/mlm_accuracy"]


def test_unigram_baseline_counts_the_most_frequent_ordinary_token(tmp_path):
  """On a corpus where 'a' is 3/4 of the bytes, the baseline is about 3/4 on train and eval,
  and the framing tokens ([CLS], [SEP]) are never counted."""
  from bench.unigram_baseline import count_tokens, unigram_baseline

  (tmp_path / "docs.txt").write_text("aaab" * 2000)
  c = bert.get_config("size=tiny")
  c.data.update(name=f"text:{tmp_path / 'docs.txt'}", seq_len=32, shuffle_window=8)
  c.train.update(batch_size=4, eval_steps=4)
  top, train_share, eval_share = unigram_baseline(c, train_batches=20)
  assert top == ord("a") + 8  # byte ids follow the 8 special ids
  assert train_share == pytest.approx(0.75, abs=0.02)
  assert eval_share == pytest.approx(0.75, abs=0.02)
  batch = {
    "tokens": np.array([[4, 20, 20, 5, 0]]),
    "segment_ids": np.array([[1, 1, 1, 1, 0]]),
  }
  assert count_tokens([batch]) == {20: 2}
