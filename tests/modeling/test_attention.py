"""Attention: masks, RoPE, GQA/MQA against a float64 NumPy reference, and what the
full model may and may not see (causality, packing, sliding windows) via gradients."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modeling.attention import Attention, apply_rope, attend, make_mask, write_cache
from modeling.layers import Embed
from modeling.rope import Rope
from modeling.transformer import Transformer, TransformerConfig, init_cache
from tests.tiny_models import VOCAB, draw_params, random_params, tiny

# Two rows of 10: one whole document, and a packed row of two documents plus padding
# (segment 0, positions 0 as the pipeline writes them).
SEG_BL = np.array([[1] * 10, [1, 1, 1, 1, 2, 2, 2, 0, 0, 0]], np.int32)
POS_BL = np.array([list(range(10)), [0, 1, 2, 3, 0, 1, 2, 0, 0, 0]], np.int32)


def mask_reference(q_pos, kv_pos, q_seg, kv_seg, kind, window):
  """[B, 1, L, S] by explicit loops, from the definition of each mask."""
  b, length = q_pos.shape
  s = kv_pos.shape[1]
  out = np.zeros((b, 1, length, s), bool)
  for n, i, j in itertools.product(range(b), range(length), range(s)):
    ok = q_seg[n, i] == kv_seg[n, j]
    if kind == "causal":
      ok &= kv_pos[n, j] <= q_pos[n, i]
    if window:
      ok &= abs(int(q_pos[n, i]) - int(kv_pos[n, j])) < window
    out[n, 0, i, j] = ok
  return out


def attend_reference(q_BLHK, k_BSGK, v_BSGK, mask_B1LS):
  """Float64 softmax attention; query head h reads kv head h // (H // G)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q_BLHK, k_BSGK, v_BSGK))
  h, g = q.shape[2], k.shape[2]
  kv_head = np.arange(h) // (h // g)
  k_BSHK, v_BSHK = k[:, :, kv_head], v[:, :, kv_head]
  scores_BHLS = np.einsum("blhk,bshk->bhls", q, k_BSHK) / np.sqrt(q.shape[-1])
  scores_BHLS = np.where(mask_B1LS, scores_BHLS, -np.inf)
  probs = np.exp(scores_BHLS - scores_BHLS.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhls,bshk->blhk", probs, v_BSHK)


# --- masks -------------------------------------------------------------------------------


def test_make_mask_packed_example_by_hand():
  # Document A (2 tokens), document B (3 tokens), one padding token.
  seg = jnp.array([[1, 1, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 0, 1, 2, 0]])
  causal = np.array(
    [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],
    ],
    bool,
  )
  bidirectional = np.array(
    [
      [1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],
    ],
    bool,
  )
  causal_window2 = np.array(
    [
      [1, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 0, 1, 1, 0],  # position 2 no longer sees position 0
      [0, 0, 0, 0, 0, 1],
    ],
    bool,
  )
  bidirectional_window2 = np.array(
    [
      [1, 1, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0],
      [0, 0, 1, 1, 0, 0],
      [0, 0, 1, 1, 1, 0],
      [0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1],
    ],
    bool,
  )
  cases = [
    ("causal", 0, causal),
    ("bidirectional", 0, bidirectional),
    ("causal", 2, causal_window2),
    ("bidirectional", 2, bidirectional_window2),
  ]
  for kind, window, expected in cases:
    mask = make_mask(pos, pos, seg, seg, kind, window)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask[0, 0], expected, err_msg=f"{kind}, window={window}")


def test_make_mask_rejects_unknown_kind():
  pos = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="prefix_lm"):
    make_mask(pos, pos, pos, pos, "prefix_lm")


