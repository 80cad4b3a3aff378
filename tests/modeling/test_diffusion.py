"""Masked diffusion (modeling/diffusion.py): schedules against their closed forms, the forward
process's statistics, the NELBO against known entropies with exact denoisers, the ancestral
and LLaDA samplers on a tiny random model, and time conditioning."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from configs import base
from modeling import diffusion
from modeling.transformer import Transformer, TransformerConfig
from modeling.vocab import EOS_ID, MASK_ID, NUM_SPECIAL
from tests.tiny_models import VOCAB, abstract_init, random_params, tiny
from train.data.tokenizers import ByteTokenizer

RULE_NAMES = {name for name, _ in base.get_config().logical_axis_rules}
SCHEDULES = [("loglinear", 1.0), ("cosine", 1.0), ("polynomial", 2.0), ("polynomial", 3.0)]
SCHEDULE_IDS = [f"{n}-{e:g}" for n, e in SCHEDULES]


def closed_form(name: str, exponent: float, t):
  """(alpha, dalpha, weight) in float64 NumPy, from the published formulas."""
  t = np.asarray(t, np.float64)
  if name == "loglinear":
    return 1 - t, -np.ones_like(t), 1 / t
  if name == "cosine":
    a = np.pi / 2 * (1 - t)
    return 1 - np.cos(a), -np.pi / 2 * np.sin(a), np.pi / 2 * np.tan(a)
  return 1 - t**exponent, -exponent * t ** (exponent - 1), exponent / t


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "exponent"), SCHEDULES, ids=SCHEDULE_IDS)
def test_schedule_matches_its_closed_form(name, exponent):
  s = diffusion.make_schedule(name, exponent)
  # (t >= 0.05: near 0, 1 - alpha(t) cancels in float32 for the polynomial schedules)
  t_N = np.array([0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
  alpha_N, dalpha_N, weight_N = closed_form(name, exponent, t_N)
  t = jnp.asarray(t_N, jnp.float32)
  np.testing.assert_allclose(np.asarray(s.alpha(t)), alpha_N, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.dalpha(t)), dalpha_N, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.weight(t)), weight_N, rtol=1e-4)
  grads = [float(jax.grad(s.alpha)(jnp.float32(x))) for x in t_N]
  np.testing.assert_allclose(np.asarray(s.dalpha(t)), grads, rtol=1e-5)
  assert float(s.alpha(jnp.float32(0.0))) == pytest.approx(1.0, abs=1e-6)
  assert float(s.alpha(jnp.float32(1.0))) == pytest.approx(0.0, abs=1e-6)


def test_unknown_schedule_names_the_key():
  with pytest.raises(ValueError, match=r"task\.schedule='foo'.*loglinear"):
    diffusion.make_schedule("foo")


# --- forward process -------------------------------------------------------------------------


def test_antithetic_times_are_stratified_and_uniform():
  batch = 8
  draws = jax.jit(jax.vmap(lambda r: diffusion.antithetic_times(r, batch)))
  t_NB = np.asarray(draws(jax.random.split(jax.random.key(0), 4000)), np.float64)
  assert t_NB.shape == (4000, batch)
  assert (t_NB > 0).all() and (t_NB <= 1).all()
  gaps = np.diff(np.sort(t_NB, axis=1), axis=1)
  np.testing.assert_allclose(gaps, 1 / batch, atol=1e-5)
  # Each row's time is uniform on (0, 1] over draws; so are all of them together.
  for column in (t_NB[:, 0], t_NB[:, batch - 1], t_NB.ravel()):
    assert scipy.stats.kstest(column, "uniform").pvalue > 1e-3
  assert not np.array_equal(t_NB[0], t_NB[1])  # the offset comes from the rng


def test_corrupt_masks_real_tokens_with_probability_one_minus_alpha():
  rng = np.random.default_rng(0)
  alphas = np.array([0.0, 0.1, 0.5, 0.9, 1.0], np.float32)
  rows, length = 40, 256
  alpha_B = np.repeat(alphas, rows)
  tokens_BL = rng.integers(NUM_SPECIAL, VOCAB, (alpha_B.size, length)).astype(np.int32)
  ends_B = rng.integers(length // 2, length + 1, alpha_B.size)
  seg_BL = (np.arange(length) < ends_B[:, None]).astype(np.int32)
  seg_BL[:, : length // 4] = 2  # two documents per row; both are real
  masked_n, real_n = np.zeros(alphas.size), np.zeros(alphas.size)
  for seed in range(4):
    z_BL, masked_BL = (
      np.asarray(a)
      for a in jax.jit(diffusion.corrupt)(jax.random.key(seed), tokens_BL, seg_BL, alpha_B)
    )
    assert not masked_BL[seg_BL == 0].any()  # padding is never masked
    np.testing.assert_array_equal(z_BL[~masked_BL], tokens_BL[~masked_BL])
    assert (z_BL[masked_BL] == MASK_ID).all()
    for i in range(alphas.size):
      rows_BL = np.zeros_like(masked_BL)
      rows_BL[i * rows : (i + 1) * rows] = True
      masked_n[i] += (masked_BL & rows_BL).sum()
      real_n[i] += ((seg_BL > 0) & rows_BL).sum()
  rate = masked_n / real_n
  sigma = np.sqrt(np.maximum(alphas * (1 - alphas), 1e-12) / real_n)
  assert (np.abs(rate - (1 - alphas)) < 5 * sigma + 1e-9).all(), (rate, 1 - alphas)


def test_subs_logits_puts_minus_infinity_on_mask_only():
  logits_BLV = jax.random.normal(jax.random.key(0), (2, 3, 16), jnp.bfloat16)
  out = np.asarray(diffusion.subs_logits(logits_BLV))
  assert out.dtype == np.float32
  assert (out[..., MASK_ID] == -np.inf).all()
  others = np.delete(out, MASK_ID, axis=-1)
  expected = np.delete(np.asarray(logits_BLV, np.float32), MASK_ID, axis=-1)
  np.testing.assert_array_equal(others, expected)


# --- the NELBO with exact denoisers ----------------------------------------------------------

K, V = 4, 16  # symbols 8..11 of a 16-token vocabulary
SYMBOLS = jnp.arange(NUM_SPECIAL, NUM_SPECIAL + K)
ROWS, LENGTH, DRAWS = 512, 8, 256  # 512 rows compile faster than 4096 (XLA CPU)


def uniform_over(symbols, shape):
  row_V = jnp.full((V,), -jnp.inf).at[symbols].set(0.0)
  return jnp.broadcast_to(row_V, (*shape, V))


def iid_denoiser(z_BL, t_B):
  """Exact for i.i.d. uniform tokens: a position's posterior ignores every other position."""
  del t_B
  return uniform_over(SYMBOLS, z_BL.shape)


def repeat_denoiser(z_BL, t_B):
  """Exact for rows of one repeated symbol: any unmasked token gives it away."""
  del t_B
  known_BL = z_BL != MASK_ID
  symbol_B = jnp.max(jnp.where(known_BL, z_BL, 0), axis=-1)
  certain_BV = jnp.where(jnp.arange(V) == symbol_B[:, None], 0.0, -jnp.inf)
  row_BV = jnp.where(known_BL.any(-1, keepdims=True), certain_BV, uniform_over(SYMBOLS, ()))
  return jnp.broadcast_to(row_BV[:, None], (*z_BL.shape, V))


def vocab_denoiser(z_BL, t_B):
  """Uniform over the whole vocabulary: a wrong model."""
  del t_B
  return jnp.zeros((*z_BL.shape, V))


CASES = (  # (denoiser, data): exact, then wrong
  (iid_denoiser, "iid"),
  (vocab_denoiser, "iid"),
  (repeat_denoiser, "repeat"),
  (iid_denoiser, "repeat"),
)


@functools.partial(jax.jit, static_argnames=("name", "exponent"))
def nelbo_draws(rngs, data, name, exponent):
  """[cases, draws] NELBO per row (one batch per draw) for each (denoiser, data) case: one
  compile per schedule; name 'count' is the count estimator (no schedule)."""
  count = name == "count"
  schedule = diffusion.make_schedule("loglinear" if count else name, exponent)

  def case(denoiser, tokens_BL, seg_BL):
    def one(rng):
      if count:
        return diffusion.nelbo_sum_count(denoiser, rng, tokens_BL, seg_BL) / tokens_BL.shape[0]
      return diffusion.nelbo_sum(denoiser, rng, tokens_BL, seg_BL, schedule) / tokens_BL.shape[0]

    return jax.vmap(one)(rngs)

  return jnp.stack([case(d, *data[kind]) for d, kind in CASES])


