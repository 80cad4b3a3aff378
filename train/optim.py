"""AdamW with warmup and decay, gradient clipping; all from `config.train`."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then decay to `min_learning_rate`."""
  warmup = optax.linear_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
  decay_steps = max(t.steps - t.warmup_steps, 1)
  if t.schedule == "cosine":
    alpha = t.min_learning_rate / t.learning_rate if t.learning_rate else 0.0
    decay = optax.cosine_decay_schedule(t.learning_rate, decay_steps, alpha=alpha)
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


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  adamw = optax.adamw(
    learning_rate_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask
  )
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw
