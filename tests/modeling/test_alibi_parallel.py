"""BLOOM's ALiBi and embedding LayerNorm, PaLM's parallel block (configs/bloom.py,
configs/palm.py): ALiBi's slopes against the paper's own recursion, the bias against a
float64 loop, whole tiny models against a float64 NumPy forward pass (packed rows, causal
and bidirectional, MHA and MQA), and cached decoding against recomputation."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modeling.transformer import (
  Transformer,
  TransformerConfig,
  alibi_bias,
  alibi_slopes,
  init_cache,
)
from tests.modeling.test_encoder import _dense, _mlp, _norm, _rope
from tests.tiny_models import random_params, tiny

# Two rows of 12: one document, and two packed documents plus padding (segment 0).
SEG_BL = np.array([[1] * 12, [1] * 5 + [2] * 4 + [0] * 3], np.int32)
POS_BL = np.array([list(range(12)), [*range(5), *range(4), 0, 0, 0]], np.int32)


def paper_slopes(n: int) -> list[float]:
  """The ALiBi paper's `get_slopes` (Press et al. 2022, appendix), in float64: a power of two
  gets start, start^2, ... with start = 2^(-2^-(log2 n - 3)); otherwise the closest lower
  power of two's slopes, then every other slope of twice that many heads."""

  def power_of_2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]

  if math.log2(n).is_integer():
    return power_of_2(n)
  closest = 2 ** math.floor(math.log2(n))
  return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12, 16, 112])
def test_alibi_slopes_follow_the_papers_recursion(heads):
  np.testing.assert_allclose(alibi_slopes(heads), paper_slopes(heads), rtol=1e-12)


def test_alibi_slopes_by_hand():
  """8 heads: 1/2 ... 1/256 (the paper's example); 6: four of 1/4^i, then 1/2 and 1/8."""
  np.testing.assert_array_equal(alibi_slopes(8), 2.0 ** -np.arange(1, 9))
  np.testing.assert_array_equal(alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])


@pytest.mark.parametrize("heads", [6, 8])
def test_alibi_bias_is_minus_slope_times_distance_on_packed_rows(heads):
  got = np.asarray(alibi_bias(heads, jnp.asarray(POS_BL), jnp.asarray(POS_BL)))
  want = np.zeros((2, heads, 12, 12))
  for b, h, i, j in np.ndindex(want.shape):
    want[b, h, i, j] = -paper_slopes(heads)[h] * abs(int(POS_BL[b, j]) - int(POS_BL[b, i]))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


# --- whole tiny models against a float64 forward pass ---------------------------------------


def _attention(x_BLD, p, cfg: TransformerConfig, pos_BL, seg_BL):
  """Causal or bidirectional, GQA by repeating kv heads, RoPE or ALiBi, within segments."""
  q_BLHK, k_BLGK, v_BLGK = (_dense(x_BLD, p[n]) for n in ("query", "key", "value"))
  if cfg.position == "rope":
    q_BLHK, k_BLGK = _rope(q_BLHK, pos_BL, cfg.rope.theta), _rope(k_BLGK, pos_BL, cfg.rope.theta)
  kv_head = np.arange(cfg.num_heads) // (cfg.num_heads // cfg.num_kv_heads)
  k_BLHK, v_BLHK = k_BLGK[:, :, kv_head], v_BLGK[:, :, kv_head]
  scores_BHLS = np.einsum("blhk,bshk->bhls", q_BLHK, k_BLHK) / np.sqrt(cfg.head_dim)
  rel_BLS = pos_BL[:, None, :] - pos_BL[:, :, None]  # key position - query position
  if cfg.position == "alibi":
    slopes_H = np.asarray(paper_slopes(cfg.num_heads))
    scores_BHLS = scores_BHLS - slopes_H[None, :, None, None] * np.abs(rel_BLS)[:, None]
  ok_BLS = seg_BL[:, :, None] == seg_BL[:, None, :]
  if cfg.mask_kind == "causal":
    ok_BLS &= rel_BLS <= 0
  scores_BHLS = np.where(ok_BLS[:, None], scores_BHLS, -np.inf)
  probs_BHLS = np.exp(scores_BHLS - scores_BHLS.max(-1, keepdims=True))
  probs_BHLS /= probs_BHLS.sum(-1, keepdims=True)
  return _dense(np.einsum("bhls,bshk->blhk", probs_BHLS, v_BLHK), p["out"], contract=2)


