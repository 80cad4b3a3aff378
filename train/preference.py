"""Preference-optimization losses on sequence log-probabilities, per chosen/rejected pair.

A pair is a prompt x with a chosen answer y_c and a rejected one y_r. `sequence_logps`
gives each answer's summed log-probability pi = log pi_theta(y | x) and its token count n;
a frozen reference model gives ref = log pi_ref(y | x). With

    h = (pi_c - ref_c) - (pi_r - ref_r)       (sequence sums, as in the DPO and IPO papers)

the losses are (beta is each paper's own coefficient):

    dpo    -log sigmoid(beta h)                                   Rafailov et al. 2023
    cdpo   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                                       conservative DPO, Mitchell 2023 (TRL's label_smoothing)
    ipo    (h - 1 / (2 beta))^2                                   Azar et al. 2023
    orpo   -pi_c / n_c - beta log sigmoid(log odds(c) - log odds(r))  Hong et al. 2024
    simpo  -log sigmoid(beta (pi_c / n_c - pi_r / n_r) - gamma)   Meng et al. 2024

orpo and simpo are reference-free (`REFERENCE_FREE`): they read the per-token mean log-prob
pi / n and ignore ref. Everything is per pair (`_B`); `preference_metrics` turns a batch into
sums weighted by the real-pair mask, so batches and devices add up and the step divides by
`weight` (the number of pairs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOSSES = ("dpo", "cdpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")

# The closest to 0 a per-token mean log-prob m is taken to be in ORPO's log odds: for
# |m| below float32's epsilon, exp(m) rounds to 1 and log(1 - exp(m)) to -inf. A mean of 0
# is also what a padding row (no tokens, pi = 0) gives.
MAX_MEAN_LOGP = -float(jnp.finfo(jnp.float32).eps)


def sequence_logps(
  logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(logps_B, counts_B): each row's sum of log softmax(logits)[target] over the masked
  positions, in float32 whatever the logits' dtype, and the number of masked positions.
  logits[:, i] predicts targets[:, i] (already shifted)."""
  logp_BLV = jax.nn.log_softmax(jnp.asarray(logits_BLV, jnp.float32), axis=-1)
  logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  mask_BL = jnp.asarray(mask_BL, jnp.float32)
  return jnp.sum(jnp.where(mask_BL > 0, logp_BL, 0.0), axis=-1), jnp.sum(mask_BL, axis=-1)


def dpo_loss(h_B: jax.Array, beta: float) -> jax.Array:
  """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta h), the Bradley-Terry NLL of the
  implicit rewards beta (pi - ref)."""
  return -jax.nn.log_sigmoid(beta * h_B)


def cdpo_loss(h_B: jax.Array, beta: float, label_smoothing: float) -> jax.Array:
  """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's sigmoid
  loss with label_smoothing): DPO's cross-entropy against a label flipped with probability
  eps, which bounds the optimal margin instead of pushing it to infinity."""
  eps = label_smoothing
  return -(1.0 - eps) * jax.nn.log_sigmoid(beta * h_B) - eps * jax.nn.log_sigmoid(-beta * h_B)


def ipo_loss(h_B: jax.Array, beta: float) -> jax.Array:
  """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2, a squared regression of the
  log-ratio margin onto 1/(2 beta), so the margin cannot grow without bound. h is made of
  sequence sums as in the paper; TRL's `ipo` length-normalises them (mean log-probs)
  instead, which changes the scale of a good beta."""
  return jnp.square(h_B - 1.0 / (2.0 * beta))


def log_odds(mean_logp_B: jax.Array) -> jax.Array:
  """ORPO's log odds(y) = log(p / (1 - p)) with p = exp(m), m the per-token mean log-prob:
  m - log(1 - exp(m)), with log(1 - exp(m)) as log(-expm1(m)) near 0 and log1p(-exp(m))
  below -ln 2 (Maechler 2012), and m clamped to `MAX_MEAN_LOGP` so it stays finite."""
  m_B = jnp.minimum(mean_logp_B, MAX_MEAN_LOGP)
  log1mexp_B = jnp.where(m_B > -math.log(2.0), jnp.log(-jnp.expm1(m_B)), jnp.log1p(-jnp.exp(m_B)))
  return m_B - log1mexp_B


def orpo_loss(chosen_mean_B: jax.Array, rejected_mean_B: jax.Array, beta: float) -> jax.Array:
  """ORPO (Hong et al. 2024, eq. 6-7): the chosen answer's NLL per token plus beta (the
  paper's lambda) times -log sigmoid of the log odds ratio of chosen over rejected.
  Reference-free: SFT and preference in one loss."""
  ratio_B = log_odds(chosen_mean_B) - log_odds(rejected_mean_B)
  return -chosen_mean_B - beta * jax.nn.log_sigmoid(ratio_B)


