"""Masked (absorbing-state) discrete diffusion: schedules, forward process, NELBO, samplers.

MDLM (Sahoo et al. 2024), MD4 (Shi et al. 2024), LLaDA (Nie et al. 2025). Time runs from
t = 0 (data) to t = 1 (every token [MASK]); `alpha(t)` is the probability that a token is
still unmasked at time t, decreasing from alpha(0) = 1 to alpha(1) = 0. The forward process
masks each token independently with probability 1 - alpha(t). With the SUBS
parameterization (no probability on [MASK], unmasked tokens copied through) the
continuous-time negative ELBO is

  NELBO(x) = E_{t ~ U(0, 1)} [ w(t) * sum over masked positions of -log p(x_l | z_t) ],
  w(t) = -alpha'(t) / (1 - alpha(t)),

an upper bound on -log p(x), in nats, which divided by the tokens compares with an AR
model's loss per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from modeling.decoding import choose_tokens
from modeling.vocab import EOS_ID, MASK_ID


@dataclasses.dataclass(frozen=True)
class Schedule:
  """alpha(t) and its derivative; w(t) = -alpha'(t) / (1 - alpha(t)) weighs the loss."""

  name: str
  alpha: Callable[[jax.Array], jax.Array]
  dalpha: Callable[[jax.Array], jax.Array]

  def weight(self, t: jax.Array) -> jax.Array:
    return -self.dalpha(t) / (1.0 - self.alpha(t))


SCHEDULES = ("loglinear", "cosine", "polynomial")  # task.schedule
ESTIMATORS = ("time", "count")  # task.estimator: NELBO draws over t, or over masked counts
SAMPLERS = ("ancestral", "llada")  # eval.sample --sampler
GRIDS = ("uniform", "alpha")  # eval.sample --grid: ancestral time grids
REMASKING = ("low_confidence", "random")  # eval.sample --remasking: what LLaDA remasks


def make_schedule(name: str, exponent: float = 1.0) -> Schedule:
  """log-linear: alpha = 1 - t (MDLM; w = 1/t); cosine: alpha = 1 - cos(pi/2 (1 - t)) (MD4;
  w = pi/2 tan(pi/2 (1 - t))); polynomial: alpha = 1 - t^exponent (MD4; w = exponent / t)."""
  half_pi = math.pi / 2
  if name == "loglinear":
    return Schedule(name, lambda t: 1.0 - t, lambda t: -jnp.ones_like(t))
  if name == "cosine":
    return Schedule(
      name,
      lambda t: 1.0 - jnp.cos(half_pi * (1.0 - t)),
      lambda t: -half_pi * jnp.sin(half_pi * (1.0 - t)),
    )
  if name == "polynomial":
    return Schedule(name, lambda t: 1.0 - t**exponent, lambda t: -exponent * t ** (exponent - 1))
  raise ValueError(f"task.schedule={name!r}: allowed {list(SCHEDULES)}")


def antithetic_times(rng: jax.Array, batch: int) -> jax.Array:
  """[B] times in (0, 1], one per row, stratified: 1 - ((u + i / B) mod 1) for one u ~ U[0, 1).

  Low-discrepancy sampling (MDLM): the batch covers [0, 1] evenly, which cuts the variance
  of the batch's loss estimate without biasing it (each t is still uniform)."""
  u = jax.random.uniform(rng, ())
  return 1.0 - jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)


