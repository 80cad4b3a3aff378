"""AdamW with warmup and decay, gradient clipping; all from `config.train`."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant", "two_stage")


def cooldown_step(t: ml_collections.ConfigDict) -> int:
  """two_stage: the first step of stage 2."""
  return max(int(round(t.steps * t.cooldown_start)), t.warmup_steps)


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then decay to `min_learning_rate`.

  two_stage (BitNet b1.58 2B4T's shape): stage 1 follows the cosine decay of a one-stage
  run until `cooldown_start` of the steps; then the rate drops at once to
  `cooldown_learning_rate` and decays by cosine to `min_learning_rate` at the end.
  """
  warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
  decay_steps = max(t.steps - t.warmup_steps, 1)
  if t.schedule == "cosine":
    alpha = t.min_learning_rate / t.learning_rate if t.learning_rate else 0.0
    decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=alpha)
  elif t.schedule == "two_stage":
    split = cooldown_step(t)
    stage2 = optax.cosine_decay_schedule(
      t.cooldown_learning_rate,
      max(t.steps - split, 1),
      alpha=t.min_learning_rate / t.cooldown_learning_rate if t.cooldown_learning_rate else 0.0,
    )
    alpha = t.min_learning_rate / t.learning_rate if t.learning_rate else 0.0
    stage1 = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=alpha)
    return optax.join_schedules([warmup, stage1, stage2], [t.warmup_steps, split])
  elif t.schedule == "linear":
    decay = optax.linear_schedule(t.learning_rate, t.min_learning_rate, decay_steps)
  else:
    decay = optax.constant_schedule(t.learning_rate)
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


DECAYED = ("kernel", "embedding", "pos_embedding")


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings), not on biases or norm scales.

  Decided by name, not ndim: scanned layers stack norm scales into matrices.
  """

  def is_decayed(path, _):
    names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
    return any(n in DECAYED for n in names)

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def weight_decay_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """`weight_decay`, constant; two_stage: a cosine from `weight_decay` at step 0 over all the
  steps, cut at the split, then 0 in stage 2 (BitNet b1.58 2B4T)."""
  if t.schedule != "two_stage":
    return optax.constant_schedule(t.weight_decay)
  split = cooldown_step(t)
  stage1 = optax.cosine_decay_schedule(t.weight_decay, max(t.steps, 1))
  return optax.join_schedules([stage1, optax.constant_schedule(0.0)], [split])


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  if t.schedule == "two_stage":  # weight decay on a schedule: a hyperparameter in the state
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=learning_rate_schedule(t),
      b1=t.b1,
      b2=t.b2,
      weight_decay=weight_decay_schedule(t),
      mask=decay_mask,
    )
  else:
    adamw = optax.adamw(
      learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask
    )
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw
