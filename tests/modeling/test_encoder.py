"""Encoders (configs/bert.py): bidirectional, segment-isolated attention; a float64 NumPy
reference of the forward pass; ALBERT's shared, factorized stack; token types; logical axis
names; and the heads on one stack (mlm, classify, tokens, pool)."""

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
from tests.tiny_models import abstract_init, draw_params, random_params, tiny

ARCHS = ("bert", "roberta", "albert", "modern")
RULE_NAMES = {name for name, _ in base.get_config().logical_axis_rules}
HEAD_PARAMS = {
  "mlm": {"mlm_transform", "mlm_norm", "mlm_bias"},
  "classify": {"pooler", "classifier"},
  "tokens": {"token_classifier"},
  "pool": set(),
}


def encoder(arch: str, seq_len: int = 16, **overrides) -> TransformerConfig:
  """The arch's `size=tiny` encoder with a small vocabulary and context, no dropout."""
  return tiny("bert", seq_len, f"arch={arch}", **{"dropout": 0.0, **overrides})


def packed_batch(cfg: TransformerConfig, seed: int = 0):
  """Two rows of two documents each; row 1 ends with padding. Token types: A then B."""
  rng = np.random.default_rng(seed)
  tokens_BL = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
  seg_BL = np.array([[1] * 9 + [2] * 7, [1] * 7 + [2] * 6 + [0] * 3], np.int32)
  pos_BL = np.array([[*range(9), *range(7)], [*range(7), *range(6), 0, 0, 0]], np.int32)
  types_BL = np.array([[0] * 5 + [1] * 4 + [0] * 4 + [1] * 3, [0] * 4 + [1] * 3 + [0] * 9])
  return tokens_BL, pos_BL, seg_BL, types_BL.astype(np.int32)


@functools.cache
def forward(cfg: TransformerConfig):
  """jit((params, tokens, positions, segments, token types) -> the head's output)."""

  def f(params, tokens_BL, pos_BL, seg_BL, types_BL=None):
    return Transformer(cfg).apply(
      {"params": params}, tokens_BL, pos_BL, seg_BL, token_types_BL=types_BL
    )[0]

  return jax.jit(f)


def flat_shapes(tree) -> dict[str, tuple]:
  return {
    jax.tree_util.keystr(path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
  }


# --- bidirectional, segment-isolated attention --------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_is_bidirectional_within_a_segment_only(arch):
  cfg = encoder(arch)
  assert cfg.head == "mlm" and cfg.mask_kind == "bidirectional"
  params = random_params(cfg)
  tokens_BL, pos_BL, seg_BL, _ = packed_batch(cfg)
  last_of_first = np.array([8, 6])  # the last token of each row's first document
  changed_BL = tokens_BL.copy()
  rows = np.arange(2)
  changed_BL[rows, last_of_first] = (tokens_BL[rows, last_of_first] + 1) % cfg.vocab_size

  before = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL))
  after = np.asarray(forward(cfg)(params, changed_BL, pos_BL, seg_BL))
  assert before.shape == (2, 16, cfg.vocab_size)
  diff_BL = np.abs(after - before).max(-1)
  # Every token of the first document sees the later token, the first one included ...
  for row, end in enumerate(last_of_first + 1):
    assert (diff_BL[row, :end] > 1e-3).all(), (arch, row, diff_BL[row])
  # ... and nothing else does: not the second document, not the padding.
  np.testing.assert_array_equal(after[0, 9:], before[0, 9:])
  np.testing.assert_array_equal(after[1, 7:], before[1, 7:])


# --- a float64 NumPy reference -------------------------------------------------------------


def _norm(x, p, kind, eps):
  if kind == "layernorm":
    x = x - x.mean(-1, keepdims=True)
  y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p["scale"]
  return y + p["bias"] if "bias" in p else y