def corrupt(
  rng: jax.Array, tokens_BL: jax.Array, seg_BL: jax.Array, alpha_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The forward process q(z_t | x): (z_BL, masked_BL); each real token (segment > 0) is
  replaced by [MASK] with probability 1 - alpha(t) of its row. Padding is never masked."""
  masked_BL = (seg_BL > 0) & (jax.random.uniform(rng, tokens_BL.shape) >= alpha_B[:, None])
  return jnp.where(masked_BL, MASK_ID, tokens_BL), masked_BL


def _nll(logits_fn, z_BL, t_B, tokens_BL) -> jax.Array:
  """-log p(x_l | z_t) at every position under the SUBS denoiser."""
  logp_BLV = jax.nn.log_softmax(subs_logits(logits_fn(z_BL, t_B)), axis=-1)
  return -jnp.take_along_axis(logp_BLV, tokens_BL[..., None], axis=-1)[..., 0]


def subset_masks(
  rng: jax.Array, tokens_BL: jax.Array, seg_BL: jax.Array, k_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(z_BL, masked_BL): row b masks exactly k_b of its real tokens, a uniformly random subset."""
  real_BL = seg_BL > 0
  u_BL = jnp.where(real_BL, jax.random.uniform(rng, tokens_BL.shape), 2.0)
  rank_BL = jnp.argsort(jnp.argsort(u_BL, axis=-1), axis=-1)  # padding ranks last
  masked_BL = real_BL & (rank_BL < k_B[:, None])
  return jnp.where(masked_BL, MASK_ID, tokens_BL), masked_BL


def count_masks(
  rng: jax.Array, tokens_BL: jax.Array, seg_BL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masks for the count estimator: (z_BL, masked_BL, k_B). Row b masks exactly k_b of its n_b
  real tokens, a uniformly random subset, with k_b uniform on {1, ..., n_b} and stratified
  across the batch like `antithetic_times` (k_B is 0 for an all-padding row)."""
  r_count, r_order = jax.random.split(rng)
  n_B = jnp.sum(seg_BL > 0, axis=-1)
  r_B = 1.0 - antithetic_times(r_count, tokens_BL.shape[0])  # in [0, 1)
  k_B = jnp.minimum(1 + jnp.floor(r_B * n_B).astype(jnp.int32), n_B)
  return *subset_masks(r_order, tokens_BL, seg_BL, k_B), k_B


def masked_nll_at(
  logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
  rng: jax.Array,
  tokens_BL: jax.Array,
  seg_BL: jax.Array,
  ratio: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(x_l | z), masked count) with ceil(ratio * n) of each row's n real tokens
  masked (at least 1): the denoiser's loss at one mask ratio. For a time-independent denoiser
  the NELBO per token is the mean of this curve over ratio ~ U(0, 1); on the midpoints
  (i - 1/2)/n, i = 1..n, the mean is exact (each count k = i once)."""
  n_B = jnp.sum(seg_BL > 0, axis=-1)
  k_B = jnp.clip(jnp.ceil(ratio * n_B - 1e-6).astype(jnp.int32), 1, n_B)
  z_BL, masked_BL = subset_masks(rng, tokens_BL, seg_BL, k_B)
  nll_BL = _nll(logits_fn, z_BL, k_B / jnp.maximum(n_B, 1), tokens_BL)
  return jnp.sum(jnp.where(masked_BL, nll_BL, 0.0)), jnp.sum(masked_BL)


def subs_logits(logits_BLV: jax.Array) -> jax.Array:
  """SUBS, first half: the denoiser never predicts [MASK] (its logit is -inf). The second half,
  copying unmasked tokens through, is what the loss (masked positions only) and the samplers
  (they change masked positions only) do."""
  return logits_BLV.astype(jnp.float32).at[..., MASK_ID].set(-jnp.inf)


def denoise(
  model: nn.Module, params, z_BL, positions_BL, seg_BL, t_B, deterministic=True, rngs=None
) -> jax.Array:
  """Logits of p(x | z_t) with SUBS; the time goes in only if the model is time-conditioned."""
  time_B = t_B if model.cfg.time_conditioning else None
  logits_BLV, _ = model.apply(
    {"params": params},
    z_BL,
    positions_BL,
    seg_BL,
    deterministic=deterministic,
    time_B=time_B,
    rngs=rngs or {},
  )
  return subs_logits(logits_BLV)


def nelbo_sum(
  logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
  rng: jax.Array,
  tokens_BL: jax.Array,
  seg_BL: jax.Array,
  schedule: Schedule,
) -> jax.Array:
  """One Monte Carlo draw of the NELBO summed over the batch, in nats: a time per row
  (antithetic), the forward process's masks, then w(t) * -log p(x_l | z_t) over the masked
  positions. `logits_fn(z_BL, t_B)` is the denoiser's logits; SUBS is applied here."""
  r_time, r_mask = jax.random.split(rng)
  t_B = antithetic_times(r_time, tokens_BL.shape[0])
  z_BL, masked_BL = corrupt(r_mask, tokens_BL, seg_BL, schedule.alpha(t_B))
  nll_BL = _nll(logits_fn, z_BL, t_B, tokens_BL)
  w_BL = jnp.where(masked_BL, schedule.weight(t_B)[:, None], 0.0)
  return jnp.sum(jnp.where(masked_BL, nll_BL, 0.0) * w_BL)


def nelbo_sum_count(
  logits_fn: Callable[[jax.Array, jax.Array], jax.Array],
  rng: jax.Array,
  tokens_BL: jax.Array,
  seg_BL: jax.Array,
) -> jax.Array:
  """One draw of the same NELBO with the time integrated out (time-independent denoisers only).

  Under the forward process a row's mask, given that k of its n tokens are masked, is a
  uniform k-subset whatever t is, and for every schedule
  integral_0^1 w(t) P(k masked | t) dt = 1/k (for log-linear, C(n, k) B(k, n - k + 1) = 1/k;
  other schedules change variables to alpha). So the NELBO is exactly
  E_{k ~ U{1..n}} [ n/k * sum over a random k-subset of -log p(x_l | z) ]: each row's loss is
  the mean cross-entropy of its masked tokens times n, with none of the 1/t spikes of small t.
  `logits_fn(z_BL, t_B)` gets t = k/n, which a time-independent denoiser ignores."""
  z_BL, masked_BL, k_B = count_masks(rng, tokens_BL, seg_BL)
  n_B = jnp.sum(seg_BL > 0, axis=-1)
  nll_BL = _nll(logits_fn, z_BL, k_B / jnp.maximum(n_B, 1), tokens_BL)
  w_B = n_B / jnp.maximum(k_B, 1)
  return jnp.sum(jnp.where(masked_BL, nll_BL, 0.0) * w_B[:, None])


# ---- samplers


def time_grid(steps: int, grid: str, schedule: Schedule) -> np.ndarray:
  """steps + 1 times from 1 down to 0. `uniform`: equal steps in t; `alpha`: equal steps in
  alpha(t), so every step unmasks the same expected number of tokens (the same grid for the
  log-linear schedule)."""
  if steps < 1:
    raise ValueError(f"--steps={steps}: must be >= 1")
  ts = np.linspace(1.0, 0.0, steps + 1)
  if grid == "uniform":
    return ts
  if grid == "alpha":  # invert alpha numerically on a fine grid (alpha decreases in t)
    fine = np.linspace(0.0, 1.0, 100_001)
    alphas = np.asarray(schedule.alpha(jnp.asarray(fine)), np.float64)
    targets = 1.0 - ts  # alpha from 0 up to 1
    out = np.interp(targets, alphas[::-1], fine[::-1])
    out[0], out[-1] = 1.0, 0.0  # alpha is flat at the ends in float32
    return out
  raise ValueError(f"--grid={grid!r}: allowed {list(GRIDS)}")


def _sample_tokens(rng, logits_BLV, temperature: float, top_p: float) -> jax.Array:
  b, n, v = logits_BLV.shape
  return choose_tokens(logits_BLV.reshape(b * n, v), rng, temperature, 0, top_p).reshape(b, n)


def _one_document(z_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions, segment ids) of rows that are each one document from position 0."""
  b, n = z_BL.shape
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)), jnp.ones_like(z_BL)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_p", "use_cache"))
def _ancestral(model, params, z_BL, alphas_N, ts_N, rng, *, temperature, top_p, use_cache):
  b, n = z_BL.shape
  pos_BL, seg_BL = _one_document(z_BL)
  steps = alphas_N.shape[0] - 1

  def net(z, t):
    return denoise(model, params, z, pos_BL, seg_BL, jnp.full((b,), t, jnp.float32))

  def body(i, carry):
    z, logits, cache_valid, nfe = carry
    a_t, a_s = alphas_N[i], alphas_N[i + 1]
    r_unmask, r_tok = jax.random.split(jax.random.fold_in(rng, i))
    p_unmask = jnp.where(a_t >= 1.0, 1.0, (a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-12))
    unmask = (z == MASK_ID) & (jax.random.uniform(r_unmask, z.shape) < p_unmask)
    if not use_cache:  # the baseline: the network at every step
      logits, nfe, cache_valid = net(z, ts_N[i]), nfe + 1, jnp.bool_(True)

    def reveal(logits, nfe):
      logits, nfe = jax.lax.cond(
        cache_valid, lambda: (logits, nfe), lambda: (net(z, ts_N[i]), nfe + 1)
      )
      return jnp.where(unmask, _sample_tokens(r_tok, logits, temperature, top_p), z), logits, nfe

    revealed = jnp.any(unmask)  # the network is needed only when a token is revealed
    z, logits, nfe = jax.lax.cond(revealed, reveal, lambda lg, k: (z, lg, k), logits, nfe)
    # a time-independent denoiser's output stays valid while z does not change
    return z, logits, cache_valid & ~revealed, nfe

  logits0 = jnp.zeros((b, n, model.cfg.vocab_size), jnp.float32)
  z_BL, _, _, nfe = jax.lax.fori_loop(0, steps, body, (z_BL, logits0, jnp.bool_(False), 0))
  return z_BL, nfe


def ancestral_sample(
  model: nn.Module,
  params,
  z_BL: np.ndarray,
  rng: jax.Array,
  schedule: Schedule,
  steps: int,
  grid: str = "uniform",
  temperature: float = 1.0,
  top_p: float = 1.0,
  use_cache: bool = True,
) -> tuple[np.ndarray, int]:
  """MDLM's ancestral sampler: (tokens [B, L], network calls).

  From t to s < t each masked token is revealed with probability
  (alpha(s) - alpha(t)) / (1 - alpha(t)), drawn from the denoiser's distribution (top-p
  optional); at s = 0 every remaining mask is revealed. Tokens given in `z_BL` (not
  [MASK]) are clamped: only masked positions ever change. Which tokens a step reveals
  does not depend on the network, so with `use_cache` the network runs only at steps that
  reveal a token and only if a token changed since its last run (a time-independent
  denoiser then gives the same output): at most one call per generated token, however
  many steps. Without the cache (and always for a time-conditioned model) it runs at every
  step. Both draw the same tokens from the same rng.
  """
  ts = time_grid(steps, grid, schedule)
  alphas = np.array(schedule.alpha(jnp.asarray(ts, jnp.float32)))
  alphas[-1] = 1.0
  use_cache = bool(use_cache and not model.cfg.time_conditioning)
  out, nfe = _ancestral(
    model,
    params,
    jnp.asarray(z_BL, jnp.int32),
    jnp.asarray(alphas, jnp.float32),
    jnp.asarray(ts, jnp.float32),
    rng,
    temperature=float(temperature),
    top_p=float(top_p),
    use_cache=use_cache,
  )
  return np.asarray(out), int(nfe)


def transfer_counts(masked: int, steps: int) -> np.ndarray:
  """How many tokens each of `steps` steps reveals so that `masked` are revealed in all:
  as even as possible, the earlier steps taking the remainder (LLaDA)."""
  counts = np.full(steps, masked // steps, np.int32)
  counts[: masked % steps] += 1
  return counts


def select_confident(confidence_BL: jax.Array, k_B: jax.Array) -> jax.Array:
  """[B, L] bool: the k most confident positions of each row (-inf never counts)."""
  rank_BL = jnp.argsort(jnp.argsort(-confidence_BL, axis=-1), axis=-1)
  return (rank_BL < k_B[:, None]) & jnp.isfinite(confidence_BL)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_p", "remasking"))
def _llada(
  model, params, z_BL, block_BL, counts_BN, block_of_step_N, rng, *, temperature, top_p, remasking
):
  pos_BL, seg_BL = _one_document(z_BL)

  def body(i, z):
    r_tok, r_conf = jax.random.split(jax.random.fold_in(rng, i))
    t_B = jnp.mean((z == MASK_ID).astype(jnp.float32), axis=-1)
    logits = denoise(model, params, z, pos_BL, seg_BL, t_B)
    x0 = _sample_tokens(r_tok, logits, temperature, top_p)
    if remasking == "low_confidence":  # the probability of the chosen token
      probs = jax.nn.softmax(logits, axis=-1)
      conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:  # random remasking
      conf = jax.random.uniform(r_conf, z.shape)
    active = (z == MASK_ID) & (block_BL == block_of_step_N[i])
    conf = jnp.where(active, conf, -jnp.inf)
    reveal = select_confident(conf, counts_BN[:, i])
    return jnp.where(reveal, x0, z)

  return jax.lax.fori_loop(0, counts_BN.shape[1], body, z_BL)


def llada_sample(
  model: nn.Module,
  params,
  z_BL: np.ndarray,
  rng: jax.Array,
  steps: int,
  block_length: int = 0,
  temperature: float = 0.0,
  top_p: float = 1.0,
  remasking: str = "low_confidence",
) -> tuple[np.ndarray, int]:
  """LLaDA's sampler with remasking: (tokens [B, L], network calls = steps).

  The span from the first to the last [MASK] is cut into blocks of `block_length` (0: one
  block; it must divide the span), generated left to right (semi-autoregressive); each block gets steps / blocks
  steps. Each step predicts every masked token, then keeps the predictions of the
  `counts[i]` masked positions of the current block with the highest confidence
  (`low_confidence` remasking: the least confident are masked again) or random ones
  (`random`), and remasks the rest. Given tokens never change. Every row must have its
  masks at the same positions (one prompt layout per batch).
  """
  z_BL = np.asarray(z_BL, np.int32)
  masked = z_BL == MASK_ID
  if not masked.any():
    return z_BL, 0
  if not (masked == masked[:1]).all():
    raise ValueError("llada_sample: every row must have its [MASK] positions in the same places")
  if remasking not in REMASKING:
    raise ValueError(f"--remasking={remasking!r}: allowed {list(REMASKING)}")
  where = np.flatnonzero(masked[0])
  start, stop = int(where[0]), int(where[-1]) + 1
  span = stop - start
  block_length = block_length or span
  if block_length < 1 or span % block_length:
    raise ValueError(
      f"--block_length={block_length}: must divide the {span} generated positions (0: one block)"
    )
  num_blocks = span // block_length
  if steps < 1 or steps % num_blocks:
    raise ValueError(
      f"--steps={steps}: must be a positive multiple of the {num_blocks} blocks of --block_length="
      f"{block_length} over the {stop - start} generated positions"
    )
  per_block = steps // num_blocks
  block_L = np.full(z_BL.shape[1], -1, np.int32)
  block_L[start:stop] = (np.arange(stop - start) // block_length).astype(np.int32)
  counts, block_of_step = [], []
  for j in range(num_blocks):
    n = int((masked[0] & (block_L == j)).sum())
    counts.append(transfer_counts(n, per_block))
    block_of_step += [j] * per_block
  counts_BN = np.broadcast_to(np.concatenate(counts), (z_BL.shape[0], steps))
  out = _llada(
    model,
    params,
    jnp.asarray(z_BL),
    jnp.asarray(np.broadcast_to(block_L, z_BL.shape)),
    jnp.asarray(counts_BN),
    jnp.asarray(block_of_step, jnp.int32),
    rng,
    temperature=float(temperature),
    top_p=float(top_p),
    remasking=remasking,
  )
  return np.asarray(out), steps


def complete(
  model: nn.Module,
  params,
  tokenizer,
  prompt: str,
  num_tokens: int,
  rng: jax.Array,
  *,
  schedule: Schedule,
  steps: int = 0,
  sampler: str = "ancestral",
  temperature: float = 1.0,
  top_p: float = 1.0,
  block_length: int = 0,
  grid: str = "uniform",
  cache: bool = True,
  suffix: str = "",
  remasking: str = "low_confidence",
) -> tuple[str, int]:
  """Text in, text out: (prompt + the generated span + suffix, network calls).

  `num_tokens` masks sit between the prompt and the (optional) suffix, both clamped, so a
  suffix makes this infilling. `steps` 0 means one step per generated token. The span is
  cut at its first EOS. The whole sequence must fit the model's context.
  """
  pre, post = tokenizer.encode(prompt), tokenizer.encode(suffix)
  total = pre.size + num_tokens + post.size
  if num_tokens < 1 or total > model.cfg.max_len:
    raise ValueError(
      f"prompt ({pre.size} tokens) + --num_tokens={num_tokens} + suffix ({post.size} tokens) "
      f"= {total}: a diffusion model generates 1 to {model.cfg.max_len} (its context) in all"
    )
  z_1L = np.concatenate([pre, np.full(num_tokens, MASK_ID), post]).astype(np.int32)[None]
  steps = steps or num_tokens
  if sampler == "ancestral":
    out, nfe = ancestral_sample(
      model, params, z_1L, rng, schedule, steps, grid, temperature, top_p, cache
    )
  elif sampler == "llada":
    out, nfe = llada_sample(
      model, params, z_1L, rng, steps, block_length, temperature, top_p, remasking
    )
  else:
    raise ValueError(f"--sampler={sampler!r}: allowed {list(SAMPLERS)}")
  span = out[0, pre.size : pre.size + num_tokens]
  end = np.flatnonzero(span == EOS_ID)
  if end.size:
    span = span[: end[0]]
  return prompt + tokenizer.decode(span) + suffix, nfe
