"""LoRA (modeling/lora.py, layers.Dense): NF4 against the paper's table and a float64 NumPy
reference of blockwise + double quantization, the packed ternary base against quant's codes
and the float-latent BitNet forward, adapters at init, fold, targets, split / merge,
gradients, and quantize_base on the boxed tree the trainer shards."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from modeling import lora, quant
from modeling.layers import Dense
from modeling.transformer import EncoderDecoder, Transformer
from tests.tiny_models import abstract_init, draw_params, tiny

V64 = np.asarray(lora.NF4_VALUES, np.float64)
RANK = 4


def normal(shape, seed=0, std=0.05):
  return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def tokens(cfg, seed=0, length=8):
  tok = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size - 1, (2, length)))
  pos = jnp.broadcast_to(jnp.arange(length), tok.shape)
  return tok, pos, jnp.ones_like(tok)


@functools.cache
def forward(cfg):
  return jax.jit(lambda params, *batch: Transformer(cfg).apply({"params": params}, *batch)[0])


def logits(cfg, params, seed=0):
  return np.asarray(forward(cfg)(params, *tokens(cfg, seed)))


quantize_base = jax.jit(lora.quantize_base, static_argnums=1)


def no_lora(cfg):
  return dataclasses.replace(cfg, lora=lora.Lora())


def lora_model(scan=True, quant_kind="none", targets=lora.Lora.targets):
  return tiny("gpt", scan_layers=scan, quant=quant_kind, lora=lora.Lora(RANK, 8.0, targets))


def params_at_init(cfg, seed=0):
  """Random base values with the adapters as Dense initializes them: A drawn, B zero."""
  params = draw_params(abstract_init(cfg), seed)
  zero_b = lambda path, x: jnp.zeros_like(x) if path[-1].key == "lora_b" else x  # noqa: E731
  return jax.tree_util.tree_map_with_path(zero_b, params)


def with_random_b(params, seed=1):
  rng = np.random.default_rng(seed)
  draw = lambda path, x: (  # noqa: E731
    jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) if path[-1].key == "lora_b" else x
  )
  return jax.tree_util.tree_map_with_path(draw, params)


# ---- NF4 -----------------------------------------------------------------------------------


def test_nf4_values_are_the_papers_normal_quantiles():
  # QLoRA appendix E: 8 positive quantiles and 7 negative ones of N(0, 1), between offset
  # 0.9677083 and 0.5, an exact zero, normalised by the largest.
  offset = 0.9677083
  positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  derived = np.sort(np.concatenate([positive, [0.0], negative]))
  derived /= derived.max()
  assert len(lora.NF4_VALUES) == 16 and lora.NF4_VALUES[7] == 0.0
  np.testing.assert_allclose(V64, derived, atol=1e-6)


def ref_nf4(w):
  """Float64 NumPy blockwise NF4 and double quantization: (codes [n_blocks, 64], int8
  absmax [n_blocks], scales, mean, dequantized kernel, block absmax, ambiguous codes)."""
  flat = np.asarray(w, np.float64).reshape(-1)
  blocks = np.pad(flat, (0, -flat.size % 64)).reshape(-1, 64)
  absmax = np.abs(blocks).max(axis=1)
  x = blocks / np.where(absmax > 0, absmax, 1.0)[:, None]
  codes = np.argmin(np.abs(x[..., None] - V64), axis=-1)
  mids = (V64[1:] + V64[:-1]) / 2
  ambiguous = np.min(np.abs(x[..., None] - mids), axis=-1) < 1e-6  # float32 may round across
  mean = absmax.mean()
  groups = np.pad(absmax - mean, (0, -absmax.size % 256)).reshape(-1, 256)
  scale = np.abs(groups).max(axis=1) / 127
  r = groups / np.where(scale > 0, scale, 1.0)[:, None]  # one block: its absmax is the mean
  q = np.round(r).reshape(-1)[: absmax.size]
  q_ambiguous = (np.abs(np.abs(r) % 1 - 0.5) < 1e-4).reshape(-1)[: absmax.size]
  absmax_deq = q * np.repeat(scale, 256)[: absmax.size] + mean
  deq = (V64[codes] * absmax_deq[:, None]).reshape(-1)[: flat.size].reshape(np.shape(w))
  return codes, q, scale, mean, deq, absmax, ambiguous, q_ambiguous


@pytest.mark.parametrize("shape", [(120, 170), (16, 4, 8), (5, 7)])
def test_nf4_matches_float64_blockwise_double_quantization(shape):
  w = normal(shape, seed=sum(shape))
  w.reshape(-1)[: min(64, w.size)] *= 8  # one block with a much larger absmax
  leaves = jax.jit(lora.nf4_quantize)(jnp.asarray(w))
  codes, q, scale, mean, deq, absmax, ambiguous, q_ambiguous = ref_nf4(w)
  n_blocks = -(-w.size // 64)  # the last block padded
  assert leaves["kernel_nf4"].shape == (n_blocks, 32) and leaves["kernel_nf4"].dtype == jnp.uint8
  assert leaves["kernel_absmax"].shape == (n_blocks,) and leaves["kernel_absmax"].dtype == jnp.int8
  assert leaves["kernel_absmax_scale"].shape == (-(-n_blocks // 256),)
  assert leaves["kernel_absmax_mean"].shape == ()

  packed = np.asarray(leaves["kernel_nf4"])
  got_codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(n_blocks, 64)
  assert ambiguous.mean() < 1e-3 and q_ambiguous.mean() < 1e-2
  np.testing.assert_array_equal(got_codes[~ambiguous], codes[~ambiguous])
  np.testing.assert_array_equal(np.asarray(leaves["kernel_absmax"])[~q_ambiguous], q[~q_ambiguous])
  np.testing.assert_allclose(leaves["kernel_absmax_scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(leaves["kernel_absmax_mean"], mean, rtol=1e-6)

  out = np.asarray(jax.jit(lora.nf4_dequantize, static_argnums=1)(leaves, shape))
  assert out.shape == shape and out.dtype == np.float32
  exact = ~ambiguous.reshape(-1)[: w.size].reshape(shape)
  exact &= ~np.repeat(q_ambiguous, 64)[: w.size].reshape(shape)
  np.testing.assert_allclose(out[exact], deq[exact], rtol=2e-6, atol=1e-9)

  # error: half the widest gap between codes of the block's absmax, plus the absmax's own
  # double-quantization error (at most half its group's scale)
  w_absmax = np.repeat(absmax, 64)[: w.size].reshape(shape)
  absmax_err = np.repeat(scale / 2, 64 * 256)[: w.size].reshape(shape)
  bound = np.diff(V64).max() / 2 * w_absmax + absmax_err
  assert np.all(np.abs(out - w) <= bound * (1 + 1e-5) + 1e-8)
  assert np.sqrt(np.mean((out - w) ** 2)) < 0.12 * np.sqrt(np.mean(w.astype(np.float64) ** 2))


def test_nf4_bits_per_weight_include_every_scale():
  w = jnp.asarray(normal((384, 1536)))
  bits = lora.bits_per_weight(jax.jit(lora.nf4_quantize)(w), w.size)
  print(f"NF4 bits per weight, 384x1536 kernel, scales included: {bits:.4f}")
  # 4 (codes) + 8 / 64 (int8 absmax) + 32 / (64 * 256) (their scales) + 32 / size (the mean)
  assert bits == pytest.approx(4 + 8 / 64 + 36 * 32 / w.size + 32 / w.size)
  assert bits <= 4.2


def test_nf4_dequantizes_to_the_compute_dtype():
  w = jnp.asarray(normal((64, 96)))
  leaves = jax.jit(lora.nf4_quantize)(w)
  dequantize = jax.jit(lora.nf4_dequantize, static_argnums=(1, 2))
  out = dequantize(leaves, (64, 96), jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, dequantize(leaves, (64, 96), jnp.float32).astype(jnp.bfloat16))


# ---- the packed ternary base ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (64, 3), (4, 16, 33)])
def test_ternary_packing_is_quants_codes_and_round_trips_bit_exact(shape):
  w = jnp.asarray(normal(shape, seed=len(shape)))
  leaves = jax.jit(lora.ternary_quantize)(w)
  wq, scale = quant.ternary(w)
  assert leaves["kernel_ternary"].dtype == jnp.uint8 and leaves["kernel_scale"].shape == ()
  np.testing.assert_array_equal(leaves["kernel_ternary"], quant.pack_ternary(np.asarray(wq)))
  out = jax.jit(lora.ternary_dequantize, static_argnums=1)(leaves, shape)
  np.testing.assert_array_equal(out, wq * scale)


def test_packed_ternary_base_forward_is_the_float_latent_forward_bit_for_bit():
  cfg = lora_model(scan=True, quant_kind="bitnet158")  # each layer quantized on its own
  params = with_random_b(params_at_init(cfg))
  adapters, base = lora.split(params)
  packed = quantize_base(base, "ternary")
  layer = packed["blocks"]
  assert "kernel" not in layer["mlp"]["up"] and "kernel" not in layer["attn"]["query"]
  assert layer["mlp"]["up"]["kernel_ternary"].dtype == jnp.uint8
  assert layer["mlp"]["up"]["kernel_scale"].shape == (cfg.num_layers,)
  # the deployed BitLinear on unpacked W_q * scale, adapters on top: exactly the training-mode
  # forward of the float latent weights
  np.testing.assert_array_equal(logits(cfg, lora.merge(adapters, packed)), logits(cfg, params))


# ---- adapters ------------------------------------------------------------------------------


def test_dense_init_a_is_kaiming_uniform_and_b_zero():
  every = lora.Lora(RANK, targets="")  # matches any path, the top module's "" too
  dense = Dense((6, 5), ("embed",), ("heads", "head_dim"), lora=every)
  params = nn.unbox(jax.jit(dense.init)(jax.random.key(0), jnp.ones((2, 400))))["params"]
  assert params["lora_a"].shape == (400, RANK) and params["lora_b"].shape == (RANK, 6, 5)
  np.testing.assert_array_equal(params["lora_b"], 0.0)
  a = np.asarray(params["lora_a"])
  bound = 400**-0.5  # PEFT: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
  assert np.std(a) == pytest.approx(bound / 3**0.5, rel=0.1)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "looped"])
def test_adapters_at_init_leave_the_base_model_bit_for_bit(scan):
  cfg = lora_model(scan)
  params = params_at_init(cfg)
  adapters, base = lora.split(params)
  assert adapters and not lora.adapter_paths(base)
  expected = logits(no_lora(cfg), base)
  np.testing.assert_array_equal(logits(cfg, params), expected)
  np.testing.assert_array_equal(logits(cfg, base), expected)  # no adapters: branch skipped
  # and the rank-0 model's params are exactly the base's: the same names and shapes
  shapes = lambda t: jax.tree.map(lambda x: x.shape, nn.unbox(t))  # noqa: E731
  assert shapes(abstract_init(no_lora(cfg))) == shapes(base)


def test_adapters_are_stacked_per_layer_under_scan():
  cfg = lora_model(scan=True)
  adapters, _ = lora.split(nn.unbox(abstract_init(cfg)))
  attn = adapters["blocks"]["attn"]
  d, h, k, n = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.num_layers
  assert attn["query"]["lora_a"].shape == (n, d, RANK)
  assert attn["query"]["lora_b"].shape == (n, RANK, h, k)
  assert attn["out"]["lora_a"].shape == (n, h, k, RANK)
  assert attn["out"]["lora_b"].shape == (n, RANK, d)
  # each layer's adapter acts on that layer: fold (per layer) agrees with the scanned forward
  params = with_random_b(params_at_init(cfg))
  folded = lora.fold(params, cfg.lora)
  np.testing.assert_allclose(logits(no_lora(cfg), folded), logits(cfg, params), atol=1e-5)


@pytest.mark.parametrize("base_quant", ["none", "nf4"])
def test_fold_gives_the_adapted_model_without_adapters(base_quant):
  cfg = lora_model(scan=False)
  params = with_random_b(params_at_init(cfg))
  adapters, base = lora.split(params)
  stored = lora.merge(adapters, quantize_base(base, base_quant))
  adapted = logits(cfg, stored)
  assert np.abs(adapted - logits(no_lora(cfg), base)).max() > 1e-2  # B matters
  folded = lora.fold(stored, cfg.lora, shapes=base)
  assert not lora.adapter_paths(folded)
  assert "kernel" in folded["block_0"]["mlp"]["up"]  # dequantized even where not adapted
  np.testing.assert_allclose(logits(no_lora(cfg), folded), adapted, atol=1e-5, rtol=0)
  if base_quant == "nf4":  # Dense reads NF4 leaves as their dequantized kernel
    dequantized = lora.dequantize_base(stored, shapes=base)  # adapters kept
    # (XLA may fuse the dequantization's multiply-add differently: not bit for bit)
    np.testing.assert_allclose(adapted, logits(cfg, dequantized), atol=1e-5, rtol=0)
    exact, err = logits(cfg, params), adapted - logits(cfg, params)
    rms = lambda x: np.sqrt(np.mean(np.square(x)))  # noqa: E731
    print(f"NF4 base: logits error rms {rms(err):.4f}, logits rms {rms(exact):.4f}")
    assert 0 < rms(err) < 0.2 * rms(exact)  # quantized, and close


def test_fold_of_a_quantized_base_needs_its_shapes():
  cfg = lora_model(scan=False)
  adapters, base = lora.split(params_at_init(cfg))
  with pytest.raises(ValueError, match="shapes"):
    lora.fold(lora.merge(adapters, quantize_base(base, "nf4")), cfg.lora)


ATTN = {"query", "key", "value", "out"}
MLP = {"up", "gate", "down"}


@pytest.mark.parametrize(
  "targets, adapted",
  [
    (lora.Lora.targets, {"attn": ATTN}),
    ("mlp/(up|gate|down)$", {"mlp": MLP}),
    (".", {"attn": ATTN, "mlp": MLP}),  # every Dense given lora: never heads or embeddings
    ("^nothing$", {}),
  ],
)
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "looped"])
def test_targets_choose_the_adapted_layers(targets, adapted, scan):
  cfg = tiny("llama", scan_layers=scan, tie_embeddings=False, lora=lora.Lora(RANK, 16, targets))
  params = nn.unbox(abstract_init(cfg))
  paths = lora.adapter_paths(params)
  layers = ["blocks"] if scan else [f"block_{i}" for i in range(cfg.num_layers)]
  assert cfg.mlp == "swiglu"  # llama: up, gate and down
  expected = {
    f"{layer}/{parent}/{name}"
    for layer in layers
    for parent, names in adapted.items()
    for name in names
  }
  assert set(paths) == expected
  assert "head" in lora.dense_paths(params)  # what the trainer lists when nothing matches
  assert set(paths) <= set(lora.dense_paths(params))


def test_default_targets_include_cross_attention():
  cfg = tiny("t5", scan_layers=True, lora=lora.Lora(RANK))
  paths = set(lora.adapter_paths(nn.unbox(abstract_init(cfg, EncoderDecoder))))
  assert paths == {
    f"{stack}/{attn}/{name}"
    for stack, attns in (("encoder_blocks", ["attn"]), ("decoder_blocks", ["attn", "cross_attn"]))
    for attn in attns
    for name in ATTN
  }


def test_split_merge_round_trip_and_adapter_only_gradients():
  cfg = lora_model(scan=False)
  params = params_at_init(cfg)
  adapters, base = lora.split(params)
  assert jax.tree.structure(lora.merge(adapters, base)) == jax.tree.structure(params)
  for got, want in zip(
    jax.tree.leaves(lora.merge(adapters, base)), jax.tree.leaves(params), strict=True
  ):
    assert got is want
  assert all(
    path[-1].key in lora.ADAPTERS for path, _ in jax.tree_util.tree_leaves_with_path(adapters)
  )
  assert not any(
    path[-1].key in lora.ADAPTERS for path, _ in jax.tree_util.tree_leaves_with_path(base)
  )
  with pytest.raises(ValueError, match="both"):
    lora.merge(adapters, params)

  tok, pos, seg = tokens(cfg)

  def loss(adapters):
    out, _ = Transformer(cfg).apply({"params": lora.merge(adapters, base)}, tok, pos, seg)
    return -jnp.mean(jax.nn.log_softmax(out)[:, :-1].take(0, axis=-1))

  grads = jax.jit(jax.grad(loss))(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for path in lora.adapter_paths(params):
    g = grads
    for key in path.split("/"):
      g = g[key]
    assert np.abs(np.asarray(g["lora_b"])).max() > 0  # B learns first
    np.testing.assert_array_equal(g["lora_a"], 0.0)  # d/dA of (x A) B is 0 while B = 0


@pytest.mark.parametrize("kind", ["nf4", "ternary"])
def test_quantize_base_on_a_boxed_abstract_tree_keeps_logical_axes(kind):
  quant_kind = "bitnet158" if kind == "ternary" else "none"
  cfg = tiny("gpt", scan_layers=True, quant=quant_kind, tie_embeddings=False, lora=lora.Lora(RANK))
  abstract = abstract_init(cfg)
  out = jax.eval_shape(lambda tree: lora.quantize_base(tree, kind), abstract)
  n = cfg.num_layers
  for parent, name in [("attn", "query"), ("attn", "out"), ("mlp", "up"), ("mlp", "down")]:
    leaves = out["blocks"][parent][name]
    assert "kernel" not in leaves
    size = np.prod(abstract["blocks"][parent][name]["kernel"].value.shape[1:])
    for leaf, axes in lora.QUANT_LEAVES[kind].items():
      assert isinstance(leaves[leaf], nn.LogicallyPartitioned)
      assert leaves[leaf].names == ("layers", *axes)
    first = leaves[next(iter(lora.QUANT_LEAVES[kind]))].value
    per = 64 if kind == "nf4" else 4
    assert first.shape[:2] == (n, -(-size // per)) and first.dtype == jnp.uint8
    assert leaves["bias"].names == abstract["blocks"][parent][name]["bias"].names
  for name in ("lora_a", "lora_b"):
    assert out["blocks"]["attn"]["query"][name].names[0] == "layers"
  assert out["head"]["kernel"].names == ("embed", "vocab")  # heads stay float
  assert out["embed"] == abstract["embed"]
  assert lora.quantize_base(abstract, "none") is abstract
  with pytest.raises(ValueError, match="base_quant"):
    lora.quantize_base(abstract, "int3")
