"""Losses per family and task, returned as sums so batches and devices add up.

Each task's objective comes from a factory `make_<name>(task config, vocab size, special
ids)` (the table in train/families.py names it; the special ids are the tokenizer's
`Specials`). An objective maps `(model, params, batch, rng,
deterministic)` to a dict of sums: `loss_sum` (nats), `weight` (targets counted) and task
metrics. The step divides; evaluation divides over the whole split.

The pretraining objectives also take `on_scored`: distillation (train/distill.py) passes it
to learn, after each model call, which of the model's output positions the objective scores
(`weights_BL` over them) and how it reads the logits there (`view`, e.g. diffusion's SUBS).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.stats

from modeling import diffusion, lora
from modeling.vocab import FOURFOLD, MASK_ID, Specials
from train import preference

Objective = Callable[..., dict[str, jax.Array]]


def accuracy_name(sum_key: str) -> str:
  """`correct` -> `accuracy`, `mlm_correct` -> `mlm_accuracy`: counts of correct targets."""
  return sum_key.replace("correct", "accuracy")


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BLV, axis=-1) - target_logit


def token_sums(
  logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, correct: str = "correct"
) -> dict[str, jax.Array]:
  """The weighted sums of a token-prediction loss: nats, targets, and correct argmaxes
  (under the name `correct`)."""
  nll_BL = token_nll(logits_BLV, targets_BL)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(nll_BL * weights_BL),
    "weight": jnp.sum(weights_BL),
    correct: jnp.sum(correct_BL * weights_BL),
  }


def causal_lm(
  model: nn.Module,
  params,
  batch: dict[str, jax.Array],
  rng: jax.Array,
  deterministic: bool,
  specials: Specials = FOURFOLD,
  masked: bool = False,
  on_scored: Callable | None = None,
) -> dict[str, jax.Array]:
  """Next-token prediction inside each packed document.

  Position i predicts token i+1 when both belong to the same (non-padding)
  segment, so no target crosses a document boundary. `bytes` counts the targets that are
  text (not special ids), for bits per byte. `masked` (SFT): only targets inside the batch's
  `loss_mask` count.
  """
  tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
  logits_BLV, _ = model.apply(
    {"params": params},
    tokens_BL,
    batch["positions"],
    seg_BL,
    deterministic=deterministic,
    rngs={"dropout": rng},
  )
  targets_BL = tokens_BL[:, 1:]
  weights_BL = ((seg_BL[:, 1:] == seg_BL[:, :-1]) & (seg_BL[:, 1:] > 0)).astype(jnp.float32)
  if masked:
    weights_BL = weights_BL * batch["loss_mask"][:, 1:]
  if on_scored is not None:  # the last position predicts nothing
    on_scored(jnp.pad(weights_BL, ((0, 0), (0, 1))))
  return {
    **token_sums(logits_BLV[:, :-1], targets_BL, weights_BL),
    "bytes": jnp.sum(weights_BL * ~specials.is_special(targets_BL)),
  }


def make_causal_lm(
  task: ml_collections.ConfigDict, vocab_size: int, specials: Specials
) -> Objective:
  """The decoder's pretraining objective: `causal_lm`, which reads no option."""
  return functools.partial(causal_lm, specials=specials)


def make_sft(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Supervised fine-tuning of a decoder: next-token prediction counted only where the target
  is in the batch's `loss_mask` (each assistant turn's content and end token,
  train/data/chat.py), so loss and accuracy are over response tokens alone."""

  return functools.partial(causal_lm, specials=specials, masked=True)


SIDES = ("chosen", "rejected")


def pair_logps(model, params, batch, rng, deterministic) -> tuple[jax.Array, ...]:
  """(chosen log-prob sums, rejected sums, chosen answer tokens, rejected answer tokens) of
  each pair's answers, both sides of every pair in one forward pass."""
  tokens_NL = jnp.concatenate([batch[f"{s}_tokens"] for s in SIDES])
  seg_NL = jnp.concatenate([batch[f"{s}_segment_ids"] for s in SIDES])
  mask_NL = jnp.concatenate([batch[f"{s}_mask"] for s in SIDES])
  pos_NL = jnp.broadcast_to(jnp.arange(tokens_NL.shape[1], dtype=jnp.int32), tokens_NL.shape)
  logits_NLV, _ = model.apply(
    {"params": params},
    tokens_NL,
    pos_NL,
    seg_NL,
    deterministic=deterministic,
    rngs={"dropout": rng},
  )
  logps_N, counts_N = preference.sequence_logps(
    logits_NLV[:, :-1], tokens_NL[:, 1:], mask_NL[:, 1:] * (seg_NL[:, 1:] > 0)
  )
  b = tokens_NL.shape[0] // 2
  return logps_N[:b], logps_N[b:], counts_N[:b], counts_N[b:]