@pytest.mark.parametrize(
  ("name", "exponent"), [*SCHEDULES[:3], ("count", 1.0)], ids=[*SCHEDULE_IDS[:3], "count"]
)
def test_nelbo_equals_the_entropy_with_an_exact_denoiser(name, exponent):
  rng = np.random.default_rng(0)
  # (a) i.i.d. uniform tokens, rows of 5 to 8 real tokens then padding: entropy log k per token.
  iid_BL = rng.integers(NUM_SPECIAL, NUM_SPECIAL + K, (ROWS, LENGTH))
  seg_BL = np.arange(LENGTH) < rng.integers(5, LENGTH + 1, (ROWS, 1))
  # (b) one symbol repeated over the row: entropy log k per sequence.
  rep_BL = np.repeat(rng.integers(NUM_SPECIAL, NUM_SPECIAL + K, (ROWS, 1)), LENGTH, 1)
  data = {
    "iid": (jnp.asarray(iid_BL, jnp.int32), jnp.asarray(seg_BL, jnp.int32)),
    "repeat": (jnp.asarray(rep_BL, jnp.int32), jnp.ones((ROWS, LENGTH), jnp.int32)),
  }
  rngs = jax.random.split(jax.random.key(1), DRAWS)
  d = np.asarray(nelbo_draws(rngs, data, name, exponent), np.float64)
  mean, err = d.mean(-1), d.std(-1, ddof=1) / np.sqrt(DRAWS)
  real = seg_BL.sum(-1).mean()
  entropy = np.array([real * math.log(K), real * math.log(K), math.log(K), math.log(K)])

  for i in (0, 2):  # the exact denoisers: the bound is tight
    # (+ float32 rounding: the count estimator of an exact denoiser has no spread at all)
    assert abs(mean[i] - entropy[i]) < 4 * err[i] + 1e-6 * entropy[i], (i, mean, entropy, err)
    assert err[i] < 0.01 * entropy[i]  # the test has the power to see a 4% bias
  # A worse model scores higher. Uniform over the vocabulary: log(V - 1) per token.
  assert mean[1] > entropy[1] + 10 * err[1]
  assert mean[1] == pytest.approx(real * math.log(V - 1), rel=0.05)
  # The i.i.d. model is exact per position but misses the repetition: L log k per row.
  assert mean[3] > entropy[3] + 10 * err[3]
  assert mean[3] == pytest.approx(LENGTH * math.log(K), rel=0.05)


