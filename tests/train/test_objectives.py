"""Each objective of train/objectives.py against a float64 NumPy reference on a 2 x 8 batch.

The model is a stand-in whose `apply` returns fixed outputs and records what it was given,
so what is tested is the objective's arithmetic: which positions and rows count (segment
boundaries, padding, the decoder's shifted input, the MLM draw, ignored sub-words, padding
rows of a contrastive batch) and how each sum is formed. The references are plain loops.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from modeling.vocab import BOS_ID, EOS_ID, FOURFOLD, MASK_ID, NUM_SPECIAL, Specials
from train import objectives

B, L, V = 2, 8, 16
RTOL = 1e-5
# Row 0: two documents (3 + 5 tokens); row 1: one document of 5 tokens, then 3 of padding.
SEG_BL = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
POS_BL = np.array([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 0, 0]], np.int32)


class StandIn:
  """A model whose `apply` returns fixed outputs, whatever its inputs: `out`, or for a dict,
  the output keyed by the input tokens' bytes. Each call's arguments are kept in `calls`."""

  def __init__(self, out, time_conditioning: bool = False):
    self.out, self.calls = out, []
    self.cfg = types.SimpleNamespace(time_conditioning=time_conditioning)

  def apply(self, variables, tokens_BL, *args, **kwargs):
    self.calls.append((np.asarray(tokens_BL), args, kwargs))
    if isinstance(self.out, dict):
      return jnp.asarray(self.out[np.asarray(tokens_BL).tobytes()]), None
    return jnp.asarray(self.out), None


def packed_tokens(seed: int) -> np.ndarray:
  """Ordinary tokens with an EOS ending each document, zeros in the padding."""
  tokens_BL = np.random.default_rng(seed).integers(NUM_SPECIAL, V, (B, L)).astype(np.int32)
  tokens_BL[0, 2] = tokens_BL[0, 7] = tokens_BL[1, 4] = EOS_ID
  return np.where(SEG_BL > 0, tokens_BL, 0).astype(np.int32)


def packed_batch(seed: int = 0) -> dict[str, np.ndarray]:
  return {"tokens": packed_tokens(seed), "positions": POS_BL, "segment_ids": SEG_BL}


def logits(seed: int, *shape: int) -> np.ndarray:
  """float32 logits with spread enough that argmaxes and losses differ across positions."""
  return (2.0 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def nll(logits_V: np.ndarray, target: int) -> float:
  """-log softmax(logits)[target] in float64."""
  x = logits_V.astype(np.float64)
  return float(np.log(np.sum(np.exp(x - x.max()))) + x.max() - x[target])


def sums(out: dict) -> dict[str, np.ndarray]:
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def check(got: dict, want: dict) -> None:
  """Every reference sum equals the objective's (and the objective returns no other)."""
  assert set(got) == set(want), (sorted(got), sorted(want))
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=RTOL, atol=1e-6, err_msg=k)


def task_config(**keys) -> ml_collections.ConfigDict:
  """base.py's task keys with `keys` set."""
  t = base.get_config().task
  t.update(keys)
  return t


RNG = jax.random.key(7)


# --- packed documents: causal LM -------------------------------------------------------------


def test_causal_lm_predicts_the_next_token_inside_each_document():
  batch = packed_batch()
  logits_BLV = logits(1, B, L, V)
  logits_BLV[0, 4, batch["tokens"][0, 5]] += 10.0  # one certainly correct argmax
  out = sums(
    objectives.make_causal_lm(task_config(), V, FOURFOLD)(StandIn(logits_BLV), {}, batch, RNG, True)
  )
  tokens = batch["tokens"]
  want = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0, "bytes": 0.0}
  for b in range(B):
    for i in range(L - 1):
      if SEG_BL[b, i + 1] == 0 or SEG_BL[b, i + 1] != SEG_BL[b, i]:
        continue  # no target across a boundary, none in the padding
      target = tokens[b, i + 1]
      want["loss_sum"] += nll(logits_BLV[b, i], target)
      want["weight"] += 1
      want["correct"] += float(np.argmax(logits_BLV[b, i]) == target)
      want["bytes"] += float(target >= NUM_SPECIAL)
  # Row 0: 2 + 4 targets; row 1: 4; the three EOS targets are not bytes.
  assert (want["weight"], want["bytes"]) == (10, 7) and want["correct"] >= 1
  check(out, want)