def simpo_loss(
  chosen_mean_B: jax.Array, rejected_mean_B: jax.Array, beta: float, gamma: float
) -> jax.Array:
  """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta (m_c - m_r) - gamma), the reward
  being beta times the per-token mean log-prob (no reference) and gamma a target margin."""
  return -jax.nn.log_sigmoid(beta * (chosen_mean_B - rejected_mean_B) - gamma)


def preference_loss(
  kind: str,
  *,
  chosen_logps_B: jax.Array,
  rejected_logps_B: jax.Array,
  chosen_counts_B: jax.Array,
  rejected_counts_B: jax.Array,
  ref_chosen_logps_B: jax.Array | None,
  ref_rejected_logps_B: jax.Array | None,
  beta: float,
  label_smoothing: float = 0.0,
  simpo_gamma: float = 0.5,
) -> dict[str, jax.Array]:
  """The `kind` loss of each pair (`LOSSES`) and the rewards it implies: `loss_B`,
  `chosen_rewards_B`, `rejected_rewards_B`, all float32.

  Rewards are beta (pi - ref) for dpo/cdpo/ipo and beta pi / n for orpo/simpo (as TRL logs
  them). A row with no tokens (count 0, a padding row) gets a finite loss, which the
  weighted sums of `preference_metrics` then leave out.
  """
  if kind not in LOSSES:
    raise ValueError(f"unknown preference loss {kind!r}; expected one of {LOSSES}")
  pi_c, pi_r = jnp.asarray(chosen_logps_B, jnp.float32), jnp.asarray(rejected_logps_B, jnp.float32)
  if kind in REFERENCE_FREE:
    mean_c = pi_c / jnp.maximum(jnp.asarray(chosen_counts_B, jnp.float32), 1.0)
    mean_r = pi_r / jnp.maximum(jnp.asarray(rejected_counts_B, jnp.float32), 1.0)
    if kind == "orpo":
      loss_B = orpo_loss(mean_c, mean_r, beta)
    else:
      loss_B = simpo_loss(mean_c, mean_r, beta, simpo_gamma)
    return {
      "loss_B": loss_B,
      "chosen_rewards_B": beta * mean_c,
      "rejected_rewards_B": beta * mean_r,
    }

  if ref_chosen_logps_B is None or ref_rejected_logps_B is None:
    raise ValueError(f"the {kind} loss needs the reference model's log-probs")
  chosen_ratio_B = pi_c - jnp.asarray(ref_chosen_logps_B, jnp.float32)
  rejected_ratio_B = pi_r - jnp.asarray(ref_rejected_logps_B, jnp.float32)
  h_B = chosen_ratio_B - rejected_ratio_B
  if kind == "dpo":
    loss_B = dpo_loss(h_B, beta)
  elif kind == "cdpo":
    loss_B = cdpo_loss(h_B, beta, label_smoothing)
  else:
    loss_B = ipo_loss(h_B, beta)
  return {
    "loss_B": loss_B,
    "chosen_rewards_B": beta * chosen_ratio_B,
    "rejected_rewards_B": beta * rejected_ratio_B,
  }


def preference_metrics(
  out: dict[str, jax.Array],
  chosen_logps_B: jax.Array,
  rejected_logps_B: jax.Array,
  weight_B: jax.Array,
) -> dict[str, jax.Array]:
  """Sums over the real pairs (`weight_B` 1, padding 0) of a `preference_loss` output, under
  the names preference trainers log (less the `train/` or `eval/` prefix): the step and
  evaluation divide each by `weight`, the number of pairs. `rewards/accuracy` counts
  chosen reward > rejected reward (strictly: a tie is not a win); `logps/*` sum the
  sequence log-probs. A padding row counts as 0 whatever its values, inf and nan included.
  """
  weight_B = jnp.asarray(weight_B, jnp.float32)
  real_B = weight_B > 0

  def total(x_B):
    return jnp.sum(jnp.where(real_B, weight_B * jnp.asarray(x_B, jnp.float32), 0.0))

  chosen_B, rejected_B = out["chosen_rewards_B"], out["rejected_rewards_B"]
  return {
    "loss_sum": total(out["loss_B"]),
    "weight": jnp.sum(weight_B),
    "rewards/chosen": total(chosen_B),
    "rewards/rejected": total(rejected_B),
    "rewards/margin": total(chosen_B - rejected_B),
    "rewards/accuracy": total((chosen_B > rejected_B).astype(jnp.float32)),
    "logps/chosen": total(chosen_logps_B),
    "logps/rejected": total(rejected_logps_B),
  }