REFERENCES = ("frozen", "adapter_base", "precomputed")


def make_dpo(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Preference optimization (`task.loss`, train/preference.py) of the answers' log-probs
  against a reference's: `task.reference` = frozen (the initial weights, passed in as
  `reference`), adapter_base (these params without their LoRA adapters: no second model),
  or precomputed (the batch's `ref_logps`, computed once before training). ORPO and SimPO
  need no reference. Sums are per pair; `weight` counts pairs."""
  kind, source = task.loss, task.reference

  def reference_logps(model, params, batch, reference):
    if kind in preference.REFERENCE_FREE:
      return None, None
    if source == "precomputed":
      return batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    ref = lora.split(params)[1] if source == "adapter_base" else reference
    ref = jax.tree.map(jax.lax.stop_gradient, ref)
    c, r, _, _ = pair_logps(model, ref, batch, jax.random.PRNGKey(0), True)
    return c, r

  def dpo(model, params, batch, rng, deterministic, reference=None):
    c, r, nc, nr = pair_logps(model, params, batch, rng, deterministic)
    ref_c, ref_r = reference_logps(model, params, batch, reference)
    out = preference.preference_loss(
      kind,
      chosen_logps_B=c,
      rejected_logps_B=r,
      chosen_counts_B=nc,
      rejected_counts_B=nr,
      ref_chosen_logps_B=ref_c,
      ref_rejected_logps_B=ref_r,
      beta=task.beta,
      label_smoothing=task.label_smoothing,
      simpo_gamma=task.simpo_gamma,
    )
    return preference.preference_metrics(out, c, r, batch["weight"])

  return dpo


def summarize_dpo(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """The loss and the reward / log-prob means per pair, under the names other tools log
  (`eval/rewards/margin`, ...)."""
  del rows, config, byte_level
  weight = max(float(sums["weight"]), 1.0)
  out = {"eval/loss": float(sums["loss_sum"]) / weight}
  out.update({f"eval/{k}": float(v) / weight for k, v in sums.items() if "/" in k})
  return out


def shift_right(targets_BL: jax.Array, positions_BL: jax.Array, start: int) -> jax.Array:
  """The decoder's input: each target's predecessor in its packed example, `start` (the
  tokenizer's decoder start: fourfold's BOS, T5's pad) first."""
  previous_BL = jnp.pad(targets_BL, ((0, 0), (1, 0)))[:, :-1]
  return jnp.where(positions_BL == 0, start, previous_BL)


def make_seq2seq(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Encoder-decoder teacher forcing (span corruption and seq2seq alike): cross-entropy of
  every target token given the source and the targets before it."""
  start = specials.require("decoder_start", "an encoder-decoder's decoder input")

  def seq2seq(model, params, batch, rng, deterministic, on_scored=None):
    targets_BL, seg_BL = batch["targets"], batch["targets_segment_ids"]
    logits_BLV, _ = model.apply(
      {"params": params},
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      deterministic=deterministic,
      rngs={"dropout": rng},
      targets_in_BL=shift_right(targets_BL, batch["targets_positions"], start),
      targets_positions_BL=batch["targets_positions"],
      targets_segment_ids_BL=seg_BL,
    )
    if on_scored is not None:
      on_scored((seg_BL > 0).astype(jnp.float32))
    return token_sums(logits_BLV, targets_BL, (seg_BL > 0).astype(jnp.float32))

  return seq2seq


def mask_tokens(
  rng: jax.Array,
  tokens_BL: jax.Array,
  seg_BL: jax.Array,
  vocab_size: int,
  mask_prob: float,
  mask_token_prob: float,
  random_token_prob: float,
  specials: Specials = FOURFOLD,
) -> tuple[jax.Array, jax.Array]:
  """BERT's corruption: (inputs, selected). Each ordinary token (not special, not padding)
  is selected with `mask_prob`; a selected token becomes the tokenizer's [MASK] with
  `mask_token_prob`, a uniformly random ordinary token of the tokenizer's `vocab_size`
  with `random_token_prob`, else stays."""
  mask_id = specials.require("mask", "masked language modeling")
  r_select, r_kind, r_token = jax.random.split(rng, 3)
  eligible_BL = (seg_BL > 0) & ~specials.is_special(tokens_BL)
  selected_BL = eligible_BL & (jax.random.uniform(r_select, tokens_BL.shape) < mask_prob)
  u_BL = jax.random.uniform(r_kind, tokens_BL.shape)
  first, count = specials.first_ordinary(), specials.num_ordinary(vocab_size)
  # the n-th ordinary id, n uniform in [0, count) (drawn as first + n)
  n_BL = jax.random.randint(r_token, tokens_BL.shape, first, first + count, tokens_BL.dtype)
  random_BL = specials.nth_ordinary(n_BL - first)
  inputs_BL = jnp.where(selected_BL & (u_BL < mask_token_prob), mask_id, tokens_BL)
  to_random_BL = (
    selected_BL & (u_BL >= mask_token_prob) & (u_BL < mask_token_prob + random_token_prob)
  )
  inputs_BL = jnp.where(to_random_BL, random_BL, inputs_BL)
  return inputs_BL, selected_BL


def make_mlm(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Masked language modeling with the tokenizer's [MASK]; masks come from the step's rng, so
  every epoch is masked afresh and a resumed run draws the same masks."""
  t = task
  specials.require("mask", "masked language modeling")

  def mlm(model, params, batch, rng, deterministic, on_scored=None):
    mask_rng, dropout_rng = jax.random.split(rng)
    tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
    inputs_BL, selected_BL = mask_tokens(
      mask_rng,
      tokens_BL,
      seg_BL,
      vocab_size,
      t.mask_prob,
      t.mask_token_prob,
      t.random_token_prob,
      specials,
    )
    logits_BLV, _ = model.apply(
      {"params": params},
      inputs_BL,
      batch["positions"],
      seg_BL,
      deterministic=deterministic,
      rngs={"dropout": dropout_rng},
    )
    if on_scored is not None:
      on_scored(selected_BL.astype(jnp.float32))
    return token_sums(logits_BLV, tokens_BL, selected_BL.astype(jnp.float32), "mlm_correct")

  return mlm


def _apply_labeled(model, params, batch, rng, deterministic) -> jax.Array:
  out, _ = model.apply(
    {"params": params},
    batch["tokens"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=deterministic,
    token_types_BL=batch["token_types"],
    rngs={"dropout": rng},
  )
  return out


def make_classify(
  task: ml_collections.ConfigDict, vocab_size: int, specials: Specials
) -> Objective:
  """Sequence classification: cross-entropy on the pooled output; per-class counts for F1."""

  def classify(model, params, batch, rng, deterministic):
    logits_BC = _apply_labeled(model, params, batch, rng, deterministic)
    label_B, w_B = batch["label"], batch["weight"]
    nll_B = token_nll(logits_BC, label_B)
    num_classes = logits_BC.shape[-1]
    pred_BC = jax.nn.one_hot(jnp.argmax(logits_BC, -1), num_classes) * w_B[:, None]
    true_BC = jax.nn.one_hot(label_B, num_classes) * w_B[:, None]
    tp_C = jnp.sum(pred_BC * true_BC, axis=0)
    return {
      "loss_sum": jnp.sum(nll_B * w_B),
      "weight": jnp.sum(w_B),
      "correct": jnp.sum(tp_C),
      "tp": tp_C,
      "fp": jnp.sum(pred_BC, axis=0) - tp_C,
      "fn": jnp.sum(true_BC, axis=0) - tp_C,
    }

  return classify


def make_regress(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Regression on the pooled output (one unit): squared error; predictions kept per row."""

  def regress(model, params, batch, rng, deterministic):
    pred_B = _apply_labeled(model, params, batch, rng, deterministic)[:, 0]
    target_B, w_B = batch["label"], batch["weight"]
    return {
      "loss_sum": jnp.sum(jnp.square(pred_B - target_B) * w_B),
      "weight": jnp.sum(w_B),
      "rows/prediction": pred_B,
      "rows/target": target_B,
      "rows/weight": w_B,
    }

  return regress


def make_diffusion(
  task: ml_collections.ConfigDict, vocab_size: int, specials: Specials
) -> Objective:
  """Masked diffusion's continuous-time NELBO (modeling/diffusion.py), in nats, summed.

  Training: one time t per row, antithetic across the batch, and masks, both drawn from
  the step's rng (`task.estimator='count'`: a masked count per row instead, the time
  integrated out; same expectation, lower variance). Evaluation (`deterministic`): `task.eval_t_samples` draws per batch,
  averaged, from an rng keyed on the batch's content, so every batch gets its own times;
  each draw's sum is kept (`loss_draws`) to report the estimate's spread. `weight`
  counts every real token (all are modeled), so loss_sum / weight is the bound per token.
  """
  t_cfg = task
  schedule = diffusion.make_schedule(t_cfg.schedule, t_cfg.schedule_exponent)

  def one_draw(model, params, batch, rng, deterministic, on_scored=None):
    r_drop, rng = jax.random.split(rng)

    def logits_fn(z_BL, t_B):
      pos_BL, seg_BL = batch["positions"], batch["segment_ids"]
      logits_BLV = diffusion.denoise(
        model, params, z_BL, pos_BL, seg_BL, t_B, deterministic, {"dropout": r_drop}
      )
      if on_scored is not None:  # the masked positions, read through SUBS
        on_scored(((z_BL == MASK_ID) & (seg_BL > 0)).astype(jnp.float32), diffusion.subs_logits)
      return logits_BLV

    tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
    if t_cfg.estimator == "count" and not deterministic:
      return diffusion.nelbo_sum_count(logits_fn, rng, tokens_BL, seg_BL)
    return diffusion.nelbo_sum(logits_fn, rng, tokens_BL, seg_BL, schedule)

  def objective(model, params, batch, rng, deterministic, on_scored=None):
    tokens_BL, seg_BL = batch["tokens"], batch["segment_ids"]
    real_BL = (seg_BL > 0).astype(jnp.float32)
    text_BL = real_BL * ~specials.is_special(tokens_BL)
    out = {"weight": jnp.sum(real_BL), "bytes": jnp.sum(text_BL)}
    if not deterministic:
      return {"loss_sum": one_draw(model, params, batch, rng, False, on_scored), **out}
    key = jnp.sum(tokens_BL * (batch["positions"] + 1) * (seg_BL > 0))
    rng = jax.random.fold_in(rng, key)
    draws_K = jnp.stack(
      [
        one_draw(model, params, batch, jax.random.fold_in(rng, k), True, on_scored)
        for k in range(t_cfg.eval_t_samples)
      ]
    )
    return {"loss_sum": jnp.mean(draws_K), "loss_draws": draws_K, **out}

  return objective


# ---- evaluation summaries: (summed values, per-row values, config, byte-level) -> metrics


def summarize_lm(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """Loss per target (nats), perplexity, accuracies, and bits per byte for byte tokenizers."""
  del rows, config
  weight = max(float(sums["weight"]), 1.0)
  loss = float(sums["loss_sum"]) / weight
  out = {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 80.0)),
    **{
      f"eval/{accuracy_name(k)}": float(v) / weight
      for k, v in sums.items()
      if k.endswith("correct")
    },
  }
  if byte_level and float(sums.get("bytes", 0)) > 0:
    out["eval/bits_per_byte"] = float(sums["loss_sum"]) / math.log(2) / float(sums["bytes"])
  return out


def summarize_diffusion(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """summarize_lm of the NELBO (eval/loss is the bound in nats per token, eval/perplexity its
  exponential: an upper bound on the model's perplexity), plus the spread of the estimate:
  eval/loss_draw_std is the standard deviation over the `task.eval_t_samples` draws of
  one-draw estimates of eval/loss, each over the whole evaluated split."""
  out = summarize_lm({k: v for k, v in sums.items() if k != "loss_draws"}, rows, config, byte_level)
  per_draw = np.asarray(sums["loss_draws"], np.float64) / max(float(sums["weight"]), 1.0)
  out["eval/loss_draw_std"] = float(np.std(per_draw, ddof=1)) if per_draw.size > 1 else 0.0
  return out


def summarize_classify(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """Loss, accuracy and macro F1 over the classes that occur (as labels or predictions)."""
  del rows, config, byte_level
  weight = max(float(sums["weight"]), 1.0)
  tp, fp, fn = (np.asarray(sums[k], np.float64) for k in ("tp", "fp", "fn"))
  seen = (tp + fp + fn) > 0
  f1 = 2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])
  return {
    "eval/loss": float(sums["loss_sum"]) / weight,
    "eval/accuracy": float(sums["correct"]) / weight,
    "eval/f1": float(np.mean(f1)) if f1.size else 0.0,
  }


def summarize_regress(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """Mean squared error, Pearson and Spearman correlations (scipy) over the real rows."""
  del config, byte_level
  keep = np.asarray(rows["rows/weight"]) > 0
  pred, target = np.asarray(rows["rows/prediction"])[keep], np.asarray(rows["rows/target"])[keep]
  return {
    "eval/loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0),
    "eval/pearson": float(scipy.stats.pearsonr(pred, target)[0]),
    "eval/spearman": float(scipy.stats.spearmanr(pred, target)[0]),
  }


def make_ner(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Token classification: cross-entropy on each word's first piece; predictions kept
  per row for the entity-level F1."""

  def ner(model, params, batch, rng, deterministic):
    logits_BLC = _apply_labeled(model, params, batch, rng, deterministic)
    labels_BL = batch["labels"]
    w_BL = (labels_BL >= 0).astype(jnp.float32) * batch["weight"][:, None]
    nll_BL = token_nll(logits_BLC, jnp.maximum(labels_BL, 0))
    pred_BL = jnp.argmax(logits_BLC, axis=-1)
    return {
      "loss_sum": jnp.sum(nll_BL * w_BL),
      "weight": jnp.sum(w_BL),
      "correct": jnp.sum((pred_BL == labels_BL) * w_BL),
      "rows/prediction": pred_BL,
      "rows/labels": labels_BL,
      "rows/dropped": batch["dropped"],
      "rows/weight": batch["weight"],
    }

  return ner


def tag_sequences(rows: dict, names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
  """(true, predicted) tag names per sentence: kept words, then the words truncation
  dropped (predicted as O, so their entities count as missed)."""
  true, pred = [], []
  for labels, predicted, dropped, weight in zip(
    rows["rows/labels"],
    rows["rows/prediction"],
    rows["rows/dropped"],
    rows["rows/weight"],
    strict=True,
  ):
    if weight <= 0:
      continue
    words = labels >= 0
    lost = [names[i] for i in dropped if i >= 0]
    true.append([names[i] for i in labels[words]] + lost)
    pred.append([names[i] for i in predicted[words]] + ["O"] * len(lost))
  return true, pred


def summarize_ner(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """Entity-level precision, recall and F1 (seqeval, CoNLL semantics) and word accuracy."""
  del byte_level
  from seqeval.metrics import f1_score, precision_score, recall_score

  from train.data.labeled import tag_names

  true, pred = tag_sequences(rows, tag_names(config))
  weight = max(float(sums["weight"]), 1.0)
  return {
    "eval/loss": float(sums["loss_sum"]) / weight,
    "eval/accuracy": float(sums["correct"]) / weight,
    "eval/precision": float(precision_score(true, pred, zero_division=0)),
    "eval/recall": float(recall_score(true, pred, zero_division=0)),
    "eval/f1": float(f1_score(true, pred, zero_division=0)),
  }


def make_embed(task: ml_collections.ConfigDict, vocab_size: int, specials: Specials) -> Objective:
  """Contrastive sentence embeddings (mean-pooled, unit length) with in-batch negatives:
  each first text of a positive pair must pick its own second text among the batch's, and
  vice versa."""
  temperature = task.temperature

  def embed(model, params, batch, rng, deterministic):
    rng_a, rng_b = jax.random.split(rng)
    second = {k[: -len("_b")]: v for k, v in batch.items() if k.endswith("_b")}
    a_BD = _apply_labeled(model, params, batch, rng_a, deterministic)
    b_BD = _apply_labeled(model, params, second, rng_b, deterministic)
    a_BD = a_BD / jnp.linalg.norm(a_BD, axis=-1, keepdims=True).clip(1e-6)
    b_BD = b_BD / jnp.linalg.norm(b_BD, axis=-1, keepdims=True).clip(1e-6)
    w_B = batch["weight"]
    # Positives: pairs scored >= min_score (unscored pairs all are); every real row is a
    # negative for the others, padding rows for nobody.
    score_B = batch["label"]
    positive_B = w_B * jnp.where(jnp.isnan(score_B), 1.0, score_B >= task.min_score)
    sim_BB = a_BD @ b_BD.T / temperature
    pad_BB = (1.0 - w_B)[None, :] * 1e9
    diag_B = jnp.diagonal(sim_BB)
    row_B = jax.nn.logsumexp(sim_BB - pad_BB, axis=1) - diag_B
    col_B = jax.nn.logsumexp(sim_BB - pad_BB.T, axis=0) - diag_B
    picked_B = jnp.argmax(sim_BB - pad_BB, axis=1) == jnp.arange(len(w_B))
    return {
      "loss_sum": jnp.sum(0.5 * (row_B + col_B) * positive_B),
      "weight": jnp.sum(positive_B),
      "correct": jnp.sum(picked_B * positive_B),
      "rows/prediction": jnp.sum(a_BD * b_BD, axis=-1),  # cosine similarity
      "rows/target": batch["label"],
      "rows/weight": w_B,
    }

  return embed


def summarize_embed(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
  """Contrastive loss, in-batch retrieval accuracy, and the Pearson / Spearman correlation
  of the pairs' cosine similarity with their scores."""
  out = summarize_regress(sums, rows, config, byte_level)
  out["eval/accuracy"] = float(sums["correct"]) / max(float(sums["weight"]), 1.0)
  return out