def _dense(x, p, contract: int = 1):
  y = np.tensordot(x, p["kernel"], axes=contract)
  return y + p["bias"] if "bias" in p else y


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _rope(x_BLHK, pos_BL, theta):
  """Rotates the pairs (x[i], x[i + K/2]) as complex numbers by pos * theta^(-i / (K/2))."""
  half = x_BLHK.shape[-1] // 2
  angle_BLF = pos_BL[..., None] * theta ** (-np.arange(half) / half)
  z = (x_BLHK[..., :half] + 1j * x_BLHK[..., half:]) * np.exp(1j * angle_BLF)[:, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def _attention(x_BLD, p, pos_BL, seg_BL, cfg):
  q_BLHK, k_BLHK, v_BLHK = (_dense(x_BLD, p[n]) for n in ("query", "key", "value"))
  if cfg.position == "rope":
    q_BLHK, k_BLHK = _rope(q_BLHK, pos_BL, cfg.rope.theta), _rope(k_BLHK, pos_BL, cfg.rope.theta)
  scores_BHLS = np.einsum("blhk,bshk->bhls", q_BLHK, k_BLHK) / np.sqrt(cfg.head_dim)
  same_B1LS = (seg_BL[:, :, None] == seg_BL[:, None, :])[:, None]
  scores_BHLS = np.where(same_B1LS, scores_BHLS, -np.inf)
  probs_BHLS = np.exp(scores_BHLS - scores_BHLS.max(-1, keepdims=True))
  probs_BHLS /= probs_BHLS.sum(-1, keepdims=True)
  return _dense(np.einsum("bhls,bshk->blhk", probs_BHLS, v_BLHK), p["out"], contract=2)


def _mlp(x_BLD, p, kind):
  up_BLF = _dense(x_BLD, p["up"])
  if kind == "swiglu":
    gate_BLF = _dense(x_BLD, p["gate"])
    h_BLF = gate_BLF / (1 + np.exp(-gate_BLF)) * up_BLF
  else:
    h_BLF = _gelu_tanh(up_BLF)
  return _dense(h_BLF, p["down"])


def reference_mlm_logits(cfg: TransformerConfig, params, tokens_BL, pos_BL, seg_BL, types_BL):
  """BERT / RoBERTa / ALBERT / modern encoder with the MLM head, in float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  table_VE = p["embed"]["embedding"]
  x = table_VE[tokens_BL]
  if cfg.position == "learned":
    x = x + p["pos_embedding"][pos_BL]
  if cfg.type_vocab_size:
    x = x + p["type_embedding"][types_BL]
  if cfg.norm_position == "post":
    x = _norm(x, p["embed_norm"], cfg.norm, cfg.norm_eps)
  if "embed_proj" in p:
    x = x @ p["embed_proj"]["kernel"]
  for i in range(cfg.num_layers):
    b = p["shared_block"] if cfg.share_layers else p[f"block_{i}"]
    attn_norm = functools.partial(_norm, p=b["attn_norm"], kind=cfg.norm, eps=cfg.norm_eps)
    mlp_norm = functools.partial(_norm, p=b["mlp_norm"], kind=cfg.norm, eps=cfg.norm_eps)
    if cfg.norm_position == "pre":
      x = x + _attention(attn_norm(x), b["attn"], pos_BL, seg_BL, cfg)
      x = x + _mlp(mlp_norm(x), b["mlp"], cfg.mlp)
    else:
      x = attn_norm(x + _attention(x, b["attn"], pos_BL, seg_BL, cfg))
      x = mlp_norm(x + _mlp(x, b["mlp"], cfg.mlp))
  if cfg.norm_position == "pre":
    x = _norm(x, p["final_norm"], cfg.norm, cfg.norm_eps)
  h = _norm(_gelu_tanh(_dense(x, p["mlm_transform"])), p["mlm_norm"], cfg.norm, cfg.norm_eps)
  return h @ table_VE.T + p["mlm_bias"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mlm_logits_match_a_float64_numpy_reference(arch):
  cfg = encoder(arch)
  params = random_params(cfg, seed=1)
  tokens_BL, pos_BL, seg_BL, types_BL = packed_batch(cfg, seed=1)
  got = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL, types_BL))
  want = reference_mlm_logits(cfg, params, tokens_BL, pos_BL, seg_BL, types_BL)
  assert want.std() > 1.0  # the logits are far from trivial
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_encoder_depends_on_relative_positions_only():
  cfg = encoder("modern")
  params = random_params(cfg)
  tokens_BL, pos_BL, seg_BL, _ = packed_batch(cfg)
  out = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL))
  shifted = np.asarray(forward(cfg)(params, tokens_BL, pos_BL + 5, seg_BL))
  np.testing.assert_allclose(shifted, out, rtol=1e-4, atol=1e-4)
  reversed_BL = np.where(seg_BL > 0, 20 - pos_BL, 0)  # same tokens, mirrored order
  mirrored = np.asarray(forward(cfg)(params, tokens_BL, reversed_BL, seg_BL))
  assert np.abs(mirrored - out).max() > 1e-2  # ... but positions do matter


# --- ALBERT: factorized embedding, one shared block -----------------------------------------


def test_albert_shares_one_block_over_a_factorized_embedding():
  cfg = encoder("albert")
  e, d = cfg.embed_dim, cfg.d_model
  assert cfg.share_layers and 0 < e < d and cfg.num_layers == 2
  shapes = flat_shapes(abstract_init(cfg))
  assert not any(k.startswith(("['block_", "['blocks']")) for k in shapes), sorted(shapes)
  assert any(k.startswith("['shared_block']") for k in shapes)
  assert shapes["['embed']['embedding']"] == (cfg.vocab_size, e)
  assert shapes["['embed_proj']['kernel']"] == (e, d)
  assert shapes["['pos_embedding']"] == (cfg.max_len, e)
  assert shapes["['type_embedding']"] == (cfg.type_vocab_size, e)
  assert shapes["['shared_block']['attn']['query']['kernel']"] == (d, cfg.num_heads, cfg.head_dim)
  assert shapes["['mlm_transform']['kernel']"] == (d, e)

  # The same model with num_layers separate blocks, each a copy of the shared one, agrees;
  # with a different second block it does not.
  unshared = dataclasses.replace(cfg, share_layers=False)
  params = random_params(cfg)
  rest = {k: v for k, v in params.items() if k != "shared_block"}
  copies = {f"block_{i}": params["shared_block"] for i in range(cfg.num_layers)}
  batch = packed_batch(cfg)
  out = np.asarray(forward(cfg)(params, *batch))
  np.testing.assert_allclose(
    forward(unshared)(dict(rest, **copies), *batch), out, rtol=1e-5, atol=1e-5
  )
  other = draw_params(abstract_init(cfg), seed=7)["shared_block"]
  distinct = dict(rest, block_0=params["shared_block"], block_1=other)
  assert np.abs(np.asarray(forward(unshared)(distinct, *batch)) - out).max() > 1e-2


# --- token types ---------------------------------------------------------------------------


def test_token_types_change_outputs_where_the_arch_has_them():
  cfg = encoder("bert")
  assert cfg.type_vocab_size == 2
  params = random_params(cfg)
  tokens_BL, pos_BL, seg_BL, _ = packed_batch(cfg)
  zeros_BL, ones_BL = np.zeros_like(tokens_BL), np.ones_like(tokens_BL)
  out0 = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL, zeros_BL))
  out1 = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL, ones_BL))
  default = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL))
  assert np.abs(out1 - out0).max(-1).min() > 1e-3  # every position
  np.testing.assert_array_equal(default, out0)  # no token types: all type 0
  assert params["type_embedding"].shape == (2, cfg.d_model)
  for arch in ("roberta", "modern"):
    assert "type_embedding" not in nn.unbox(abstract_init(encoder(arch))), arch


# --- logical axis names --------------------------------------------------------------------


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


ARCH_LAYOUTS = [(a, s) for a in ARCHS for s in (False, True) if not (a == "albert" and s)]


@pytest.mark.parametrize("head", ["mlm", "classify", "tokens"])
@pytest.mark.parametrize(
  ("arch", "scan_layers"),
  ARCH_LAYOUTS,
  ids=[f"{a}-{'scan' if s else 'loop'}" for a, s in ARCH_LAYOUTS],
)
def test_every_encoder_param_has_logical_axis_names(arch, scan_layers, head):
  cfg = encoder(arch, scan_layers=scan_layers, head=head, num_labels=3)
  boxed = abstract_init(cfg)
  names = _names(boxed)
  width = "factor" if cfg.embed_dim else "embed"
  for key, axes in names.items():
    if key in ("pos_embedding", "type_embedding"):  # the table's row axis stays replicated
      assert axes == (None, width), (key, axes)
    else:
      assert None not in axes, (key, axes)
    assert set(axes) - {None} <= RULE_NAMES, (key, axes)  # the mesh rules cover every name

  prefix = ("layers",) if scan_layers else ()
  block = "shared_block" if cfg.share_layers else "blocks" if scan_layers else "block_1"
  expected = {
    "embed/embedding": ("vocab", width),
    f"{block}/attn/query/kernel": (*prefix, "embed", "heads", "head_dim"),
    f"{block}/attn/out/kernel": (*prefix, "heads", "head_dim", "embed"),
    f"{block}/mlp/up/kernel": (*prefix, "embed", "mlp"),
    f"{block}/mlp/down/kernel": (*prefix, "mlp", "embed"),
    f"{block}/attn_norm/scale": (*prefix, "norm"),
  }
  if cfg.embed_dim:
    expected["embed_proj/kernel"] = ("factor", "embed")
  if head == "mlm":
    expected["mlm_bias"] = ("vocab",)
  if head == "tokens":
    expected["token_classifier/kernel"] = ("embed", "labels")
  if head == "classify":
    assert names["pooler/kernel"][0] == "embed" and names["classifier/kernel"][1] == "labels"
  for key, axes in expected.items():
    assert names[key] == axes, (key, names.get(key))
  assert scan_layers == any("layers" in axes for axes in names.values())

  specs = nn.get_partition_spec(boxed)
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(spec_leaves) == len(names)
  assert all(isinstance(s, jax.sharding.PartitionSpec) for s in spec_leaves)


# --- heads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_share_the_encoder_params(arch):
  trees = {h: flat_shapes(abstract_init(encoder(arch, head=h, num_labels=3))) for h in HEAD_PARAMS}
  all_head_params = set().union(*HEAD_PARAMS.values())

  def top(key: str) -> str:
    return key.split("'")[1]

  bodies = {
    h: {k: s for k, s in t.items() if top(k) not in all_head_params} for h, t in trees.items()
  }
  for head, tree in trees.items():
    assert {top(k) for k in tree} - {top(k) for k in bodies[head]} == HEAD_PARAMS[head], head
    assert bodies[head] == bodies["mlm"], head
  assert trees["classify"]["['classifier']['kernel']"][-1] == 3
  assert trees["tokens"]["['token_classifier']['kernel']"] == (encoder(arch).d_model, 3)


def test_classify_tokens_and_pool_heads():
  arch = "bert"
  tokens_cfg = encoder(arch, head="tokens", num_labels=encoder(arch).d_model)
  d = tokens_cfg.d_model
  params = dict(random_params(tokens_cfg, seed=2))
  # An identity token classifier turns the tokens head into the final hidden states.
  params["token_classifier"] = {"kernel": jnp.eye(d), "bias": jnp.zeros(d)}
  body = {k: v for k, v in params.items() if k != "token_classifier"}
  batch = packed_batch(tokens_cfg, seed=2)
  seg_BL = batch[2]
  hidden_BLD = np.asarray(forward(tokens_cfg)(params, *batch))
  assert hidden_BLD.shape == (2, 16, d)

  labels3 = encoder(arch, head="tokens", num_labels=3)
  three = dict(body, token_classifier={"kernel": params["token_classifier"]["kernel"][:, :3]})
  three["token_classifier"]["bias"] = jnp.arange(3.0)
  out_BL3 = np.asarray(forward(labels3)(three, *batch))
  assert out_BL3.shape == (2, 16, 3)
  np.testing.assert_allclose(out_BL3, hidden_BLD[..., :3] + np.arange(3.0), rtol=1e-5, atol=1e-5)

  cls_BD = np.asarray(forward(encoder(arch, head="pool", pooling="cls"))(body, *batch))
  mean_BD = np.asarray(forward(encoder(arch, head="pool", pooling="mean"))(body, *batch))
  np.testing.assert_allclose(cls_BD, hidden_BLD[:, 0], rtol=1e-5, atol=1e-5)
  real_BL1 = (seg_BL > 0)[..., None]
  want_BD = (hidden_BLD * real_BL1).sum(1) / real_BL1.sum(1)
  np.testing.assert_allclose(mean_BD, want_BD, rtol=1e-5, atol=1e-5)
  assert np.abs(hidden_BLD[1].mean(0) - want_BD[1]).max() > 1e-3  # padding is left out

  for pooling, pooled_BD in (("cls", cls_BD), ("mean", mean_BD)):
    cfg = encoder(arch, head="classify", num_labels=3, pooling=pooling)
    head = draw_params(abstract_init(cfg), seed=3)
    classify_params = dict(body, pooler=head["pooler"], classifier=head["classifier"])
    out_B3 = np.asarray(forward(cfg)(classify_params, *batch))
    assert out_B3.shape == (2, 3)
    pooler, classifier = (
      jax.tree.map(lambda a: np.asarray(a, np.float64), head[k]) for k in ("pooler", "classifier")
    )
    want_B3 = _dense(np.tanh(_dense(pooled_BD, pooler)), classifier)
    np.testing.assert_allclose(out_B3, want_B3, rtol=1e-4, atol=1e-5)