def test_count_masks_are_uniform_subsets_of_uniform_sizes():
  n_B = np.array([8, 5, 1, 0] * 256)  # real tokens per row; a row of padding only
  seg_BL = jnp.asarray(np.arange(LENGTH) < n_B[:, None], jnp.int32)
  tokens_BL = jnp.full(seg_BL.shape, NUM_SPECIAL, jnp.int32)
  draws = [diffusion.count_masks(jax.random.key(i), tokens_BL, seg_BL) for i in range(40)]
  z_BL, masked_BL, k_B = (np.stack([np.asarray(d[j]) for d in draws]) for j in range(3))
  assert (masked_BL.sum(-1) == k_B).all()  # exactly k masked
  assert not (masked_BL & ~np.asarray(seg_BL, bool)).any()  # never padding
  np.testing.assert_array_equal(z_BL == MASK_ID, masked_BL)
  for n in (8, 5, 1):
    rows = n_B == n
    k = k_B[:, rows].ravel()
    assert k.min() == 1 and k.max() == n
    counts = np.bincount(k, minlength=n + 1)[1:]
    assert n == 1 or scipy.stats.chisquare(counts).pvalue > 1e-3, counts  # k ~ U{1..n}
    # given k, every position is equally likely: masked fraction per position ~ E[k] / n
    per_pos = masked_BL[:, rows, :n].mean((0, 1))
    np.testing.assert_allclose(per_pos, (n + 1) / (2 * n), atol=0.02)
  assert (k_B[:, n_B == 0] == 0).all()
  # stratified like antithetic_times: within a batch, each row-length's k's spread evenly
  k8_B = k_B[0, n_B == 8]
  assert np.bincount(k8_B, minlength=9)[1:].max() - np.bincount(k8_B)[1:].min() <= 1


def test_count_estimator_has_the_time_estimators_expectation_for_any_denoiser():
  """A mask-dependent random denoiser (not exact): both estimators' Monte Carlo means equal the
  NELBO enumerated over all 2^L masks in float64, sum_k 1/k * mean over k-subsets; the count
  estimator with a fraction of the spread."""
  length, vocab = 5, 9
  w_LLV = np.random.default_rng(3).normal(size=(length, length, vocab))

  def denoiser(z_BL, t_B):
    del t_B
    return jnp.einsum("bj,jlv->blv", (z_BL == MASK_ID).astype(jnp.float32), w_LLV)

  x_L = np.array([4, 8, 5, 4, 7])
  rows = 4096
  tokens_BL = jnp.asarray(np.tile(x_L, (rows, 1)), jnp.int32)
  seg_BL = jnp.ones_like(tokens_BL)
  schedule = diffusion.make_schedule("cosine")
  estimators = {
    "time": jax.jit(lambda r: diffusion.nelbo_sum(denoiser, r, tokens_BL, seg_BL, schedule)),
    "count": jax.jit(lambda r: diffusion.nelbo_sum_count(denoiser, r, tokens_BL, seg_BL)),
  }
  exact = 0.0
  for bits in range(1, 2**length):
    m_L = np.array([(bits >> i) & 1 for i in range(length)], bool)
    z_L = np.where(m_L, MASK_ID, x_L)
    logits_LV = np.einsum("j,jlv->lv", (z_L == MASK_ID).astype(np.float64), w_LLV)
    logits_LV[:, MASK_ID] = -np.inf
    logp_LV = logits_LV - scipy.special.logsumexp(logits_LV, axis=-1, keepdims=True)
    nll = -logp_LV[np.arange(length), x_L][m_L].sum()
    exact += nll / m_L.sum() / math.comb(length, m_L.sum())
  spread = {}
  for name, f in estimators.items():
    d = np.array([float(f(jax.random.key(i))) / rows for i in range(24)])
    err = d.std(ddof=1) / np.sqrt(d.size)
    assert abs(d.mean() - exact) < 4 * err + 1e-4 * exact, (name, d.mean(), exact, err)
    spread[name] = d.std(ddof=1)
  assert spread["count"] < 0.5 * spread["time"], spread


# --- samplers on a tiny random model ---------------------------------------------------------

LEN, STEPS = 16, 64
GIVEN_L = np.r_[0:2, 14:16]  # a 2-token prompt and a 2-token suffix around 12 masks


def diffusion_cfg(**overrides) -> TransformerConfig:
  """configs/mdlm.py's `size=tiny` model with a small vocabulary and context."""
  return tiny("mdlm", LEN, **overrides)


def model_and_params(**overrides):
  cfg = diffusion_cfg(**overrides)
  return Transformer(cfg), random_params(cfg)


