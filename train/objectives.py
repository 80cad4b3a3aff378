"""Losses per family and task, returned as sums so batches and devices add up.

An objective maps `(model, params, batch, rng, deterministic)` to a dict of
sums: `loss_sum` (nats), `weight` (targets counted) and task metrics. The
step divides; evaluation divides over the whole split.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from train.data.tokenizers import NUM_SPECIAL

Objective = Callable[..., dict[str, jax.Array]]


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BLV, axis=-1) - target_logit


def causal_lm(
  model: nn.Module, params, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
) -> dict[str, jax.Array]:
  """Next-token prediction inside each packed document.

  Position i predicts token i+1 when both belong to the same (non-padding)
  segment, so no target crosses a document boundary.
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
  logits_BLV = logits_BLV[:, :-1]
  nll_BL = token_nll(logits_BLV, targets_BL)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(nll_BL * weights_BL),
    "weight": jnp.sum(weights_BL),
    "correct": jnp.sum(correct_BL * weights_BL),
    "bytes": jnp.sum(weights_BL * (targets_BL >= NUM_SPECIAL)),
  }
