"""AdamW with warmup and decay, gradient clipping; all from `config.train`."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from modeling.moe import BIAS

FIXED = (BIAS,)  # leaves the optimizer never sees: MoE's balancing bias, moved by the step

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
    return skip_fixed(optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw))
  return skip_fixed(adamw)


def _has_fixed(tree) -> bool:
  return isinstance(tree, Mapping) and any(k in FIXED or _has_fixed(v) for k, v in tree.items())


def _without_fixed(tree):
  if not _has_fixed(tree):
    return tree
  return {k: _without_fixed(v) for k, v in tree.items() if k not in FIXED}


def _with_fixed(updates, like):
  """`updates` with zeros at the FIXED leaves of `like`."""
  if not _has_fixed(like):
    return updates
  return {
    k: jnp.zeros_like(v) if k in FIXED else _with_fixed(updates[k], v) for k, v in like.items()
  }


def skip_fixed(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """tx over the params without the FIXED leaves: no optimizer state for them, a zero update.
  A tree without such leaves gets tx's own state and updates, unchanged."""

  def init(params):
    return tx.init(_without_fixed(params))

  def update(grads, state, params=None):
    params = None if params is None else _without_fixed(params)
    updates, state = tx.update(_without_fixed(grads), state, params)
    return _with_fixed(updates, grads), state

  return optax.GradientTransformation(init, update)