def layout(rows: int = 2, seed: int = 0) -> np.ndarray:
  """[rows, LEN]: different prompts and suffixes per row, [MASK] between them."""
  z_BL = np.full((rows, LEN), MASK_ID, np.int32)
  z_BL[:, GIVEN_L] = np.random.default_rng(seed).integers(NUM_SPECIAL, VOCAB, (rows, GIVEN_L.size))
  return z_BL


@functools.cache
def forward(cfg: TransformerConfig):
  """jit((params, tokens, time) -> logits) over positions 0.. in one segment."""

  def f(params, tokens_BL, time_B=None):
    pos_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    return Transformer(cfg).apply(
      {"params": params}, tokens_BL, pos_BL, jnp.ones_like(pos_BL), time_B=time_B
    )[0]

  return jax.jit(f)


def test_ancestral_cache_skips_calls_without_changing_the_samples():
  model, params = model_and_params()
  schedule = diffusion.make_schedule("loglinear")
  z_BL, rng = layout(), jax.random.key(3)
  cached, cached_calls = diffusion.ancestral_sample(model, params, z_BL, rng, schedule, STEPS)
  fresh, fresh_calls = diffusion.ancestral_sample(
    model, params, z_BL, rng, schedule, STEPS, use_cache=False
  )
  assert not (cached == MASK_ID).any()
  np.testing.assert_array_equal(cached[:, GIVEN_L], z_BL[:, GIVEN_L])  # clamped
  np.testing.assert_array_equal(cached, fresh)
  assert fresh_calls == STEPS
  # A call only follows a step that revealed something in the batch: at most one per masked
  # token, + 1.
  masked = int((z_BL == MASK_ID).sum())
  assert 2 <= cached_calls <= masked + 1, cached_calls
  assert (cached[0] != cached[1]).any()
  other, _ = diffusion.ancestral_sample(model, params, z_BL, jax.random.key(4), schedule, STEPS)
  assert (other != cached).any()  # it samples


def test_ancestral_recomputes_a_time_conditioned_model_every_step():
  model, params = model_and_params(time_conditioning=True)
  schedule = diffusion.make_schedule("loglinear")
  z_BL = layout()
  out, calls = diffusion.ancestral_sample(model, params, z_BL, jax.random.key(3), schedule, STEPS)
  assert not (out == MASK_ID).any()
  np.testing.assert_array_equal(out[:, GIVEN_L], z_BL[:, GIVEN_L])
  assert calls == STEPS


def test_ancestral_tiny_top_p_is_greedy():
  model, params = model_and_params()
  schedule = diffusion.make_schedule("cosine")
  z_BL, rng = layout(seed=1), jax.random.key(5)
  nucleus, _ = diffusion.ancestral_sample(
    model, params, z_BL, rng, schedule, STEPS, temperature=1.0, top_p=1e-6
  )
  greedy, _ = diffusion.ancestral_sample(model, params, z_BL, rng, schedule, STEPS, temperature=0.0)
  sampled, _ = diffusion.ancestral_sample(model, params, z_BL, rng, schedule, STEPS)
  np.testing.assert_array_equal(nucleus, greedy)
  assert (sampled != greedy).any()  # at temperature 1 without top-p it does sample
  assert not (greedy == MASK_ID).any()


@pytest.mark.parametrize("grid", ["uniform", "alpha"])
@pytest.mark.parametrize(("name", "exponent"), SCHEDULES, ids=SCHEDULE_IDS)
def test_time_grid_runs_from_one_to_zero(name, exponent, grid):
  ts = diffusion.time_grid(10, grid, diffusion.make_schedule(name, exponent))
  assert ts.shape == (11,)
  assert ts[0] == 1.0 and ts[-1] == 0.0, ts
  assert (np.diff(ts) < 0).all()


