"""BitLinear (modeling/quant.py): the quantizers against float64 NumPy references of their
formulas, the straight-through gradients, the quantized matmul, the packed codes, and which
layers of a `model.quant` transformer are quantized."""

from __future__ import annotations

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from modeling import quant
from modeling.transformer import Transformer
from tests.tiny_models import abstract_init, random_params, tiny

EPS = 1e-5
SHAPES = [(7,), (16, 24), (3, 5, 8), (64, 4, 16)]
KINDS = ["bitnet158", "bitnet1"]


# ---- float64 references of the formulas ---------------------------------------------------


def ref_ternary(w):
  w = np.asarray(w, np.float64)
  scale = max(np.mean(np.abs(w)), EPS)
  return np.clip(np.round(w / scale), -1, 1), scale


def ref_binary(w):
  w = np.asarray(w, np.float64)
  scale = max(np.mean(np.abs(w)), EPS)
  return np.where(w - np.mean(w) >= 0, 1.0, -1.0), scale


REF_WEIGHT = {"bitnet158": ref_ternary, "bitnet1": ref_binary}


def ref_absmax(x, axes):
  x = np.asarray(x, np.float64)
  scale = np.maximum(np.max(np.abs(x), axis=axes, keepdims=True), EPS) / 127.0
  return np.clip(np.round(x / scale), -128, 127), scale


def near_half(r, tol=1e-4):
  """Where float32 and float64 may round differently: within tol of a .5 boundary."""
  return np.abs(np.abs(r) % 1 - 0.5) < tol


def normal(shape, seed=0, std=1.0):
  return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---- quantizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_ternary_matches_absmean_formula(shape):
  w = normal(shape, seed=len(shape), std=0.1)
  wq, scale = quant.ternary(jnp.asarray(w))
  ref_wq, ref_scale = ref_ternary(w)
  assert np.shape(scale) == () and wq.shape == w.shape
  np.testing.assert_allclose(float(scale), ref_scale, rtol=1e-6)
  ok = ~near_half(w.astype(np.float64) / ref_scale)
  assert ok.mean() > 0.99
  np.testing.assert_array_equal(np.asarray(wq)[ok], ref_wq[ok])
  assert set(np.unique(np.asarray(wq))) <= {-1.0, 0.0, 1.0}
  if w.size > 20:  # a normal tensor uses all three values
    assert set(np.unique(np.asarray(wq))) == {-1.0, 0.0, 1.0}


@pytest.mark.parametrize("shape", SHAPES)
def test_binary_matches_sign_around_the_mean(shape):
  w = normal(shape, seed=len(shape), std=0.1) + 0.03  # a non-zero mean
  wq, scale = quant.binary(jnp.asarray(w))
  ref_wq, ref_scale = ref_binary(w)
  np.testing.assert_allclose(float(scale), ref_scale, rtol=1e-6)
  ok = np.abs(w - w.astype(np.float64).mean()) > 1e-6
  np.testing.assert_array_equal(np.asarray(wq)[ok], ref_wq[ok])
  assert wq.dtype == w.dtype and set(np.unique(np.asarray(wq))) == {-1.0, 1.0}


def test_binary_maps_the_mean_itself_to_plus_one():
  w = jnp.array([1.0, -1.0, 0.0, 2.0, -2.0])  # mean 0: the third weight sits on it
  wq, scale = quant.binary(w)
  np.testing.assert_array_equal(wq, [1.0, -1.0, 1.0, 1.0, -1.0])
  assert float(scale) == pytest.approx(1.2)


@pytest.mark.parametrize(
  "shape, axes",
  [
    ((2, 5, 16), (2,)),  # [B, L, D]: per token over the model dim
    ((3, 24), (1,)),
    ((2, 5, 4, 8), (2, 3)),  # [B, L, H, K]: the output projection contracts (heads, head_dim)
  ],
)
def test_absmax_int8_per_token(shape, axes):
  x = normal(shape, seed=1)
  x[0, 0] *= 50  # one loud token must not change the others' scales
  xq, scale = quant.absmax_int8(jnp.asarray(x), axes)
  ref_xq, ref_scale = ref_absmax(x, axes)
  assert scale.shape == ref_scale.shape  # one scale per token (kept dims)
  np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
  ok = ~near_half(x.astype(np.float64) / ref_scale)
  assert ok.mean() > 0.99
  np.testing.assert_array_equal(np.asarray(xq)[ok], ref_xq[ok])
  xq = np.asarray(xq)
  assert np.all(xq == np.round(xq)) and xq.min() >= -128 and xq.max() <= 127
  # every token's largest magnitude maps to 127
  np.testing.assert_array_equal(np.max(np.abs(xq), axis=axes), 127.0)