# A BERT-like layout within V = 16 ids: [PAD] 0, ordinary 1..8, [UNK] 9, [CLS] 10, [SEP] 11,
# [MASK] 12, ordinary 13..15; T5's habit of starting the decoder at [PAD]. Nothing sits at
# fourfold's ids, so a hard-coded id shows.
OWN = Specials(
  pad=0,
  eos=11,
  bos=None,
  mask=12,
  cls=10,
  sep=11,
  unk=9,
  decoder_start=0,
  special_ranges=((0, 1), (9, 13)),
)
OWN_ORDINARY = [i for i in range(V) if i not in (0, 9, 10, 11, 12)]


def test_causal_lm_counts_the_tokenizers_own_special_ids_as_not_text():
  batch = packed_batch()
  tokens = batch["tokens"]
  tokens[0, 3], tokens[1, 1] = 9, 12  # two of OWN's specials; fourfold's 1 (EOS) is text here
  model = StandIn(logits(1, B, L, V))
  out = sums(objectives.make_causal_lm(task_config(), V, OWN)(model, {}, batch, RNG, True))
  weights = (SEG_BL[:, 1:] == SEG_BL[:, :-1]) & (SEG_BL[:, 1:] > 0)
  targets = tokens[:, 1:][weights]
  want = sum(t in OWN_ORDINARY for t in targets)
  assert out["bytes"] == want != sum(t >= NUM_SPECIAL for t in targets)


# --- encoder-decoder: teacher forcing ----------------------------------------------------------


def test_seq2seq_feeds_the_shifted_targets_and_scores_every_real_target():
  source = packed_batch(0)
  # Targets: row 0 two examples (4 + 3 tokens) then padding, row 1 one of 6.
  tseg_BL = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]], np.int32)
  tpos_BL = np.array([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 0]], np.int32)
  targets_BL = np.where(tseg_BL > 0, packed_tokens(2), 0).astype(np.int32)
  batch = {
    **source,
    "targets": targets_BL,
    "targets_positions": tpos_BL,
    "targets_segment_ids": tseg_BL,
  }
  logits_BLV = logits(3, B, L, V)
  model = StandIn(logits_BLV)
  out = sums(objectives.make_seq2seq(task_config(), V, FOURFOLD)(model, {}, batch, RNG, True))

  ((tokens_BL, args, kwargs),) = model.calls
  np.testing.assert_array_equal(tokens_BL, source["tokens"])  # the encoder reads the source
  np.testing.assert_array_equal(args[0], source["positions"])
  np.testing.assert_array_equal(args[1], source["segment_ids"])
  decoder_in_BL = np.zeros((B, L), np.int32)
  for b in range(B):
    for i in range(L):
      decoder_in_BL[b, i] = BOS_ID if tpos_BL[b, i] == 0 else targets_BL[b, i - 1]
  np.testing.assert_array_equal(kwargs["targets_in_BL"], decoder_in_BL)
  assert kwargs["targets_in_BL"][0, 4] == BOS_ID  # the second example starts afresh
  np.testing.assert_array_equal(kwargs["targets_positions_BL"], tpos_BL)
  np.testing.assert_array_equal(kwargs["targets_segment_ids_BL"], tseg_BL)
  # A tokenizer whose decoder starts elsewhere (T5: at [PAD], 0) gets its own start.
  model = StandIn(logits_BLV)
  objectives.make_seq2seq(task_config(), V, OWN)(model, {}, batch, RNG, True)
  starts_BL = model.calls[0][2]["targets_in_BL"]
  np.testing.assert_array_equal(starts_BL, np.where(tpos_BL == 0, 0, decoder_in_BL))

  want = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
  for b in range(B):
    for i in range(L):
      if tseg_BL[b, i] > 0:
        want["loss_sum"] += nll(logits_BLV[b, i], targets_BL[b, i])
        want["weight"] += 1
        want["correct"] += float(np.argmax(logits_BLV[b, i]) == targets_BL[b, i])
  assert want["weight"] == 13
  check(out, want)


# --- encoder pretraining: MLM ------------------------------------------------------------------


FOURFOLD_ORDINARY = list(range(NUM_SPECIAL, V))