def test_time_grid_alpha_takes_equal_steps_in_alpha():
  cosine, loglinear = diffusion.make_schedule("cosine"), diffusion.make_schedule("loglinear")
  np.testing.assert_allclose(np.diff(diffusion.time_grid(10, "uniform", cosine)), -0.1)
  ts = diffusion.time_grid(10, "alpha", cosine)
  np.testing.assert_allclose(np.diff(closed_form("cosine", 1.0, ts)[0]), 0.1, atol=1e-4)
  assert np.abs(ts - np.linspace(1, 0, 11)).max() > 0.05  # ... which are not equal in t
  # The log-linear schedule's alpha is linear in t: the same grid.
  np.testing.assert_allclose(
    diffusion.time_grid(7, "alpha", loglinear), np.linspace(1, 0, 8), atol=1e-4
  )
  assert diffusion.time_grid(1, "uniform", cosine).tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match=r"--grid='log'"):
    diffusion.time_grid(10, "log", cosine)
  with pytest.raises(ValueError, match=r"--steps=0: must be >= 1"):
    diffusion.time_grid(0, "uniform", cosine)


def test_select_confident_keeps_the_k_most_confident_finite_positions():
  rng = np.random.default_rng(0)
  conf_BL = rng.random((5, 12)).astype(np.float32)
  conf_BL[rng.random((5, 12)) < 0.3] = -np.inf
  conf_BL[4, 8:] = -np.inf  # row 4 has at most 8 candidates and asks for 10
  finite_B = np.isfinite(conf_BL).sum(-1)
  k_B = np.array([0, 1, 3, finite_B[3], 10], np.int32)
  got = np.asarray(diffusion.select_confident(jnp.asarray(conf_BL), jnp.asarray(k_B)))
  for row in range(5):
    finite = np.flatnonzero(np.isfinite(conf_BL[row]))
    best = finite[np.argsort(-conf_BL[row, finite])][: k_B[row]]
    assert set(np.flatnonzero(got[row])) == set(best.tolist()), row
  assert got.sum(-1).tolist() == [0, 1, 3, finite_B[3], finite_B[4]]


def test_transfer_counts_are_as_even_as_possible():
  for masked, steps in ((10, 4), (12, 4), (3, 5), (0, 2), (1, 1)):
    counts = diffusion.transfer_counts(masked, steps)
    assert counts.shape == (steps,) and counts.sum() == masked
    assert counts.max() - counts.min() <= 1
    assert (np.diff(counts) <= 0).all()  # the earlier steps take the remainder
  assert diffusion.transfer_counts(10, 4).tolist() == [3, 3, 2, 2]


LLADA_STEPS, LLADA_BLOCK = 6, 4  # 12 masks: three blocks of 4, two steps each


def run_llada(model, params, z_BL, block_BL, counts_BN, block_of_step_N, rng):
  """The jitted LLaDA loop, greedy with low-confidence remasking."""
  return np.asarray(
    diffusion._llada(
      model,
      params,
      jnp.asarray(z_BL),
      jnp.asarray(block_BL),
      jnp.asarray(counts_BN, jnp.int32),
      jnp.asarray(block_of_step_N, jnp.int32),
      rng,
      temperature=0.0,
      top_p=1.0,
      remasking="low_confidence",
    )
  )


def test_llada_step_keeps_the_most_confident_predictions():
  model, params = model_and_params()
  z_BL, k = layout(), 3
  logits_BLV = np.asarray(forward(model.cfg)(params, jnp.asarray(z_BL)), np.float64)
  logits_BLV[..., MASK_ID] = -np.inf  # the denoiser never predicts [MASK]
  probs_BLV = np.exp(logits_BLV - logits_BLV.max(-1, keepdims=True))
  probs_BLV /= probs_BLV.sum(-1, keepdims=True)
  # One step that reveals k tokens, then steps that reveal none (the compiled shape of the
  # block test below).
  counts_BN = np.zeros((2, LLADA_STEPS), np.int32)
  counts_BN[:, 0] = k
  out = run_llada(
    model, params, z_BL, np.zeros_like(z_BL), counts_BN, [0] * LLADA_STEPS, jax.random.key(0)
  )
  np.testing.assert_array_equal(out[:, GIVEN_L], z_BL[:, GIVEN_L])
  for row in range(2):
    masked = np.flatnonzero(z_BL[row] == MASK_ID)
    conf = probs_BLV[row, masked].max(-1)
    order = np.argsort(-conf)
    assert conf[order[k - 1]] - conf[order[k]] > 1e-4  # no near-tie at the cut
    expected = set(masked[order[:k]].tolist())
    revealed = set(np.flatnonzero(out[row] != z_BL[row]).tolist())
    assert revealed == expected, (row, sorted(revealed), sorted(expected))
    for pos in revealed:
      assert out[row, pos] == probs_BLV[row, pos].argmax()
    assert (out[row, masked] == MASK_ID).sum() == masked.size - k