def test_zero_tensors_give_no_nan():
  z = jnp.zeros((4, 6))
  wq, scale = quant.ternary(z)
  np.testing.assert_array_equal(wq, 0.0)
  assert float(scale) == pytest.approx(EPS)
  wq, scale = quant.binary(z)
  np.testing.assert_array_equal(wq, 1.0)  # +1 at 0
  assert float(scale) == pytest.approx(EPS)
  xq, scale = quant.absmax_int8(z, (1,))
  np.testing.assert_array_equal(xq, 0.0)
  np.testing.assert_allclose(scale, EPS / 127, rtol=1e-6)
  for kind in KINDS:
    out = quant.quantize_weight(kind, z)
    assert np.all(np.isfinite(out))
    g = jax.grad(lambda w, kind=kind: jnp.sum(quant.quantize_weight(kind, w)))(z)
    np.testing.assert_array_equal(g, 1.0)
  np.testing.assert_array_equal(quant.quantize_activation(z, (1,)), 0.0)
  g = jax.grad(lambda x: jnp.sum(quant.quantize_activation(x, (1,))))(z)
  np.testing.assert_array_equal(g, 1.0)


# ---- straight-through estimator -----------------------------------------------------------


def test_ste_forward_is_q_exactly_and_backward_is_identity():
  x, q = jnp.asarray(normal((5, 7), 0)), jnp.asarray(normal((5, 7), 1))
  np.testing.assert_array_equal(quant.ste(x, q), q)
  c = jnp.asarray(normal((5, 7), 2))
  g = jax.grad(lambda x: jnp.sum(c * quant.ste(x, jnp.round(3 * x) ** 2)))(x)
  np.testing.assert_array_equal(g, c)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_weight_is_dequantized_forward_with_identity_gradient(kind):
  w = jnp.asarray(normal((16, 12), 3, std=0.1))
  c = jnp.asarray(normal((16, 12), 4))
  wq, scale = REF_WEIGHT[kind](np.asarray(w))
  np.testing.assert_allclose(quant.quantize_weight(kind, w), wq * scale, rtol=1e-6)
  g = jax.grad(lambda w: jnp.sum(c * quant.quantize_weight(kind, w)))(w)
  np.testing.assert_array_equal(g, c)


@pytest.mark.parametrize("shape, axes", [((2, 5, 16), (2,)), ((2, 5, 4, 8), (2, 3))])
def test_quantize_activation_is_dequantized_forward_with_identity_gradient(shape, axes):
  x = jnp.asarray(normal(shape, 5))
  c = jnp.asarray(normal(shape, 6))
  xq, scale = ref_absmax(np.asarray(x), axes)
  np.testing.assert_allclose(quant.quantize_activation(x, axes), xq * scale, rtol=1e-6, atol=1e-7)
  g = jax.grad(lambda x: jnp.sum(c * quant.quantize_activation(x, axes)))(x)
  np.testing.assert_array_equal(g, c)


# ---- the quantized matmul -----------------------------------------------------------------

DOTS = {  # lhs shape, rhs shape, dimension numbers (as modeling.layers.Dense passes them)
  "dense": ((2, 5, 16), (16, 12), (((2,), (0,)), ((), ()))),
  "out_proj": ((2, 5, 4, 8), (4, 8, 16), (((2, 3), (0, 1)), ((), ()))),
}


def ref_bit_dot(x, w, dims, kind):
  (lc, rc), _ = dims
  xq, sx = ref_absmax(x, lc)
  wq, sw = REF_WEIGHT[kind](w)
  return np.tensordot(xq * sx, wq * sw, axes=(lc, rc))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(DOTS))
