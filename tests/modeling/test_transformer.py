"""Transformer stack: scanned vs looped layers, remat, compute dtype, logical axis names,
GQA shapes and the tied / untied output head."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from modeling.transformer import Transformer, TransformerConfig
from tests.tiny_models import abstract_init, random_params, tiny

RULE_NAMES = {name for name, _ in base.get_config().logical_axis_rules}


def batch(cfg: TransformerConfig, seed: int = 0):
  """A packed batch: row 0 one document, row 1 two documents and padding."""
  rng = np.random.default_rng(seed)
  tokens_BL = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  seg_BL = jnp.array([[1] * 12, [1] * 5 + [2] * 5 + [0] * 2])
  pos_BL = jnp.array([list(range(12)), list(range(5)) + list(range(5)) + [0, 0]])
  return tokens_BL, pos_BL, seg_BL


def logits_fn(cfg: TransformerConfig):
  return jax.jit(lambda params, *b: Transformer(cfg).apply({"params": params}, *b)[0])


def unscan(params_scanned, num_layers: int):
  """`blocks` with a leading layers dim -> `block_0`, `block_1`, ..."""
  out = {k: v for k, v in params_scanned.items() if k != "blocks"}
  for i in range(num_layers):
    out[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i], params_scanned["blocks"])
  return out


# --- scan vs loop, remat ------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_scanned_and_looped_layers_agree(preset):
  scanned = tiny(preset, scan_layers=True)
  looped = dataclasses.replace(scanned, scan_layers=False)
  params_scanned = random_params(scanned)
  params_looped = unscan(params_scanned, scanned.num_layers)
  expected_tree = jax.tree.map(lambda a: (a.shape, a.dtype), nn.unbox(abstract_init(looped)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params_looped) == expected_tree

  b = batch(scanned)
  out_scanned = logits_fn(scanned)(params_scanned, *b)
  out_looped = logits_fn(looped)(params_looped, *b)
  np.testing.assert_allclose(out_scanned, out_looped, rtol=1e-5, atol=1e-5)
  # Layers are distinct: running layer 0's weights twice gives something else.
  same_layers = dict(params_looped, block_1=params_looped["block_0"])
  assert np.abs(logits_fn(looped)(same_layers, *b) - out_looped).max() > 1e-2


def loss_and_grads(cfg: TransformerConfig, params):
  tokens_BL, pos_BL, seg_BL = batch(cfg)
  targets_BL = jnp.roll(tokens_BL, -1, axis=1)

  def loss(p):
    logits_BLV, _ = Transformer(cfg).apply({"params": p}, tokens_BL, pos_BL, seg_BL)
    logp_BLV = jax.nn.log_softmax(logits_BLV)
    return -jnp.mean(jnp.take_along_axis(logp_BLV, targets_BL[..., None], -1))

  return jax.jit(jax.value_and_grad(loss))(params)


@functools.cache
def reference_loss_and_grads(scan_layers: bool):
  cfg = tiny("llama", scan_layers=scan_layers)
  return loss_and_grads(cfg, random_params(cfg))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_leaves_loss_and_gradients_unchanged(remat, scan_layers):
  cfg = tiny("llama", scan_layers=scan_layers)
  params = random_params(cfg)
  loss, grads = loss_and_grads(dataclasses.replace(cfg, remat=remat), params)
  ref_loss, ref_grads = reference_loss_and_grads(scan_layers)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
    assert np.abs(ref).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


# --- compute dtype ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_bfloat16_compute_keeps_float32_params_and_logits(preset):
  cfg32 = tiny(preset)
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  dtypes = {a.dtype for a in jax.tree.leaves(nn.unbox(abstract_init(cfg16)))}
  assert dtypes == {jnp.dtype(jnp.float32)}

  params = random_params(cfg32)
  b = batch(cfg32)
  logits32 = np.asarray(logits_fn(cfg32)(params, *b))
  logits16 = logits_fn(cfg16)(params, *b)
  assert logits16.dtype == jnp.float32
  diff = np.abs(np.asarray(logits16) - logits32)
  scale = logits32.std()
  assert diff.max() < 0.1 * scale, (diff.max(), scale)  # bf16 has ~3 significant digits
  assert diff.max() > 1e-4 * scale  # ... and it really computed in bfloat16


# --- logical axis names -----------------------------------------------------------------------


def _names(boxed_params) -> dict[str, tuple]:
  """'blocks/attn/query/kernel' -> its logical axis names; every leaf must be boxed."""
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


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("preset", ["gpt", "llama"])
def test_every_param_has_logical_axis_names(preset, scan_layers):
  cfg = tiny(preset, scan_layers=scan_layers)
  boxed = abstract_init(cfg)
  names = _names(boxed)
  for key, axes in names.items():
    unnamed = [a for a in axes if a is None]
    # Only the position table's length axis is deliberately unnamed (replicated).
    assert not unnamed or (key == "pos_embedding" and axes == (None, "embed")), (key, axes)
    assert set(axes) - {None} <= RULE_NAMES, (key, axes)  # the mesh rules cover every name

  prefix = ("layers",) if scan_layers else ()
  block = "blocks" if scan_layers else "block_1"
  expected = {
    "embed/embedding": ("vocab", "embed"),
    f"{block}/attn/query/kernel": (*prefix, "embed", "heads", "head_dim"),
    f"{block}/attn/key/kernel": (*prefix, "embed", "kv_heads", "head_dim"),
    f"{block}/attn/value/kernel": (*prefix, "embed", "kv_heads", "head_dim"),
    f"{block}/attn/out/kernel": (*prefix, "heads", "head_dim", "embed"),
    f"{block}/mlp/up/kernel": (*prefix, "embed", "mlp"),
    f"{block}/mlp/down/kernel": (*prefix, "mlp", "embed"),
    f"{block}/attn_norm/scale": (*prefix, "norm"),
  }
  for key, axes in expected.items():
    assert names[key] == axes, key
  if scan_layers:
    assert all(axes[0] == "layers" for key, axes in names.items() if key.startswith("blocks/"))
  else:
    assert not any("layers" in axes for axes in names.values())

  # nn.get_partition_spec reads the same names.
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
  # ... and the default rules map them to mesh axes.
  rules = base.get_config().logical_axis_rules
  mesh_axes = nn.logical_to_mesh_axes(names[f"{block}/attn/query/kernel"], rules)
  assert tuple(mesh_axes) == (*((None,) if scan_layers else ()), "fsdp", "tensor", None)


# --- GQA shapes, tied head --------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [16, 4, 1], ids=["mha", "gqa", "mqa"])
def test_attention_param_shapes_follow_kv_heads(num_kv_heads):
  cfg = tiny("llama", num_kv_heads=num_kv_heads, scan_layers=True)
  attn = nn.unbox(abstract_init(cfg))["blocks"]["attn"]
  layers, d, h, k = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim
  assert (h, k) == (16, 4)
  assert attn["query"]["kernel"].shape == (layers, d, h, k)
  assert attn["key"]["kernel"].shape == (layers, d, num_kv_heads, k)
  assert attn["value"]["kernel"].shape == (layers, d, num_kv_heads, k)
  assert attn["out"]["kernel"].shape == (layers, h, k, d)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_head_reuses_the_embedding(tie):
  cfg = tiny("gpt", tie_embeddings=tie)
  params = random_params(cfg)
  names = _names(abstract_init(cfg))
  if tie:
    assert "head/kernel" not in names and "head" not in params
  else:
    assert names["head/kernel"] == ("embed", "vocab")
    assert params["head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)

  # Change the embedding of a token absent from the input: only a tied head notices,
  # and only in that token's logit.
  tokens_BL, pos_BL, seg_BL = batch(cfg)
  absent = int(np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(tokens_BL))[0])
  embedding = params["embed"]["embedding"]
  changed = dict(params, embed={"embedding": embedding.at[absent].mul(-3.0)})
  before = np.asarray(logits_fn(cfg)(params, tokens_BL, pos_BL, seg_BL))
  after = np.asarray(logits_fn(cfg)(changed, tokens_BL, pos_BL, seg_BL))
  others = np.arange(cfg.vocab_size) != absent
  np.testing.assert_array_equal(after[..., others], before[..., others])
  if tie:
    np.testing.assert_allclose(after[..., absent], -3.0 * before[..., absent], rtol=1e-5, atol=1e-5)
    assert np.abs(before[..., absent]).max() > 0.1
  else:
    np.testing.assert_array_equal(after[..., absent], before[..., absent])