def test_llada_blocks_go_left_to_right(monkeypatch):
  model, params = model_and_params()
  z_BL, rng = layout(), jax.random.key(1)
  seen = []

  def spy(*args, **kwargs):
    seen.append(args)
    return real(*args, **kwargs)

  real = diffusion._llada
  monkeypatch.setattr(diffusion, "_llada", spy)
  out, calls = diffusion.llada_sample(
    model, params, z_BL, rng, LLADA_STEPS, LLADA_BLOCK, temperature=0.0
  )
  assert calls == LLADA_STEPS
  assert not (out == MASK_ID).any()
  np.testing.assert_array_equal(out[:, GIVEN_L], z_BL[:, GIVEN_L])

  ((_, _, _, block_BL, counts_BN, block_of_step_N, _),) = seen
  blocks = [np.r_[2:6], np.r_[6:10], np.r_[10:14]]
  for j, positions in enumerate(blocks):
    assert (np.asarray(block_BL)[:, positions] == j).all()
    steps = np.flatnonzero(np.asarray(block_of_step_N) == j)
    assert steps.tolist() == [2 * j, 2 * j + 1]
    assert (np.asarray(counts_BN)[:, steps].sum(-1) == positions.size).all()
  # Replay the first steps only (later counts set to 0): a block is done before the next
  # one starts, and the later steps never touch it.
  for done in range(1, LLADA_STEPS):
    partial_BN = np.where(np.arange(LLADA_STEPS) < done, counts_BN, 0)
    part = run_llada(model, params, z_BL, block_BL, partial_BN, block_of_step_N, rng)
    current = (done - 1) // 2
    for j, positions in enumerate(blocks):
      if j < current or (j == current and done % 2 == 0):
        np.testing.assert_array_equal(part[:, positions], out[:, positions])
      elif j > current:
        assert (part[:, positions] == MASK_ID).all(), (done, j)
      else:
        assert 0 < (part[:, positions] == MASK_ID).sum() < part[:, positions].size


def test_llada_errors():
  model, params = model_and_params()
  with pytest.raises(ValueError, match=r"--steps=4: must be a positive multiple of the 3 blocks"):
    diffusion.llada_sample(model, params, layout(), jax.random.key(0), 4, LLADA_BLOCK)
  with pytest.raises(ValueError, match=r"--block_length=5: must divide the 12 generated"):
    diffusion.llada_sample(model, params, layout(), jax.random.key(0), 6, 5)
  with pytest.raises(ValueError, match=r"--steps=0: must be a positive multiple"):
    diffusion.llada_sample(model, params, layout(), jax.random.key(0), 0, LLADA_BLOCK)
  z_BL = layout()
  z_BL[1, 5] = NUM_SPECIAL  # the rows' masks differ
  with pytest.raises(ValueError, match="same places"):
    diffusion.llada_sample(model, params, z_BL, jax.random.key(0), 6, LLADA_BLOCK)