@pytest.mark.parametrize(
  "seed, specials, mask_id, ordinary_ids",
  [
    (0, FOURFOLD, MASK_ID, FOURFOLD_ORDINARY),
    (1, FOURFOLD, MASK_ID, FOURFOLD_ORDINARY),
    (2, FOURFOLD, MASK_ID, FOURFOLD_ORDINARY),
    (0, OWN, 12, OWN_ORDINARY),
    (1, OWN, 12, OWN_ORDINARY),
  ],
  ids=["fourfold-0", "fourfold-1", "fourfold-2", "own-ids-0", "own-ids-1"],
)
def test_mlm_scores_the_original_tokens_at_the_drawn_positions(
  seed, specials, mask_id, ordinary_ids
):
  """The draw is BERT's: each ordinary real token selected with mask_prob; of those, u <
  mask_token_prob become the tokenizer's [MASK], the next random_token_prob a random ordinary
  token (the n-th of the tokenizer's ordinary ids, n uniform), the rest stay. The reference
  redraws the same uniforms and decides in NumPy."""
  t = task_config(mask_prob=0.5, mask_token_prob=0.5, random_token_prob=0.25)
  batch = packed_batch(seed)
  tokens_BL = batch["tokens"]
  if specials is OWN:  # the packed documents end with OWN's [SEP], and hold its [UNK]
    tokens_BL[tokens_BL == EOS_ID] = 11
    tokens_BL[1, 1] = 9
  logits_BLV = logits(4 + seed, B, L, V)
  model = StandIn(logits_BLV)
  rng = jax.random.key(seed)
  out = sums(objectives.make_mlm(t, V, specials)(model, {}, batch, rng, True))

  r_select, r_kind, r_token = jax.random.split(jax.random.split(rng)[0], 3)
  u_select = np.asarray(jax.random.uniform(r_select, (B, L)), np.float64)
  u_kind = np.asarray(jax.random.uniform(r_kind, (B, L)), np.float64)
  first = ordinary_ids[0]
  n_BL = np.asarray(jax.random.randint(r_token, (B, L), first, first + len(ordinary_ids))) - first
  random_ids = np.asarray(ordinary_ids)[n_BL]
  inputs_BL, selected = tokens_BL.copy(), []
  for b in range(B):
    for i in range(L):
      ordinary = SEG_BL[b, i] > 0 and tokens_BL[b, i] in ordinary_ids
      if not (ordinary and u_select[b, i] < t.mask_prob):
        continue
      selected.append((b, i))
      if u_kind[b, i] < t.mask_token_prob:
        inputs_BL[b, i] = mask_id
      elif u_kind[b, i] < t.mask_token_prob + t.random_token_prob:
        inputs_BL[b, i] = random_ids[b, i]
  ((seen_BL, args, _),) = model.calls
  np.testing.assert_array_equal(seen_BL, inputs_BL)
  np.testing.assert_array_equal(args[1], SEG_BL)
  assert 0 < len(selected) < 10  # of the 10 ordinary real tokens, some drawn, some not
  want = {
    "loss_sum": sum(nll(logits_BLV[b, i], tokens_BL[b, i]) for b, i in selected),
    "weight": len(selected),
    "mlm_correct": sum(float(np.argmax(logits_BLV[b, i]) == tokens_BL[b, i]) for b, i in selected),
  }
  check(out, want)


def test_mlm_random_tokens_are_the_tokenizers_ordinary_ids_all_of_them():
  """With [MASK] and the specials in the middle of the vocabulary, random replacements are
  drawn over the ordinary ids on both sides of them, never a special one."""
  tokens_BL = np.asarray(OWN_ORDINARY * 300, np.int32).reshape(60, -1)
  seg_BL = np.ones_like(tokens_BL)
  inputs_BL, selected_BL = (
    np.asarray(a)
    for a in objectives.mask_tokens(jax.random.key(3), tokens_BL, seg_BL, V, 0.5, 0.0, 1.0, OWN)
  )
  drawn = inputs_BL[np.asarray(selected_BL)]
  assert set(drawn.tolist()) == set(OWN_ORDINARY)  # ~825 draws over 11 ids: every one
  with pytest.raises(ValueError, match="no mask token"):
    objectives.make_mlm(task_config(), V, Specials(mask=None))


# --- labeled rows: classify, regress, NER ----------------------------------------------------