# --- attend vs a float64 reference -------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize(
  "num_heads,num_kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"]
)
def test_attend_matches_float64_reference(kind, window, num_heads, num_kv_heads):
  k_dim = 8
  rng = np.random.default_rng(window + num_kv_heads)
  b, length = SEG_BL.shape
  q_BLHK = rng.normal(size=(b, length, num_heads, k_dim)).astype(np.float32)
  k_BSGK = rng.normal(size=(b, length, num_kv_heads, k_dim)).astype(np.float32)
  v_BSGK = rng.normal(size=(b, length, num_kv_heads, k_dim)).astype(np.float32)

  mask = make_mask(
    jnp.array(POS_BL), jnp.array(POS_BL), jnp.array(SEG_BL), jnp.array(SEG_BL), kind, window
  )
  expected_mask = mask_reference(POS_BL, POS_BL, SEG_BL, SEG_BL, kind, window)
  np.testing.assert_array_equal(mask, expected_mask)

  out_BLHK = attend(jnp.array(q_BLHK), jnp.array(k_BSGK), jnp.array(v_BSGK), mask)
  assert out_BLHK.shape == (b, length, num_heads, k_dim) and out_BLHK.dtype == jnp.float32
  np.testing.assert_allclose(
    out_BLHK, attend_reference(q_BLHK, k_BSGK, v_BSGK, expected_mask), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("blocks", [2, 4])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_block_causal_attend_matches_float64_reference(blocks, window, num_kv_heads):
  """Skipping the upper triangle by query blocks changes nothing, packed rows included."""
  rng = np.random.default_rng(blocks + window)
  b, length, h, k_dim = 2, 32, 4, 8
  seg_BL = np.stack([np.repeat([1, 2, 3, 0], [9, 12, 7, 4]), np.ones(length, int)]).astype(np.int32)
  pos_BL = np.stack([np.concatenate([np.arange(n) for n in (9, 12, 7, 4)]), np.arange(length)])
  q_BLHK = rng.normal(size=(b, length, h, k_dim)).astype(np.float32)
  k_BSGK = rng.normal(size=(b, length, num_kv_heads, k_dim)).astype(np.float32)
  v_BSGK = rng.normal(size=(b, length, num_kv_heads, k_dim)).astype(np.float32)
  mask = make_mask(*map(jnp.array, (pos_BL, pos_BL, seg_BL, seg_BL)), "causal", window)
  out_BLHK = attend(*map(jnp.array, (q_BLHK, k_BSGK, v_BSGK)), mask, causal_blocks=blocks)
  expected = attend_reference(
    q_BLHK, k_BSGK, v_BSGK, mask_reference(pos_BL, pos_BL, seg_BL, seg_BL, "causal", window)
  )
  np.testing.assert_allclose(out_BLHK, expected, rtol=1e-5, atol=1e-5)


def test_block_causal_attend_rejects_uneven_blocks():
  x = jnp.zeros((1, 10, 2, 4))
  with pytest.raises(ValueError, match="causal_blocks"):
    attend(x, x, x, jnp.ones((1, 1, 10, 10), bool), causal_blocks=3)


def test_attend_rejects_unknown_impl():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match="attention_impl"):
    attend(x, x, x, jnp.ones((1, 1, 2, 2), bool), impl="splash2")


def test_write_cache_scatters_rows_at_their_positions():
  cache_BSGK = jnp.zeros((2, 6, 1, 2))
  new_BLGK = jnp.arange(1, 9, dtype=jnp.float32).reshape(2, 2, 1, 2)
  pos_BL = jnp.array([[1, 2], [4, 5]])
  out = np.asarray(write_cache(cache_BSGK, new_BLGK, pos_BL))
  expected = np.zeros((2, 6, 1, 2), np.float32)
  expected[0, 1:3] = np.asarray(new_BLGK[0])
  expected[1, 4:6] = np.asarray(new_BLGK[1])
  np.testing.assert_array_equal(out, expected)


def test_attention_module_with_cache_matches_without():
  """Prefill 5 tokens into the cache, then 3 more: same outputs as one uncached call."""
  module = Attention(num_heads=4, num_kv_heads=2, head_dim=8, rope=Rope())
  x_BLD = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 16)), jnp.float32)
  pos_BL = jnp.broadcast_to(jnp.arange(8), (2, 8))
  seg_BL = jnp.ones((2, 8), jnp.int32)
  params = draw_params(jax.eval_shape(module.init, jax.random.key(0), x_BLD, pos_BL, seg_BL))
  apply = jax.jit(module.apply)
  full_BLD, none_cache = apply(params, x_BLD, pos_BL, seg_BL)
  assert none_cache is None

  cache = {"k": jnp.zeros((2, 10, 2, 8)), "v": jnp.zeros((2, 10, 2, 8))}
  first_BLD, cache = apply(params, x_BLD[:, :5], pos_BL[:, :5], seg_BL[:, :5], cache)
  rest_BLD, cache = apply(params, x_BLD[:, 5:], pos_BL[:, 5:], seg_BL[:, 5:], cache)
  np.testing.assert_allclose(jnp.concatenate([first_BLD, rest_BLD], 1), full_BLD, atol=1e-6)
  # The cache holds keys for the 8 positions written and zeros after them.
  assert np.all(np.asarray(cache["k"][:, :8]) != 0) and np.all(np.asarray(cache["k"][:, 8:]) == 0)


# --- RoPE -----------------------------------------------------------------------------------