def test_bit_dot_general_matches_float64_reference(kind, case):
  lhs_shape, rhs_shape, dims = DOTS[case]
  x, w = normal(lhs_shape, 7), normal(rhs_shape, 8, std=0.1)
  out = jax.jit(quant.make_dot_general(kind), static_argnums=2)(x, w, dims)
  ref = ref_bit_dot(x, w, dims, kind)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Quantization matters at this tolerance: the float matmul is far from it.
  (lc, rc), _ = dims
  assert np.max(np.abs(np.tensordot(x, w, axes=(lc, rc)) - ref)) > 1e-3
  # deployed: the kernel is taken as already dequantized, not quantized again
  xq, sx = ref_absmax(x, lc)
  deployed = quant.make_dot_general(kind, deployed=True)
  np.testing.assert_allclose(
    deployed(x, w, dims), np.tensordot(xq * sx, w, axes=(lc, rc)), rtol=1e-5, atol=1e-5
  )
  wq, sw = REF_WEIGHT[kind](w)
  w_deq = (wq * sw).astype(np.float32)
  np.testing.assert_allclose(deployed(x, w_deq, dims), ref, rtol=1e-5, atol=1e-5)


def test_make_dot_general_none_and_unknown():
  assert quant.make_dot_general("none") is lax.dot_general
  assert quant.make_dot_general("none", deployed=True) is lax.dot_general
  with pytest.raises(ValueError, match=r"model\.quant='foo'.*bitnet158"):
    quant.make_dot_general("foo")


# ---- packed codes -------------------------------------------------------------------------

SIZES = [1, 7, 13, 1001]  # none a multiple of 4, 5 or 8


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base3", [False, True], ids=["2bit", "base3"])
def test_pack_ternary_round_trip(n, base3):
  wq = np.random.default_rng(n).integers(-1, 2, n).astype(np.float32)
  packed = quant.pack_ternary(wq, base3)
  assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n / (5 if base3 else 4)),)
  out = quant.unpack_ternary(packed, n, base3)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, wq)
  if base3:
    assert packed.max() < 3**5


@pytest.mark.parametrize("n", SIZES)
def test_pack_binary_round_trip(n):
  wq = np.random.default_rng(n).choice([-1.0, 1.0], n).astype(np.float32)
  packed = quant.pack_binary(wq)
  assert packed.dtype == np.uint8 and packed.shape == (math.ceil(n / 8),)
  out = quant.unpack_binary(packed, n)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, wq)


def test_pack_flattens_a_matrix_row_major():
  rng = np.random.default_rng(0)
  t = rng.integers(-1, 2, (3, 7)).astype(np.float32)
  b = rng.choice([-1.0, 1.0], (3, 7)).astype(np.float32)
  for base3 in (False, True):
    out = quant.unpack_ternary(quant.pack_ternary(t, base3), t.size, base3)
    np.testing.assert_array_equal(out.reshape(t.shape), t)
  np.testing.assert_array_equal(quant.unpack_binary(quant.pack_binary(b), b.size).reshape(3, 7), b)


# ---- a quantized transformer --------------------------------------------------------------

MODEL_CASES = [(p, k) for p in ("gpt", "llama") for k in KINDS]
PROJECTIONS = {"gpt": 6, "llama": 7}  # q, k, v, out, up, (gate,) down per block


def flat(tree):
  return flax.traverse_util.flatten_dict(nn.unbox(tree))


def tokens(cfg, seed=0, length=8):
  tok = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size - 1, (2, length)))
  pos = jnp.broadcast_to(jnp.arange(length), tok.shape)
  return tok, pos, jnp.ones_like(tok)


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
@pytest.mark.parametrize("preset, kind", MODEL_CASES)
def test_quant_params_are_fp_params_plus_sub_norms(preset, kind, scan):
  fp = tiny(preset, scan_layers=scan)
  q = dataclasses.replace(fp, quant=kind)
  fp_flat, q_flat = flat(abstract_init(fp)), flat(abstract_init(q))
  assert {k: v.shape for k, v in fp_flat.items()} == {
    k: v.shape for k, v in q_flat.items() if k in fp_flat
  }
  blocks = ["blocks"] if scan else [f"block_{i}" for i in range(fp.num_layers)]
  names = ["scale", "bias"] if fp.norm == "layernorm" and fp.use_bias else ["scale"]
  lead = (fp.num_layers,) if scan else ()
  width = {"attn": fp.num_heads * fp.head_dim, "mlp": fp.d_ff}
  expected = {
    (b, part, "sub_norm", n): (*lead, width[part])
    for b in blocks
    for part in ("attn", "mlp")
    for n in names
  }
  extra = {k: v.shape for k, v in q_flat.items() if k not in fp_flat}
  assert extra == expected


