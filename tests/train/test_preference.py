"""train/preference.py against float64 NumPy references written from the papers' formulas.

Each loss on random pairs; the identities a loss must satisfy (DPO at the reference is
ln 2, doubling beta is doubling the margin, cDPO at eps = 0 is DPO, IPO's minimum sits at
h = 1/(2 beta)); ORPO's log odds near p = 1; padding rows that change no sum and get no
gradient; the metric sums; and sequence log-probs against a plain log-softmax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import preference

EPS32 = float(np.finfo(np.float32).eps)
BETAS = (0.05, 0.1, 0.5, 2.0)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def sigmoid(x):
  return np.exp(log_sigmoid(x))


def reference(kind, pairs, beta, eps, gamma):
  """(loss, chosen reward, rejected reward, tolerance) per pair in float64.

  The tolerance is the float32 rounding the implementation cannot avoid, to first order:
  forming h = (pi_c - ref_c) - (pi_r - ref_r) rounds it by up to eps32 (|c| + |r| + |h|),
  which moves the loss by |dloss/dh| times that. Everything else is held to rtol 1e-6.
  """
  p = {k: np.asarray(v, np.float64) for k, v in pairs.items() if v is not None}
  if kind in ("orpo", "simpo"):
    m_c = p["chosen_logps_B"] / p["chosen_counts_B"]
    m_r = p["rejected_logps_B"] / p["rejected_counts_B"]
    if kind == "orpo":

      def odds(m):
        return m - np.log1p(-np.exp(m))

      loss = -m_c - beta * log_sigmoid(odds(m_c) - odds(m_r))
    else:
      loss = -log_sigmoid(beta * (m_c - m_r) - gamma)
    return loss, beta * m_c, beta * m_r, np.zeros_like(loss)
  c = p["chosen_logps_B"] - p["ref_chosen_logps_B"]
  r = p["rejected_logps_B"] - p["ref_rejected_logps_B"]
  h = c - r
  if kind == "dpo":
    loss, dloss_dh = -log_sigmoid(beta * h), -beta * sigmoid(-beta * h)
  elif kind == "cdpo":
    loss = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    dloss_dh = -(1 - eps) * beta * sigmoid(-beta * h) + eps * beta * sigmoid(beta * h)
  else:
    loss, dloss_dh = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
  return loss, beta * c, beta * r, np.abs(dloss_dh) * EPS32 * (np.abs(c) + np.abs(r) + np.abs(h))


def random_pairs(seed, b=32):
  """Pairs as training sees them: 1-64 answer tokens of -0.05 to -3 nats each, the
  reference within a few nats of the policy."""
  rng = np.random.default_rng(seed)
  n_c, n_r = rng.integers(1, 65, b), rng.integers(1, 65, b)
  pi_c, pi_r = n_c * rng.uniform(-3, -0.05, b), n_r * rng.uniform(-3, -0.05, b)
  f32 = np.float32
  return {
    "chosen_logps_B": pi_c.astype(f32),
    "rejected_logps_B": pi_r.astype(f32),
    "chosen_counts_B": n_c.astype(f32),
    "rejected_counts_B": n_r.astype(f32),
    "ref_chosen_logps_B": (pi_c + rng.normal(0, 2, b)).astype(f32),
    "ref_rejected_logps_B": (pi_r + rng.normal(0, 2, b)).astype(f32),
  }


def margin_pairs(h_B, ref_c=-50.0, ref_r=-30.0):
  """Pairs whose margin h is exactly `h_B` (dyadic values, so float32 forms it exactly)."""
  h_B = np.asarray(h_B, np.float32)
  ones = np.ones_like(h_B)
  return {
    "chosen_logps_B": ref_c + h_B,
    "rejected_logps_B": ref_r * ones,
    "chosen_counts_B": 10 * ones,
    "rejected_counts_B": 10 * ones,
    "ref_chosen_logps_B": ref_c * ones,
    "ref_rejected_logps_B": ref_r * ones,
  }


@pytest.mark.parametrize("kind", preference.LOSSES)
def test_each_loss_and_its_rewards_match_the_papers_formula(kind):
  for seed, beta in enumerate(BETAS):
    eps, gamma = (0.1, 0.2, 0.3, 0.45)[seed], (0.0, 0.5, 1.0, 1.6)[seed]
    pairs = random_pairs(seed)
    out = preference.preference_loss(
      kind, **pairs, beta=beta, label_smoothing=eps, simpo_gamma=gamma
    )
    loss, chosen, rejected, tol = reference(kind, pairs, beta, eps, gamma)
    assert out["loss_B"].dtype == jnp.float32
    error_B = np.abs(np.asarray(out["loss_B"], np.float64) - loss)
    assert np.all(error_B <= 1e-6 * np.abs(loss) + tol), (beta, error_B, tol)
    np.testing.assert_allclose(out["chosen_rewards_B"], chosen, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["rejected_rewards_B"], rejected, rtol=1e-6, atol=1e-7)


def test_dpo_at_the_reference_is_ln2_with_no_reward_and_no_win():
  pairs = random_pairs(7)
  pairs["ref_chosen_logps_B"] = pairs["chosen_logps_B"]
  pairs["ref_rejected_logps_B"] = pairs["rejected_logps_B"]
  out = preference.preference_loss("dpo", **pairs, beta=0.1)
  np.testing.assert_allclose(out["loss_B"], math.log(2.0), rtol=0, atol=1e-6)
  weight_B = np.ones(32, np.float32)
  sums = preference.preference_metrics(
    out, pairs["chosen_logps_B"], pairs["rejected_logps_B"], weight_B
  )
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
    assert float(sums[key]) == 0.0, key
  np.testing.assert_allclose(sums["loss_sum"] / sums["weight"], math.log(2.0), atol=1e-6)


def test_doubling_beta_is_doubling_the_dpo_margin():
  h_B = np.array([-16.0, -2.5, -0.25, 0.0, 0.25, 2.5, 16.0])
  for beta in (0.1, 0.5):
    double = preference.preference_loss("dpo", **margin_pairs(h_B), beta=2 * beta)["loss_B"]
    np.testing.assert_allclose(double, -log_sigmoid(2 * beta * h_B), rtol=1e-6)
    # 2 beta h and beta (2h) are the same float: the loss reads beta only through beta h
    twice_h = preference.preference_loss("dpo", **margin_pairs(2 * h_B), beta=beta)["loss_B"]
    np.testing.assert_array_equal(double, twice_h)


def test_cdpo_without_smoothing_is_dpo():
  pairs = random_pairs(3)
  for beta in BETAS:
    dpo = preference.preference_loss("dpo", **pairs, beta=beta)
    cdpo = preference.preference_loss("cdpo", **pairs, beta=beta, label_smoothing=0.0)
    for key in dpo:
      np.testing.assert_array_equal(cdpo[key], dpo[key])


def test_ipo_is_smallest_at_half_inverse_beta():
  beta = 0.25  # 1/(2 beta) = 2
  h_B = np.array([1.0, 1.75, 2.0, 2.25, 3.0])
  pairs = margin_pairs(h_B)

  def total(chosen_logps_B):
    pairs_at = {**pairs, "chosen_logps_B": chosen_logps_B}
    return jnp.sum(preference.preference_loss("ipo", **pairs_at, beta=beta)["loss_B"])

  loss_B = preference.preference_loss("ipo", **pairs, beta=beta)["loss_B"]
  np.testing.assert_array_equal(loss_B, (h_B - 2.0) ** 2)
  assert float(loss_B[2]) == 0.0 and np.all(np.delete(np.asarray(loss_B), 2) > 0)
  grad_B = jax.grad(total)(jnp.asarray(pairs["chosen_logps_B"]))
  np.testing.assert_array_equal(grad_B, 2 * (h_B - 2.0))


def test_orpo_log_odds_stay_exact_as_the_answer_becomes_certain():
  m_B = np.array([-30.0, -5.0, -0.5, -1e-2, -1e-4, -1e-5, -1e-6], np.float32)
  want = m_B.astype(np.float64) - np.log(-np.expm1(m_B.astype(np.float64)))
  np.testing.assert_allclose(preference.log_odds(m_B), want, rtol=1e-6)
  # p = 1 (and a padding row's 0 / 0 -> 0): clamped, finite, not +inf
  at_one = float(preference.log_odds(jnp.zeros(1))[0])
  m = preference.MAX_MEAN_LOGP
  assert math.isclose(at_one, m - math.log(-math.expm1(m)), rel_tol=1e-6)


@pytest.mark.parametrize("kind", preference.LOSSES)
def test_padding_rows_change_no_sum_and_get_no_gradient(kind):
  real = random_pairs(11, b=3)
  # padding as sequence_logps makes it (no tokens: logps 0, count 0), then garbage
  zeros = {k: np.zeros(2, np.float32) for k in real}
  garbage = {k: np.array([np.nan, np.inf], np.float32) for k in real}
  weight_B = np.array([1, 1, 1, 0, 0], np.float32)

  def sums(pairs, weight_B):
    out = preference.preference_loss(kind, **pairs, beta=0.5, label_smoothing=0.1)
    return preference.preference_metrics(
      out, pairs["chosen_logps_B"], pairs["rejected_logps_B"], weight_B
    )

  alone = sums(real, weight_B[:3])
  for padding in (zeros, garbage):
    padded = {k: np.concatenate([real[k], padding[k]]) for k in real}
    with_padding = sums(padded, weight_B)
    assert set(with_padding) == set(alone)
    for key in alone:
      np.testing.assert_allclose(with_padding[key], alone[key], rtol=1e-6, err_msg=key)
  assert float(alone["weight"]) == 3.0

  padded = {k: np.concatenate([real[k], zeros[k]]) for k in real}

  def loss_sum(chosen_logps_B, rejected_logps_B):
    pairs = {**padded, "chosen_logps_B": chosen_logps_B, "rejected_logps_B": rejected_logps_B}
    return sums(pairs, weight_B)["loss_sum"]

  grads = jax.grad(loss_sum, argnums=(0, 1))(
    jnp.asarray(padded["chosen_logps_B"]), jnp.asarray(padded["rejected_logps_B"])
  )
  for g_B in grads:
    assert np.all(np.isfinite(g_B)) and np.all(g_B[3:] == 0) and np.any(g_B[:3] != 0)


def test_metrics_are_the_weighted_sums_with_strict_wins():
  rng = np.random.default_rng(5)
  chosen_B = rng.normal(0, 1, 8).astype(np.float32)
  rejected_B = rng.normal(0, 1, 8).astype(np.float32)
  rejected_B[:2] = chosen_B[:2]  # ties: not wins
  out = {
    "loss_B": rng.uniform(0, 3, 8).astype(np.float32),
    "chosen_rewards_B": chosen_B,
    "rejected_rewards_B": rejected_B,
  }
  logps_c, logps_r = rng.uniform(-90, -5, (2, 8)).astype(np.float32)
  weight_B = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  sums = preference.preference_metrics(out, logps_c, logps_r, weight_B)
  w, c, r = (x.astype(np.float64) for x in (weight_B, chosen_B, rejected_B))
  want = {
    "loss_sum": np.sum(w * out["loss_B"]),
    "weight": 6.0,
    "rewards/chosen": np.sum(w * c),
    "rewards/rejected": np.sum(w * r),
    "rewards/margin": np.sum(w * (c - r)),
    "rewards/accuracy": np.sum(w * (c > r)),
    "logps/chosen": np.sum(w * logps_c),
    "logps/rejected": np.sum(w * logps_r),
  }
  assert set(sums) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(sums[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sequence_logps_sum_the_masked_log_softmax(dtype):
  rng = np.random.default_rng(2)
  logits_BLV = jnp.asarray(3 * rng.standard_normal((3, 7, 11)), dtype)
  targets_BL = rng.integers(0, 11, (3, 7)).astype(np.int32)
  mask_BL = np.array([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1], [0] * 7], np.float32)
  logps_B, counts_B = preference.sequence_logps(logits_BLV, targets_BL, mask_BL)

  x = np.asarray(logits_BLV.astype(jnp.float32), np.float64)  # the values the model gave
  want_B = np.zeros(3)
  for b in range(3):
    for i in range(7):
      if mask_BL[b, i]:
        row = x[b, i]
        lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
        want_B[b] += row[targets_BL[b, i]] - lse
  assert logps_B.dtype == jnp.float32
  np.testing.assert_allclose(logps_B, want_B, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(counts_B, [4, 7, 0])


def test_an_unknown_loss_or_a_missing_reference_is_refused():
  pairs = random_pairs(0, b=2)
  with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
    preference.preference_loss("kto", **pairs, beta=0.1)
  for kind in ("dpo", "cdpo", "ipo"):
    with pytest.raises(ValueError, match="reference"):
      preference.preference_loss(kind, **{**pairs, "ref_chosen_logps_B": None}, beta=0.1)
  for kind in preference.REFERENCE_FREE:
    without = {**pairs, "ref_chosen_logps_B": None, "ref_rejected_logps_B": None}
    with_ref = preference.preference_loss(kind, **pairs, beta=0.1)
    np.testing.assert_array_equal(
      preference.preference_loss(kind, **without, beta=0.1)["loss_B"], with_ref["loss_B"]
    )