def _rope_vec(x_K: np.ndarray, pos: int) -> np.ndarray:
  return np.asarray(apply_rope(jnp.asarray(x_K)[None, None, None], jnp.array([[pos]])))[0, 0, 0]


def test_rope_matches_complex_rotation_reference():
  """Rotate-half layout: (x_i, x_{i+K/2}) is the complex number rotated by pos * theta^(-i/(K/2))."""
  k_dim, theta = 16, 10000.0
  rng = np.random.default_rng(0)
  x_BLHK = rng.normal(size=(2, 5, 3, k_dim)).astype(np.float32)
  pos_BL = np.array([[0, 1, 2, 7, 30], [3, 0, 11, 4, 2]])
  half = k_dim // 2
  freq = theta ** (-np.arange(half, dtype=np.float64) / half)
  z = x_BLHK[..., :half].astype(np.float64) + 1j * x_BLHK[..., half:]
  z = z * np.exp(1j * pos_BL[:, :, None, None] * freq)
  expected = np.concatenate([z.real, z.imag], axis=-1)
  out = apply_rope(jnp.asarray(x_BLHK), jnp.asarray(pos_BL), theta)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rope_dot_product_depends_only_on_relative_position():
  """<rope(q, m), rope(k, n)> = Re(sum_i zq_i conj(zk_i) e^(i (m - n) f_i)): a function of m - n."""
  k_dim = 32
  rng = np.random.default_rng(1)
  q_K, k_K = rng.normal(size=(2, k_dim)).astype(np.float32)
  half = k_dim // 2
  freq = 10000.0 ** (-np.arange(half) / half)
  zq, zk = q_K[:half] + 1j * q_K[half:], k_K[:half] + 1j * k_K[half:]
  for shift in (-5, 0, 1, 3, 17):
    dots = [_rope_vec(q_K, n + shift) @ _rope_vec(k_K, n) for n in (0, 4, 9, 40)]
    expected = np.real(np.sum(zq * np.conj(zk) * np.exp(1j * shift * freq)))
    np.testing.assert_allclose(dots, expected, rtol=1e-4, atol=1e-4, err_msg=f"shift {shift}")
  assert abs(_rope_vec(q_K, 3) @ _rope_vec(k_K, 0) - q_K @ k_K) > 1e-2  # and it is not constant


def test_rope_preserves_norm_and_is_identity_at_zero():
  rng = np.random.default_rng(2)
  x_BLHK = rng.normal(size=(2, 6, 2, 16)).astype(np.float32)
  pos_BL = jnp.array([[0, 1, 5, 9, 100, 1000], [0, 0, 2, 3, 4, 5]])
  out = np.asarray(apply_rope(jnp.asarray(x_BLHK), pos_BL))
  np.testing.assert_allclose(
    np.linalg.norm(out, axis=-1), np.linalg.norm(x_BLHK, axis=-1), rtol=1e-5
  )
  at_zero = np.asarray(pos_BL) == 0
  np.testing.assert_allclose(out[at_zero], x_BLHK[at_zero], rtol=0, atol=0)
  assert not np.allclose(out[~at_zero], x_BLHK[~at_zero])


def test_rope_keeps_bfloat16():
  x = jnp.ones((1, 2, 1, 8), jnp.bfloat16)
  assert apply_rope(x, jnp.array([[0, 3]])).dtype == jnp.bfloat16


# --- what the full model sees: gradients with respect to the input embeddings -------------


def input_sensitivity(cfg: TransformerConfig, pos_L: np.ndarray, seg_L: np.ndarray) -> np.ndarray:
  """[L_out, L_in]: the norm of d(logits at i . w)/d(embedding at j), for one row.

  The embedding output is replaced by a free input through `nn.intercept_methods`, so
  the derivative is with respect to everything the model knows about token j.
  """
  params = random_params(cfg)
  length = len(pos_L)
  rng = np.random.default_rng(3)
  tokens_BL = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, length)))
  w_V = jnp.asarray(rng.standard_normal(cfg.vocab_size), jnp.float32)
  model = Transformer(cfg)

  def f(x_LD):
    def use_x(next_fun, args, kwargs, context):
      if isinstance(context.module, Embed) and context.method_name == "__call__":
        return x_LD[None]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(use_x):
      logits_BLV, _ = model.apply({"params": params}, tokens_BL, pos_L[None], seg_L[None])
    return logits_BLV[0] @ w_V

  x_LD = jnp.asarray(rng.standard_normal((length, cfg.d_model)), jnp.float32)
  jac_LLD = jax.jit(jax.jacfwd(f))(x_LD)
  return np.linalg.norm(np.asarray(jac_LLD, np.float64), axis=-1)