@pytest.mark.parametrize("preset, kind", MODEL_CASES)
def test_exactly_the_block_projections_go_through_bit_dot_general(preset, kind, monkeypatch):
  cfg = tiny(preset, quant=kind)
  params = random_params(cfg)  # (its init runs before the spy)
  calls = []
  original = quant.bit_dot_general

  def spy(lhs, rhs, dims, *args, **kwargs):
    calls.append((tuple(rhs.shape), kwargs["kind"], kwargs["deployed"]))
    return original(lhs, rhs, dims, *args, **kwargs)

  monkeypatch.setattr(quant, "bit_dot_general", spy)
  jax.eval_shape(lambda p: Transformer(cfg).apply({"params": p}, *tokens(cfg)), params)
  assert len(calls) == PROJECTIONS[preset] * cfg.num_layers
  assert {(k, d) for _, k, d in calls} == {(kind, False)}
  # every kernel but the LM head's (llama's untied head; gpt's head is the tied embedding)
  kernels = [v.shape for k, v in flat(params).items() if k[-1] == "kernel" and k[0] != "head"]
  assert (("head", "kernel") in flat(params)) == (preset == "llama")
  assert sorted(s for s, _, _ in calls) == sorted(kernels)
  # a packed model (quant_deployed) sends the same projections through, as deployed
  calls.clear()
  deployed = dataclasses.replace(cfg, quant_deployed=True)
  jax.eval_shape(lambda p: Transformer(deployed).apply({"params": p}, *tokens(cfg)), params)
  assert sorted(s for s, _, _ in calls) == sorted(kernels)
  assert {(k, d) for _, k, d in calls} == {(kind, True)}


@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_lm_head_and_embeddings_stay_full_precision(preset):
  """Changing one entry of the (untied head or tied embedding) matrix of a vocabulary entry
  absent from the input changes that entry's logits only: a quantized head would rescale
  every logit (the absmean scale moves)."""
  cfg = tiny(preset, quant="bitnet158")
  params = random_params(cfg)
  tok, pos, seg = tokens(cfg)
  v = cfg.vocab_size - 1  # not in the input
  apply = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tok, pos, seg)[0])
  if cfg.tie_embeddings:
    table = params["embed"]["embedding"]
    changed = dict(params, embed={"embedding": table.at[v, 3].add(0.5)})
  else:
    kernel = params["head"]["kernel"]
    changed = dict(params, head={**params["head"], "kernel": kernel.at[3, v].add(0.5)})
  a, b = np.asarray(apply(params)), np.asarray(apply(changed))
  np.testing.assert_array_equal(a[..., :v], b[..., :v])
  assert np.all(a[..., v] != b[..., v])


@pytest.mark.parametrize("preset, kind", [("gpt", "bitnet158"), ("llama", "bitnet1")])
def test_gradients_reach_every_parameter(preset, kind):
  cfg = tiny(preset, quant=kind)
  params = random_params(cfg)
  tok, pos, seg = tokens(cfg)
  c = jnp.asarray(normal((*tok.shape, cfg.vocab_size), 9))

  def loss(p):
    return jnp.sum(c * Transformer(cfg).apply({"params": p}, tok, pos, seg)[0])

  grads = flat(jax.jit(jax.grad(loss))(params))
  assert any(k[-1] == "kernel" and "attn" in k for k in grads)
  for path, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.any(g != 0), path


