"""Multi-head latent attention (modeling/mla.py) and YaRN (modeling/rope.py): a float64 NumPy
reference of the expanded form, the absorbed cached form against it, 32 cached decode steps
against recomputation, the cache's shape and bytes, and YaRN against its formula."""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import mla_cache
from configs import base, llama, t5
from modeling.flops import matmul_params
from modeling.lora import Lora
from modeling.mla import LatentAttention, Mla
from modeling.quant import make_dot_general
from modeling.rope import Rope
from modeling.transformer import Transformer, init_cache
from tests.modeling.test_attention import POS_BL, SEG_BL, mask_reference
from tests.tiny_models import VOCAB, abstract_init, draw_params, tiny
from train.validation import validate_config

SIZES = Mla(q_lora_rank=6, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
YARN = Rope(scaling="yarn", factor=40.0, original_max_len=8, mscale=1.0, mscale_all_dim=1.0)
V3_YARN = dict(factor=40.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0)


# --- float64 references ---------------------------------------------------------------------


def yarn_inv_freq_reference(dim, theta, factor, original, beta_fast, beta_slow):
  """DeepSeek-V3's YaRN frequencies in float64: the dim index that turns b times within the
  original context is d(b) = dim ln(L / (2 pi b)) / (2 ln theta); a linear ramp from
  floor d(beta_fast) (ramp 0: extrapolate, keep theta_i) to ceil d(beta_slow) (ramp 1:
  interpolate, theta_i / factor)."""
  theta_i = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  d_of = lambda b: dim * math.log(original / (2 * math.pi * b)) / (2 * math.log(theta))  # noqa: E731
  low, high = max(math.floor(d_of(beta_fast)), 0), min(math.ceil(d_of(beta_slow)), dim - 1)
  ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
  return theta_i / factor * ramp + theta_i * (1 - ramp)


def mscale_reference(factor, m):
  return 0.1 * m * np.log(factor) + 1.0


def rope_reference(x_BLHP, pos_BL, inv_F, scale=1.0):
  """Rotate-half: (x_i, x_{i + P/2}) is the complex number turned by pos * inv_i."""
  half = inv_F.shape[0]
  z = x_BLHP[..., :half] + 1j * x_BLHP[..., half:]
  z = z * np.exp(1j * pos_BL[:, :, None, None] * inv_F) * scale
  return np.concatenate([z.real, z.imag], axis=-1)


def rms_reference(x, scale, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def mla_reference(p, x_BLD, pos_BL, seg_BL, m: Mla, rope: Rope, kind, window, eps):
  """The expanded form in float64, from the equations of DeepSeek-V2 section 2.1."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x_BLD, np.float64)
  n, r = m.qk_nope_head_dim, m.kv_lora_rank
  if m.q_lora_rank:
    cq = rms_reference(x @ p["q_a"]["kernel"], p["q_norm"]["scale"], eps)
    q_BLHK = np.einsum("blq,qhk->blhk", cq, p["q_b"]["kernel"])
  else:
    q_BLHK = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"])
  kv = x @ p["kv_a"]["kernel"]
  c_BLR = rms_reference(kv[..., :r], p["kv_norm"]["scale"], eps)
  if rope.scaling == "yarn":
    inv = yarn_inv_freq_reference(
      m.qk_rope_head_dim,
      rope.theta,
      rope.factor,
      rope.original_max_len,
      rope.beta_fast,
      rope.beta_slow,
    )
    cos_sin = mscale_reference(rope.factor, rope.mscale) / mscale_reference(
      rope.factor, rope.mscale_all_dim
    )
    softmax = mscale_reference(rope.factor, rope.mscale_all_dim) ** 2
  else:
    dim = m.qk_rope_head_dim
    inv, cos_sin, softmax = rope.theta ** -(np.arange(0, dim, 2) / dim), 1.0, 1.0
  k_rope_BL1P = rope_reference(kv[:, :, None, r:], pos_BL, inv, cos_sin)
  q_rope_BLHP = rope_reference(q_BLHK[..., n:], pos_BL, inv, cos_sin)
  kv_BLHX = np.einsum("blr,rhx->blhx", c_BLR, p["kv_b"]["kernel"])
  h = q_BLHK.shape[2]
  k_BLHK = np.concatenate([kv_BLHX[..., :n], np.repeat(k_rope_BL1P, h, axis=2)], axis=-1)
  q_BLHK = np.concatenate([q_BLHK[..., :n], q_rope_BLHP], axis=-1)
  scores = np.einsum("blhk,bshk->bhls", q_BLHK, k_BLHK) * softmax / np.sqrt(q_BLHK.shape[-1])
  mask = mask_reference(pos_BL, pos_BL, seg_BL, seg_BL, kind, window)
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o_BLHV = np.einsum("bhls,bshv->blhv", probs, kv_BLHX[..., n:])
  return np.einsum("blhv,hvd->bld", o_BLHV, p["out"]["kernel"])


def _module_inputs(module, b=2, length=10, d=16, seed=1):
  x_BLD = jnp.asarray(np.random.default_rng(seed).standard_normal((b, length, d)), jnp.float32)
  pos_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
  seg_BL = jnp.ones((b, length), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x_BLD, pos_BL, seg_BL)
  return x_BLD, pos_BL, seg_BL, abstract


# --- the module -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "q_lora_rank, kind, window, rope",
  [(0, "causal", 0, Rope()), (6, "causal", 3, YARN), (6, "bidirectional", 0, Rope())],
)
def test_latent_attention_matches_float64_reference(q_lora_rank, kind, window, rope):
  """Packed rows (two documents and padding), with and without the query latent, a sliding
  window, and YaRN (frequencies, cos/sin factor and the softmax's mscale^2)."""
  m = dataclasses.replace(SIZES, q_lora_rank=q_lora_rank)
  module = LatentAttention(
    num_heads=3, num_kv_heads=3, head_dim=0, mask_kind=kind, window=window, rope=rope, mla=m
  )
  x_BLD, _, _, abstract = _module_inputs(module)
  params = draw_params(abstract)
  pos_BL, seg_BL = jnp.asarray(POS_BL), jnp.asarray(SEG_BL)
  out_BLD, cache = jax.jit(module.apply)(params, x_BLD, pos_BL, seg_BL)
  assert cache is None
  expected = mla_reference(params["params"], x_BLD, POS_BL, SEG_BL, m, rope, kind, window, 1e-6)
  np.testing.assert_allclose(out_BLD, expected, rtol=1e-5, atol=1e-5)


def _adapters(params, seed=3):
  """Nonzero LoRA B matrices, so the adapters change every adapted projection."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key != "lora_b":
      return leaf
    return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("variant", ["lora", "bitnet"])
def test_cached_call_equals_the_uncached_one(variant):
  """All 10 tokens written into a 12-position latent cache in one call: the absorbed form
  with LoRA on q_b and kv_b (folded into W_UKV), and BitNet's expanded form over the cached
  latents, give the uncached output; the cache holds [c_KV ; RoPE(k_rope)] at the written
  positions only."""
  extra = dict(lora=Lora(rank=2, alpha=4.0, targets="(q_b|kv_b)$"))
  if variant == "bitnet":
    extra = dict(dot_general=make_dot_general("bitnet158"), absorb=False)
  module = LatentAttention(num_heads=3, num_kv_heads=3, head_dim=0, rope=YARN, mla=SIZES, **extra)
  x_BLD, pos_BL, seg_BL, abstract = _module_inputs(module)
  params = _adapters(draw_params(abstract))
  if variant == "lora":
    assert "lora_a" in params["params"]["kv_b"] and "lora_a" in params["params"]["q_b"]
  full_BLD, _ = jax.jit(module.apply)(params, x_BLD, pos_BL, seg_BL)
  cache = {"c_kv": jnp.zeros((2, 12, SIZES.cache_width))}
  cached_BLD, cache = jax.jit(module.apply)(params, x_BLD, pos_BL, seg_BL, cache)
  np.testing.assert_allclose(cached_BLD, full_BLD, atol=1e-5)
  assert np.all(np.asarray(cache["c_kv"][:, :10]) != 0)
  assert np.all(np.asarray(cache["c_kv"][:, 10:]) == 0)


@pytest.fixture(scope="module")
def mla_model():
  cfg = tiny("llama", seq_len=48, attention="mla", mla=SIZES, num_heads=4)
  cfg = dataclasses.replace(cfg, rope=dataclasses.replace(YARN, original_max_len=16))
  return Transformer(cfg), draw_params(abstract_init(cfg))


def test_32_cached_decode_steps_equal_recomputation(mla_model):
  """Prefill 8 tokens, then decode 32 one at a time (absorbed form, float32): every step's
  logits equal a full forward pass over the whole sequence within 1e-5. The cache is exactly
  {"c_kv": [layers, B, T, kv_lora_rank + qk_rope_head_dim]}."""
  model, params = mla_model
  cfg, b, prompt, steps = model.cfg, 2, 8, 32
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (b, prompt + steps)))
  pos_BT = jnp.broadcast_to(jnp.arange(prompt + steps), tokens_BT.shape)
  full_BTV, _ = jax.jit(model.apply)({"params": params}, tokens_BT, pos_BT, jnp.ones_like(pos_BT))

  @jax.jit
  def decode(params, tokens_BT, pos_BT):
    cache = init_cache(cfg, b, prompt + steps)
    ones = jnp.ones_like(tokens_BT)
    first_BPV, cache = model.apply(
      {"params": params}, tokens_BT[:, :prompt], pos_BT[:, :prompt], ones[:, :prompt], cache
    )

    def step(cache, t):
      tok_B1 = jax.lax.dynamic_slice_in_dim(tokens_BT, t, 1, axis=1)
      pos_B1 = jax.lax.dynamic_slice_in_dim(pos_BT, t, 1, axis=1)
      logits_B1V, cache = model.apply({"params": params}, tok_B1, pos_B1, ones[:, :1], cache)
      return cache, logits_B1V[:, 0]

    cache, rest_NBV = jax.lax.scan(step, cache, jnp.arange(prompt, prompt + steps))
    return jnp.concatenate([first_BPV, rest_NBV.transpose(1, 0, 2)], axis=1), cache

  cached_BTV, cache = decode(params, tokens_BT, pos_BT)
  assert jax.tree.map(jnp.shape, cache) == {
    "c_kv": (cfg.num_layers, b, prompt + steps, SIZES.kv_lora_rank + SIZES.qk_rope_head_dim)
  }
  assert np.abs(np.asarray(cached_BTV - full_BTV)).max() <= 1e-5


def test_init_cache_holds_the_latent_in_the_compute_dtype():
  cfg = tiny("llama", attention="mla", mla=SIZES, dtype="bfloat16")
  cache = init_cache(cfg, 3, 7)
  assert list(cache) == ["c_kv"]
  assert cache["c_kv"].shape == (cfg.num_layers, 3, 7, 14) and cache["c_kv"].dtype == jnp.bfloat16


def test_cache_bytes_per_token_by_formula_and_from_a_compiled_decode_step():
  """DeepSeek-V3's shape: 61 x (512 + 64) x 2 bytes = 70,272 by formula (its compile, in
  bench.mla_cache, gives the same); a tiny model's compiled decode step takes exactly the
  formula's bytes per cached position beside its params and tokens."""
  assert mla_cache.formula_bytes_per_token(mla_cache.DEEPSEEK_V3) == 70_272
  cfg = tiny("llama", attention="mla", mla=SIZES, dtype="bfloat16", scan_layers=True)
  expected = cfg.num_layers * SIZES.cache_width * 2
  assert mla_cache.formula_bytes_per_token(cfg) == expected
  assert mla_cache.compiled_bytes_per_token(cfg, length=16, batch=2) == expected


def test_flops_count_mla_projections_and_every_param_has_axis_rules():
  """matmul_params counts exactly the kernels the model holds (the embedding is a lookup);
  every MLA parameter names logical axes that config.logical_axis_rules maps."""
  cfg = tiny("llama", attention="mla", mla=SIZES, num_heads=4)
  boxed = abstract_init(cfg)
  kernels = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
    if path[-1].key == "kernel"
  ]
  assert matmul_params(cfg) == sum(k.size for k in kernels)
  rules = dict(base.get_config().logical_axis_rules)
  boxes = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for box in boxes:
    assert len(box.names) == box.value.ndim and set(box.names) - {None} <= set(rules), box


# --- YaRN -----------------------------------------------------------------------------------


def test_yarn_frequencies_and_mscale_match_deepseek_v3_formula():
  """factor 40, original 4096, beta_fast 32, beta_slow 1, mscale = mscale_all_dim = 1 on 64
  rotary dims: the frequencies equal the float64 formula, the fast dims (more than 32 turns
  within 4096 positions) keep theta_i, the slow ones (under 1 turn) are divided by 40; cos and
  sin are unscaled (mscale / mscale_all_dim = 1) and the softmax scale gains
  (0.1 ln 40 + 1)^2."""
  rope = Rope(scaling="yarn", mscale=1.0, mscale_all_dim=1.0, **V3_YARN)
  inv_F, long_F = rope.inv_freqs(64)
  assert long_F is None and inv_F.dtype == np.float32
  expected = yarn_inv_freq_reference(64, 10000.0, 40.0, 4096, 32.0, 1.0)
  np.testing.assert_allclose(inv_F, expected, rtol=1e-6)
  theta_i = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  turns = 4096 * theta_i / (2 * np.pi)
  np.testing.assert_allclose(inv_F[turns > 32], theta_i[turns > 32], rtol=1e-6)
  np.testing.assert_allclose(inv_F[turns < 1], theta_i[turns < 1] / 40, rtol=1e-6)
  assert (turns > 32).sum() > 0 and (turns < 1).sum() > 0
  assert rope.cos_sin_scale == 1.0
  np.testing.assert_allclose(rope.softmax_scale, mscale_reference(40.0, 1.0) ** 2, rtol=1e-12)
  np.testing.assert_allclose(rope.softmax_scale, 1.8738542, rtol=1e-7)


def test_yarn_cos_sin_factor_without_mscale_all_dim():
  """Plain YaRN (no mscale_all_dim): cos and sin scale by 0.1 ln(factor) + 1, so a rotated
  vector's norm grows by it, and MLA's softmax is unchanged."""
  rope = Rope(scaling="yarn", factor=16.0, original_max_len=64)
  assert rope.softmax_scale == 1.0
  np.testing.assert_allclose(rope.cos_sin_scale, mscale_reference(16.0, 1.0), rtol=1e-12)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 2, 8)), jnp.float32)
  out = rope(x, jnp.array([[0, 5, 900]]))
  np.testing.assert_allclose(
    np.linalg.norm(out, axis=-1), rope.cos_sin_scale * np.linalg.norm(x, axis=-1), rtol=1e-5
  )