@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_causal_model_never_sees_the_future(preset):
  length = 10
  sens = input_sensitivity(tiny(preset), np.arange(length), np.ones(length, np.int32))
  future = np.triu(np.ones((length, length), bool), k=1)
  assert np.all(sens[future] == 0.0), "an output depends on a later input"
  assert np.all(sens[~future] > 1e-6), "an output ignores an earlier (or its own) input"


def test_bidirectional_model_sees_its_segment_both_ways_and_nothing_else():
  seg_L = np.array([1, 1, 1, 1, 2, 2, 2, 0, 0])
  pos_L = np.array([0, 1, 2, 3, 0, 1, 2, 0, 0])
  sens = input_sensitivity(tiny("llama", mask_kind="bidirectional"), pos_L, seg_L)
  same_segment = seg_L[:, None] == seg_L[None, :]
  assert np.all(sens[~same_segment] == 0.0), "attention leaks across packed segments"
  assert np.all(sens[same_segment] > 1e-6)
  assert np.all(sens[np.triu(same_segment, k=1)] > 1e-6), "no dependence on later tokens"


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window_limits_the_receptive_field(num_layers):
  """Each layer reaches window - 1 positions back, so L layers reach L * (window - 1)."""
  length, window = 12, 3
  cfg = tiny("llama", num_layers=num_layers, sliding_window=window)
  sens = input_sensitivity(cfg, np.arange(length), np.ones(length, np.int32))
  reach = num_layers * (window - 1)
  i, j = np.indices((length, length))
  visible = (j <= i) & (i - j <= reach)
  assert np.all(sens[~visible] == 0.0), "an output depends on a token beyond the window"
  assert np.all(sens[visible] > 1e-6)


# --- packed documents do not interact --------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt", "llama"])  # learned positions, RoPE
def test_packed_documents_are_isolated(preset):
  cfg = tiny(preset)
  assert cfg.position == {"gpt": "learned", "llama": "rope"}[preset]
  params = random_params(cfg)
  apply = jax.jit(lambda t, p, s: Transformer(cfg).apply({"params": params}, t, p, s)[0])

  n1, n2, length = 6, 7, 16  # two documents and 3 padding tokens
  seg_BL = jnp.array([[1] * n1 + [2] * n2 + [0] * (length - n1 - n2)])
  pos_BL = jnp.array([list(range(n1)) + list(range(n2)) + [0] * (length - n1 - n2)])
  doc1, doc2 = np.s_[:, :n1], np.s_[:, n1 : n1 + n2]
  rng = np.random.default_rng(0)
  tokens = rng.integers(8, VOCAB, size=(1, length))
  other2 = tokens.copy()
  other2[doc2] = rng.integers(8, VOCAB, size=(1, n2))
  other1 = tokens.copy()
  other1[doc1] = rng.integers(8, VOCAB, size=(1, n1))

  base_BLV = np.asarray(apply(jnp.asarray(tokens), pos_BL, seg_BL))
  new2_BLV = np.asarray(apply(jnp.asarray(other2), pos_BL, seg_BL))
  new1_BLV = np.asarray(apply(jnp.asarray(other1), pos_BL, seg_BL))
  np.testing.assert_allclose(new2_BLV[doc1], base_BLV[doc1], rtol=0, atol=1e-6)
  np.testing.assert_allclose(new1_BLV[doc2], base_BLV[doc2], rtol=0, atol=1e-6)
  assert np.abs(new2_BLV[doc2] - base_BLV[doc2]).max() > 1e-3  # the edit did change something
  assert np.abs(new1_BLV[doc1] - base_BLV[doc1]).max() > 1e-3

  # Document 2 packed after document 1 reads exactly as document 2 alone at a row start.
  alone = np.zeros((1, length), np.int64)
  alone[:, :n2] = tokens[doc2]
  alone_BLV = np.asarray(
    apply(jnp.asarray(alone), jnp.arange(length)[None], jnp.array([[1] * n2 + [0] * (length - n2)]))
  )
  np.testing.assert_allclose(base_BLV[doc2], alone_BLV[:, :n2], rtol=0, atol=1e-5)


def test_init_cache_shape_and_dtype():
  cfg = tiny("llama", dtype="bfloat16")
  cache = init_cache(cfg, batch=3, length=11)
  for a in cache.values():
    assert a.shape == (cfg.num_layers, 3, 11, cfg.num_kv_heads, cfg.head_dim)
    assert a.dtype == jnp.bfloat16 and not np.any(np.asarray(a, np.float32))