def reference_logits(cfg: TransformerConfig, params, tokens_BL, pos_BL, seg_BL):
  """A pre-norm decoder's logits in float64: the embedding (then BLOOM's LayerNorm), blocks
  serial (x + attn(n1(x)), then + mlp(n2(.))) or parallel (x + attn(n(x)) + mlp(n(x))),
  the final norm and the tied head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  norm = functools.partial(_norm, kind=cfg.norm, eps=cfg.norm_eps)
  x = p["embed"]["embedding"][tokens_BL]
  if cfg.embed_norm:
    x = norm(x, p["embed_norm"])
  for i in range(cfg.num_layers):
    b = p[f"block_{i}"]
    h = norm(x, b["attn_norm"])
    if cfg.block == "parallel":
      x = x + _attention(h, b["attn"], cfg, pos_BL, seg_BL) + _mlp(h, b["mlp"], cfg.mlp)
    else:
      x = x + _attention(h, b["attn"], cfg, pos_BL, seg_BL)
      x = x + _mlp(norm(x, b["mlp_norm"]), b["mlp"], cfg.mlp)
  return norm(x, p["final_norm"]) @ p["embed"]["embedding"].T


MODELS = {
  # six heads of 8: ALiBi's slopes for a non-power of two inside the model
  "bloom-6-heads": ("bloom", dict(num_heads=6, num_kv_heads=6, head_dim=8)),
  "bloom-bidirectional": ("bloom", dict(mask_kind="bidirectional")),
  "palm": ("palm", {}),
}


@functools.cache
def model(name: str) -> TransformerConfig:
  preset, overrides = MODELS[name]
  return tiny(preset, scan_layers=False, **overrides)


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_a_float64_numpy_reference(name):
  cfg = model(name)
  want_block = "parallel" if name == "palm" else "serial"
  assert (cfg.block, cfg.embed_norm) == (want_block, name != "palm")
  params = random_params(cfg, seed=2)
  assert ("mlp_norm" in params["block_0"]) == (cfg.block == "serial")  # PaLM: one norm
  tokens_BL = np.random.default_rng(2).integers(0, cfg.vocab_size, POS_BL.shape).astype(np.int32)
  got, _ = jax.jit(Transformer(cfg).apply)({"params": params}, tokens_BL, POS_BL, SEG_BL)
  want = reference_logits(cfg, params, tokens_BL, POS_BL, SEG_BL)
  real = SEG_BL > 0  # padding rows attend among themselves; nothing reads them
  assert want[real].std() > 0.5
  np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-4, atol=1e-4)


# --- the KV cache ---------------------------------------------------------------------------


def test_cached_prefill_and_steps_equal_full_forward():
  """PaLM's parallel block with ALiBi in place of RoPE and BLOOM's embedding norm: the bias
  from the cache's key positions, over MQA's one cached head. A prefill of 5 and 7 single
  steps equal the uncached forward pass."""
  max_len, b, length, p = 16, 2, 12, 5
  cfg = tiny("palm", seq_len=max_len, position="alibi", embed_norm=True, scan_layers=True)
  params = random_params(cfg, seed=3)
  tokens_BL = jnp.asarray(np.random.default_rng(3).integers(8, cfg.vocab_size, (b, length)))
  pos_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
  ones_BL = jnp.ones_like(tokens_BL)
  apply = jax.jit(lambda t, pos, seg, c: Transformer(cfg).apply({"params": params}, t, pos, seg, c))
  full_BLV, _ = apply(tokens_BL, pos_BL, ones_BL, None)
  cache = init_cache(cfg, b, max_len)  # longer than used: the unwritten tail stays unseen
  out, cache = apply(tokens_BL[:, :p], pos_BL[:, :p], ones_BL[:, :p], cache)
  steps = [out]
  for t in range(p, length):
    out, cache = apply(tokens_BL[:, t : t + 1], pos_BL[:, t : t + 1], ones_BL[:, t : t + 1], cache)
    steps.append(out)
  assert (cfg.block, cfg.num_kv_heads, cache["k"].shape[3]) == ("parallel", 1, 1)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BLV, rtol=1e-5, atol=1e-5)