def test_complete_lays_out_prompt_masks_and_suffix(monkeypatch):
  """Text level: the sampler gets prompt, [MASK] x num_tokens, suffix; the span it fills is cut
  at its first EOS; the text is prompt + span + suffix. (A stand-in sampler: no model.)"""
  model, params = model_and_params()
  tok, seen = ByteTokenizer(), []

  def fake_sampler(name):
    def sampler(model, params, z_1L, rng, *args):
      seen.append((name, z_1L.copy(), args))
      out = np.where(z_1L == MASK_ID, NUM_SPECIAL + ord("x"), z_1L)
      out[0, 4 + 5] = EOS_ID  # the span's 6th token
      return out, 7

    return sampler

  monkeypatch.setattr(diffusion, "ancestral_sample", fake_sampler("ancestral"))
  monkeypatch.setattr(diffusion, "llada_sample", fake_sampler("llada"))
  schedule = diffusion.make_schedule("loglinear")
  kw = dict(schedule=schedule, suffix="):")
  text, calls = diffusion.complete(model, params, tok, "def ", 8, jax.random.key(0), **kw)
  assert (text, calls) == ("def xxxxx):", 7)
  ((name, z_1L, args),) = seen
  expected = np.concatenate([tok.encode("def "), [MASK_ID] * 8, tok.encode("):")])
  assert name == "ancestral" and z_1L.tolist() == [expected.tolist()]
  assert args[:2] == (schedule, 8)  # steps 0: one per generated token
  text, _ = diffusion.complete(
    model, params, tok, "ab", 8, jax.random.key(0), sampler="llada", steps=4, **kw
  )
  assert seen[-1][0] == "llada" and seen[-1][2][0] == 4 and text.startswith("ab")
  for n in (0, LEN - 5):  # 4 + n + 2 tokens must be 1..LEN
    with pytest.raises(ValueError, match=rf"--num_tokens={n} .*1 to {LEN} \(its context\)"):
      diffusion.complete(model, params, tok, "def ", n, jax.random.key(0), **kw)
  with pytest.raises(ValueError, match=r"--sampler='beam'"):
    diffusion.complete(model, params, tok, "def ", 8, jax.random.key(0), sampler="beam", **kw)


# --- time conditioning -----------------------------------------------------------------------


def test_time_conditioning_changes_the_output_and_denoise_passes_the_time():
  model, params = model_and_params(time_conditioning=True)
  f = forward(model.cfg)
  z_BL = jnp.asarray(layout())
  early, late = f(params, z_BL, jnp.full((2,), 0.1)), f(params, z_BL, jnp.full((2,), 0.9))
  assert np.abs(np.asarray(early) - np.asarray(late)).max(-1).min() > 1e-3  # every position
  pos_BL = jnp.broadcast_to(jnp.arange(LEN), z_BL.shape)
  t_B = jnp.array([0.1, 0.9])
  got = jax.jit(diffusion.denoise, static_argnums=0)(
    model, params, z_BL, pos_BL, jnp.ones_like(z_BL), t_B
  )
  expected = np.array(f(params, z_BL, t_B))
  expected[..., MASK_ID] = -np.inf
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  # Without time conditioning the time is ignored and there is no time embedding.
  plain, plain_params = model_and_params()
  g = forward(plain.cfg)
  early, late = g(plain_params, z_BL, jnp.full((2,), 0.1)), g(plain_params, z_BL, t_B)
  np.testing.assert_array_equal(np.asarray(early), np.asarray(late))
  assert "time_embed" not in plain_params and "time_embed" in params


def _names(boxed_params) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(
    boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  out = {}
  for path, leaf in leaves:
    key = "/".join(p.key for p in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{key} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, key
    out[key] = tuple(leaf.names)
  return out


def test_every_time_conditioned_param_has_logical_axis_names():
  names = _names(abstract_init(diffusion_cfg(time_conditioning=True)))
  for key, axes in names.items():
    # Only the sinusoidal features' axis of the time embedding's input is unnamed.
    assert None not in axes or key == "time_embed/time_in/kernel", (key, axes)
    assert set(axes) - {None} <= RULE_NAMES, (key, axes)
  expected = {
    "time_embed/time_in/kernel": (None, "factor"),
    "time_embed/time_in/bias": ("factor",),
    "time_embed/time_out/kernel": ("factor", "embed"),
    "time_embed/time_out/bias": ("embed",),
    "embed/embedding": ("vocab", "embed"),
  }
  for key, axes in expected.items():
    assert names.get(key) == axes, (key, names.get(key))