# ---- conversion: the blend from float to quantized (train.quant_warmup_steps) --------------


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_warmup_mix_follows_its_formula_from_exactly_0_to_exactly_1(shape):
  steps = 8
  s = np.arange(0, 12)
  t = np.minimum(s / steps, 1.0)
  ref = t if shape == "linear" else (1 - np.cos(np.pi * t)) / 2
  out = np.asarray(jax.jit(jax.vmap(lambda i: quant.warmup_mix(i, steps, shape)))(s))
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  assert out[0] == 0.0 and np.all(out[steps:] == 1.0) and np.all(np.diff(out) >= 0)
  assert float(quant.warmup_mix(0, 0, shape)) == 1.0  # no warmup: quantized from the start
  with pytest.raises(ValueError, match=r"train\.quant_warmup_shape='exp'"):
    quant.warmup_mix(0, steps, "exp")


def test_blended_bit_dot_general_matches_float64_reference():
  """x + mix (q(x) - x) and w + mix (q(w) - w) at an intermediate mix, against float64; the
  gradients are the blended matmul's with straight-through quantizers; mix 0 is the float
  matmul and mix 1 BitLinear, bit for bit."""
  lhs_shape, rhs_shape, dims = DOTS["out_proj"]
  (lc, rc), _ = dims
  x, w, c = normal(lhs_shape, 7), normal(rhs_shape, 8, std=0.1), normal((2, 5, 16), 9)
  mix = 0.3
  xq, sx = ref_absmax(x, lc)
  wq, sw = ref_ternary(w)
  xb = x + mix * (xq * sx - x.astype(np.float64))
  wb = w + mix * (wq * sw - w.astype(np.float64))
  ref = np.tensordot(xb, wb, axes=(lc, rc))

  def loss(x, w, mix):
    return jnp.sum(c * quant.make_dot_general("bitnet158", mix=mix)(x, w, dims))

  out = jax.jit(lambda x, w, m: quant.make_dot_general("bitnet158", mix=m)(x, w, dims))
  np.testing.assert_allclose(out(x, w, mix), ref, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(ref - ref_bit_dot(x, w, dims, "bitnet158"))) > 1e-2  # the mix matters
  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, mix)
  c64 = c.astype(np.float64)
  np.testing.assert_allclose(gx, np.tensordot(c64, wb, axes=((2,), (2,))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.tensordot(xb, c64, axes=((0, 1), (0, 1))), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out(x, w, 0.0), lax.dot_general(x, w, dims))
  np.testing.assert_array_equal(out(x, w, 1.0), quant.make_dot_general("bitnet158")(x, w, dims))


@pytest.mark.parametrize("preset, scan", [("gpt", False), ("llama", True)])
def test_conversion_starts_as_the_float_model_and_ends_as_the_quantized_one(preset, scan):
  """A quantized model holding a float model's weights (its SubLN norms extra, drawn away
  from 1 so that they would matter) with lambda (`quant/mix`) 0 gives the float model's
  logits bit for bit, and with lambda 1 the plain quantized model's; in between, neither."""
  fcfg = tiny(preset, scan_layers=scan)
  qcfg = dataclasses.replace(fcfg, quant="bitnet158")
  fparams = random_params(fcfg)
  qparams = {**flat(random_params(qcfg)), **flat(fparams)}
  qparams = flax.traverse_util.unflatten_dict(qparams)
  tok, pos, seg = tokens(fcfg, length=16)
  float_logits = jax.jit(lambda p: Transformer(fcfg).apply({"params": p}, tok, pos, seg)[0])
  quant_logits = jax.jit(lambda p: Transformer(qcfg).apply({"params": p}, tok, pos, seg)[0])

  @jax.jit
  def mixed_logits(p, mix):  # one compile for every lambda: it is an input, not a constant
    return Transformer(qcfg).apply({"params": p, "quant": {"mix": mix}}, tok, pos, seg)[0]

  f, q = float_logits(fparams), quant_logits(qparams)
  np.testing.assert_array_equal(mixed_logits(qparams, 0.0), f)
  np.testing.assert_array_equal(mixed_logits(qparams, 1.0), q)
  half = mixed_logits(qparams, 0.5)
  assert np.max(np.abs(half - f)) > 1e-3 and np.max(np.abs(half - q)) > 1e-3
  assert np.max(np.abs(q - f)) > 1e-2