def labeled_batch(weight_B) -> dict[str, np.ndarray]:
  """Two [CLS] ... [SEP] rows (the second shorter), token types A then B."""
  seg_BL = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)
  return {
    "tokens": packed_tokens(5) * (seg_BL > 0),
    "positions": np.where(seg_BL > 0, np.arange(L), 0).astype(np.int32),
    "segment_ids": seg_BL,
    "token_types": np.array([[0] * 4 + [1] * 4, [0] * 3 + [1] * 2 + [0] * 3], np.int32),
    "weight": np.asarray(weight_B, np.float32),
  }


def test_labeled_objectives_pass_the_token_types():
  batch = {**labeled_batch([1, 1]), "label": np.array([0, 1], np.int32)}
  model = StandIn(logits(6, B, 3))
  objectives.make_classify(task_config(), V, FOURFOLD)(model, {}, batch, RNG, True)
  ((tokens_BL, args, kwargs),) = model.calls
  np.testing.assert_array_equal(tokens_BL, batch["tokens"])
  np.testing.assert_array_equal(kwargs["token_types_BL"], batch["token_types"])


@pytest.mark.parametrize("weight_B", [[1, 1], [1, 0]], ids=["both", "padding_row"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_classify_sums_and_per_class_counts(weight_B, seed):
  C = 3
  rng = np.random.default_rng(seed)
  label_B = rng.integers(0, C, B).astype(np.int32)
  logits_BC = logits(10 + seed, B, C)
  batch = {**labeled_batch(weight_B), "label": label_B}
  out = sums(
    objectives.make_classify(task_config(), V, FOURFOLD)(StandIn(logits_BC), {}, batch, RNG, True)
  )
  want = {k: np.zeros(C) for k in ("tp", "fp", "fn")}
  want.update(loss_sum=0.0, weight=0.0, correct=0.0)
  for b in range(B):
    if not weight_B[b]:
      continue  # a padding row counts nowhere
    pred, true = int(np.argmax(logits_BC[b])), int(label_B[b])
    want["loss_sum"] += nll(logits_BC[b], true)
    want["weight"] += 1
    want["correct"] += float(pred == true)
    want["tp"][pred] += pred == true
    want["fp"][pred] += pred != true
    want["fn"][true] += pred != true
  check(out, want)


@pytest.mark.parametrize("weight_B", [[1, 1], [1, 0]], ids=["both", "padding_row"])
def test_regress_sums_the_squared_error_of_the_first_unit(weight_B):
  out_B1 = np.array([[0.25], [-1.5]], np.float32)
  target_B = np.array([1.0, 2.0], np.float32)
  batch = {**labeled_batch(weight_B), "label": target_B}
  out = sums(
    objectives.make_regress(task_config(), V, FOURFOLD)(StandIn(out_B1), {}, batch, RNG, True)
  )
  want = {
    "loss_sum": sum(
      w * (p - y) ** 2 for w, p, y in zip(weight_B, [0.25, -1.5], [1, 2], strict=True)
    ),
    "weight": sum(weight_B),
    "rows/prediction": [0.25, -1.5],
    "rows/target": [1.0, 2.0],
    "rows/weight": weight_B,
  }
  assert want["loss_sum"] == (0.5625 + 12.25 if weight_B[1] else 0.5625)
  check(out, want)


@pytest.mark.parametrize("weight_B", [[1, 1], [1, 0]], ids=["both", "padding_row"])
def test_ner_scores_each_words_first_piece_only(weight_B):
  C = 5
  # -1: [CLS], [SEP], later pieces of a word, padding
  labels_BL = np.array([[-1, 1, -1, 2, 0, -1, 3, -1], [-1, 4, 0, -1, -1, -1, -1, -1]], np.int32)
  dropped_BK = np.array([[-1, -1], [2, -1]], np.int32)
  logits_BLC = logits(20, B, L, C)
  batch = {**labeled_batch(weight_B), "labels": labels_BL, "dropped": dropped_BK}
  out = sums(
    objectives.make_ner(task_config(), V, FOURFOLD)(StandIn(logits_BLC), {}, batch, RNG, True)
  )
  want = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
  for b in range(B):
    for i in range(L):
      if weight_B[b] and labels_BL[b, i] >= 0:
        want["loss_sum"] += nll(logits_BLC[b, i], labels_BL[b, i])
        want["weight"] += 1
        want["correct"] += float(np.argmax(logits_BLC[b, i]) == labels_BL[b, i])
  assert want["weight"] == (6 if weight_B[1] else 4)
  want.update(
    {
      "rows/prediction": np.argmax(logits_BLC, -1),
      "rows/labels": labels_BL,
      "rows/dropped": dropped_BK,
      "rows/weight": weight_B,
    }
  )
  check(out, want)


# --- sentence pairs: in-batch contrastive ------------------------------------------------------


def pair_batch(weight_B, label_B) -> tuple[dict, dict]:
  """(batch, {tokens bytes: pooled output}): four rows whose second texts (`*_b`) differ."""
  first, second = labeled_batch([1, 1]), labeled_batch([1, 1])
  first = {k: np.concatenate([v, v[::-1]]) for k, v in first.items()}
  second = {k: np.concatenate([v, v[::-1]]) for k, v in second.items()}
  second["tokens"] = (second["tokens"] + 1) * (second["segment_ids"] > 0)
  batch = {
    **first,
    **{f"{k}_b": v for k, v in second.items() if k != "weight"},
    "weight": np.asarray(weight_B, np.float32),
    "label": np.asarray(label_B, np.float32),
  }
  rng = np.random.default_rng(30)
  a_BD = rng.standard_normal((4, 6)).astype(np.float32)
  b_BD = (a_BD + rng.standard_normal((4, 6))).astype(np.float32)  # near its own first text
  outs = {first["tokens"].tobytes(): 3.0 * a_BD, second["tokens"].tobytes(): b_BD}
  return batch, outs


@pytest.mark.parametrize(
  "weight_B, label_B, min_score",
  [
    ([1, 1, 1, 1], [np.nan] * 4, 0.0),  # unscored: every pair is a positive
    ([1, 1, 1, 0], [4.0, 1.0, 3.5, 5.0], 3.0),  # row 1 only a negative, row 3 padding
  ],
  ids=["unscored", "scored_with_padding"],
)
def test_embed_in_batch_contrastive_loss(weight_B, label_B, min_score):
  temperature = 0.1
  batch, outs = pair_batch(weight_B, label_B)
  t = task_config(temperature=temperature, min_score=min_score)
  out = sums(objectives.make_embed(t, V, FOURFOLD)(StandIn(outs), {}, batch, RNG, True))

  a_BD = outs[batch["tokens"].tobytes()].astype(np.float64)
  b_BD = outs[batch["tokens_b"].tobytes()].astype(np.float64)
  a_BD /= np.linalg.norm(a_BD, axis=-1, keepdims=True)  # the scale of the output is ignored
  b_BD /= np.linalg.norm(b_BD, axis=-1, keepdims=True)
  sim_BB = a_BD @ b_BD.T / temperature
  real = [j for j in range(4) if weight_B[j]]
  want = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
  for i in range(4):
    positive = weight_B[i] and (math.isnan(label_B[i]) or label_B[i] >= min_score)
    if not positive:
      continue
    row = math.log(sum(math.exp(sim_BB[i, j]) for j in real)) - sim_BB[i, i]
    col = math.log(sum(math.exp(sim_BB[j, i]) for j in real)) - sim_BB[i, i]
    want["loss_sum"] += 0.5 * (row + col)
    want["weight"] += 1
    want["correct"] += float(max(real, key=lambda j: sim_BB[i, j]) == i)
  assert want["weight"] == (4 if weight_B[3] else 2)
  want.update(
    {
      "rows/prediction": np.sum(a_BD * b_BD, axis=-1),
      "rows/target": label_B,
      "rows/weight": weight_B,
    }
  )
  check(out, want)


# --- masked diffusion: the NELBO ---------------------------------------------------------------


def weight_of(schedule: str, t: float, exponent: float) -> float:
  """w(t) = -alpha'(t) / (1 - alpha(t)), written out per schedule."""
  if schedule == "loglinear":
    return 1.0 / t
  if schedule == "cosine":
    return math.pi / 2 * math.tan(math.pi / 2 * (1.0 - t))
  return exponent / t


def subs_nll(logits_V: np.ndarray, target: int) -> float:
  """-log p(target) with [MASK] given no probability."""
  x = logits_V.astype(np.float64).copy()
  x[MASK_ID] = -np.inf
  return nll(x, target)


def diffusion_draws(model, batch, logits_BLV, estimator: str, schedule: str, exponent: float):
  """The reference NELBO of each recorded call, from the masks and times the model saw."""
  tokens_BL, draws = batch["tokens"], []
  for z_BL, _, kwargs in model.calls:
    t_B = np.asarray(kwargs["time_B"], np.float64)
    n_B = (SEG_BL > 0).sum(-1)
    total = 0.0
    for b in range(B):
      masked = [i for i in range(L) if z_BL[b, i] == MASK_ID]
      assert all(SEG_BL[b, i] > 0 for i in masked)  # padding is never masked
      unmasked = [i for i in range(L) if i not in masked]
      np.testing.assert_array_equal(z_BL[b, unmasked], tokens_BL[b, unmasked])
      if estimator == "count":
        w = n_B[b] / len(masked)  # exactly k of n masked, t = k / n
        assert len(masked) >= 1 and t_B[b] == pytest.approx(len(masked) / n_B[b])
      else:
        w = weight_of(schedule, t_B[b], exponent)
      total += w * sum(subs_nll(logits_BLV[b, i], tokens_BL[b, i]) for i in masked)
    draws.append(total)
  return draws


@pytest.mark.parametrize(
  "schedule, exponent", [("loglinear", 1.0), ("cosine", 1.0), ("polynomial", 2.0)]
)
def test_diffusion_training_draw_is_the_weighted_masked_nll(schedule, exponent):
  """One draw: a time per row (antithetic: spaced 1/B apart), the masks, then w(t) times the
  SUBS cross-entropy summed over the masked positions."""
  t = task_config(schedule=schedule, schedule_exponent=exponent, estimator="time")
  batch = packed_batch(3)
  logits_BLV = logits(40, B, L, V)
  model = StandIn(logits_BLV, time_conditioning=True)
  totals = []
  for seed in range(4):  # several draws, so that some mask a position of each row
    model.calls.clear()
    out = sums(
      objectives.make_diffusion(t, V, FOURFOLD)(model, {}, batch, jax.random.key(seed), False)
    )
    (draw,) = diffusion_draws(model, batch, logits_BLV, "time", schedule, exponent)
    t_B = np.asarray(model.calls[0][2]["time_B"], np.float64)
    assert np.all((t_B > 0) & (t_B <= 1)) and abs(t_B[0] - t_B[1]) == pytest.approx(0.5)
    check(out, {"loss_sum": draw, "weight": 13.0, "bytes": 10.0})  # 3 EOS are not bytes
    totals.append(draw)
  assert min(totals) > 0 and len(set(totals)) == 4


def test_diffusion_count_estimator_weighs_by_n_over_k():
  t = task_config(estimator="count")
  batch = packed_batch(4)
  logits_BLV = logits(41, B, L, V)
  model = StandIn(logits_BLV, time_conditioning=True)
  for seed in range(3):
    model.calls.clear()
    out = sums(
      objectives.make_diffusion(t, V, FOURFOLD)(model, {}, batch, jax.random.key(seed), False)
    )
    (draw,) = diffusion_draws(model, batch, logits_BLV, "count", "loglinear", 1.0)
    check(out, {"loss_sum": draw, "weight": 13.0, "bytes": 10.0})


def test_diffusion_evaluation_averages_its_draws_with_times():
  """Evaluation uses times even under the count estimator, `eval_t_samples` draws of them."""
  t = task_config(schedule="loglinear", estimator="count", eval_t_samples=3)
  batch = packed_batch(5)
  logits_BLV = logits(42, B, L, V)
  model = StandIn(logits_BLV, time_conditioning=True)
  out = sums(objectives.make_diffusion(t, V, FOURFOLD)(model, {}, batch, RNG, True))
  draws = diffusion_draws(model, batch, logits_BLV, "time", "loglinear", 1.0)
  assert len(draws) == 3 and len(set(draws)) == 3
  want = {"loss_sum": np.mean(draws), "loss_draws": draws, "weight": 13.0, "bytes": 10.0}
  check(out, want)


def test_an_untimed_denoiser_is_not_given_the_time():
  t = task_config()
  model = StandIn(logits(43, B, L, V), time_conditioning=False)
  objectives.make_diffusion(t, V, FOURFOLD)(model, {}, packed_batch(), RNG, False)
  ((_, _, kwargs),) = model.calls
  assert kwargs["time_B"] is None