# --- validation -----------------------------------------------------------------------------


def _mla_config(**changes):
  c = llama.get_config("size=tiny")
  c.model.attention = "mla"
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    c[section][name] = value
  return c


def test_mla_with_yarn_validates_and_builds_its_sizes():
  c = _mla_config(**{"model.rope_scaling.type": "yarn", "model.rope_scaling.original_max_len": 64})
  c.model.rope_scaling.update(factor=4.0, mscale_all_dim=1.0)
  cfg = validate_config(c).transformer_config(c, VOCAB)
  assert cfg.attention == "mla" and cfg.mla == Mla(**c.model.mla)
  assert cfg.rope.scaling == "yarn" and cfg.rope.mscale_all_dim == 1.0


@pytest.mark.parametrize(
  "changes, pattern",
  [
    ({"model.position": "learned"}, r"model\.position='learned': must be 'rope'"),
    ({"model.rope_fraction": 0.5}, r"model\.rope_fraction=0\.5: must be 1\.0"),
    ({"model.attention_impl": "splash"}, r"model\.attention_impl='splash': must be 'xla'"),
    ({"model.scale_attention": False}, r"model\.scale_attention=False: must be True"),
    ({"model.lora.rank": 4, "model.lora.base_quant": "nf4"}, r"base_quant='nf4': must be 'none'"),
    ({"model.mla.qk_rope_head_dim": 5}, r"qk_rope_head_dim=5: must be even"),
    ({"model.mla.kv_lora_rank": 0}, r"model\.mla\.kv_lora_rank=0: must be > 0"),
    ({"model.mla.q_lora_rank": -1}, r"model\.mla\.q_lora_rank=-1: must be >= 0"),
    ({"model.attention": "gqa"}, r"model\.attention='gqa': allowed \['mha', 'mla'\]"),
    (
      {"model.rope_scaling.type": "yarn", "model.rope_scaling.original_max_len": 0},
      r"original_max_len=0: must be > 0 with type='yarn'",
    ),
    (
      {
        "model.rope_scaling.type": "yarn",
        "model.rope_scaling.original_max_len": 64,
        "model.rope_scaling.beta_slow": 40.0,
      },
      r"beta_fast=32\.0: must be >= beta_slow=40\.0 > 0",
    ),
    (
      {
        "model.rope_scaling.type": "yarn",
        "model.rope_scaling.original_max_len": 64,
        "model.rope_scaling.attention_factor": 2.0,
      },
      r"attention_factor=2\.0: must be 1\.0 with type='yarn'",
    ),
    (
      {"model.attention": "mha", "model.rope_scaling.mscale_all_dim": 1.0},
      r"mscale_all_dim=1\.0: must be 0 unless model\.attention='mla'",
    ),
  ],
)
def test_mla_and_yarn_config_errors_name_the_key(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    validate_config(_mla_config(**changes))


def test_mla_is_refused_on_the_encoder_decoder():
  c = t5.get_config("size=tiny")
  c.model.position, c.model.attention = "rope", "mla"
  with pytest.raises(ValueError, match=r"model\.attention='mla': not supported with .*'encdec'"):
    validate_config(c)


def test_gguf_export_refuses_mla():
  """llama.cpp's bitnet graph computes multi-head attention only."""
  from configs import bitnet
  from eval import gguf_export

  c = bitnet.get_config("size=tiny")
  c.model.attention = "mla"
  with pytest.raises(ValueError, match=r"model\.attention='mla': llama\.cpp's bitnet"):
    gguf_export.check_exportable(c)
