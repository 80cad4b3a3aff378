"""DeBERTa (configs/bert.py:arch=deberta, modeling/deberta.py): log buckets against a float64
NumPy reference of DeBERTa-v2's formula, the whole MLM forward pass (disentangled attention's
three terms, shared relative table, scale, enhanced mask decoder) against a float64
reference, relative-only positions without the EMD, and validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modeling import deberta
from tests.modeling.test_encoder import _dense, _norm, encoder, forward, packed_batch
from tests.tiny_models import random_params, tiny_config
from train.validation import validate_config


def np_log_bucket(rel, buckets: int, max_distance: int):
  """DeBERTa-v2's buckets in float64: exact up to buckets / 2, then
  sign * (mid + ceil((mid - 1) * log(|d| / mid) / log((max - 1) / mid)))."""
  rel = np.asarray(rel, np.int64)
  mid = buckets // 2
  out = rel.copy()
  far = np.abs(rel) > mid
  d = np.abs(rel[far]).astype(np.float64)
  out[far] = np.sign(rel[far]) * (
    mid + np.ceil((mid - 1) * np.log(d / mid) / math.log((max_distance - 1) / mid))
  )
  return out


@pytest.mark.parametrize("buckets,max_distance", [(256, 512), (8, 10), (32, 128), (6, 100)])
def test_log_buckets_match_the_float64_formula(buckets, max_distance):
  rel = np.arange(-3 * max_distance, 3 * max_distance + 1)
  got = np.asarray(deberta.log_bucket_position(jnp.asarray(rel, jnp.int32), buckets, max_distance))
  want = np_log_bucket(rel, buckets, max_distance)
  np.testing.assert_array_equal(got, want)
  mid = buckets // 2
  assert (got[np.abs(rel) <= mid] == rel[np.abs(rel) <= mid]).all()  # exact near 0
  assert (np.diff(got) >= 0).all() and (got == -got[::-1]).all()  # monotone and odd
  assert got[rel == max_distance - 1][0] == buckets - 1  # max - 1 reaches the last bucket


def test_relative_index_clips_to_the_table_and_exact_mode_uses_raw_distances():
  pos_BL = jnp.arange(40)[None]
  idx = np.asarray(deberta.relative_index(pos_BL, 0, 6))  # no buckets: span 6, 12 rows
  rel = np.arange(40)[:, None] - np.arange(40)[None, :]
  np.testing.assert_array_equal(idx[0], np.clip(rel + 6, 0, 11))


# --- the forward pass against float64 NumPy -------------------------------------------------


def _gelu_erf(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _disentangled(x_BLD, kv_BSD, p, rel_RD, pos_BL, seg_BL, cfg):
  """Eq. 4 written out: every (i, j) reads row bucket(pos_i - pos_j) + span of the
  relative table, projected by this layer's own query and key maps."""
  q_BLHK = _dense(x_BLD, p["query"])
  k_BSHK, v_BSHK = _dense(kv_BSD, p["key"]), _dense(kv_BSD, p["value"])
  qr_RHK, kr_RHK = _dense(rel_RD, p["query"]), _dense(rel_RD, p["key"])
  span = cfg.position_buckets or cfg.max_relative_positions
  rel_BLS = pos_BL[:, :, None] - pos_BL[:, None, :]
  if cfg.position_buckets:
    rel_BLS = np_log_bucket(rel_BLS, cfg.position_buckets, cfg.max_relative_positions)
  idx_BLS = np.clip(rel_BLS + span, 0, 2 * span - 1)
  c2c = np.einsum("blhk,bshk->bhls", q_BLHK, k_BSHK)
  c2p = np.einsum("blhk,blshk->bhls", q_BLHK, kr_RHK[idx_BLS])
  p2c = np.einsum("bshk,blshk->bhls", k_BSHK, qr_RHK[idx_BLS])
  scores_BHLS = (c2c + c2p + p2c) / np.sqrt(3 * cfg.head_dim)
  same_B1LS = (seg_BL[:, :, None] == seg_BL[:, None, :])[:, None]
  scores_BHLS = np.where(same_B1LS, scores_BHLS, -np.inf)
  probs_BHLS = np.exp(scores_BHLS - scores_BHLS.max(-1, keepdims=True))
  probs_BHLS /= probs_BHLS.sum(-1, keepdims=True)
  return _dense(np.einsum("bhls,bshk->blhk", probs_BHLS, v_BSHK), p["out"], contract=2)


def reference_deberta_logits(cfg, params, tokens_BL, pos_BL, seg_BL):
  """DeBERTa's MLM forward pass in float64: post-norm blocks, no absolute positions in the
  input, one layer-normed relative table; the EMD: H + absolute positions as queries over H,
  one block applied emd_layers times; then BERT's MLM head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  norm = lambda x, q: _norm(x, q, "layernorm", cfg.norm_eps)  # noqa: E731
  table_VD = p["embed"]["embedding"]
  rel_RD = norm(p["rel_embed"]["embedding"], p["rel_embed"]["norm"])

  def block(x, kv, b):
    x = norm(x + _disentangled(x, kv, b["attn"], rel_RD, pos_BL, seg_BL, cfg), b["attn_norm"])
    h = _dense(_gelu_erf(_dense(x, b["mlp"]["up"])), b["mlp"]["down"])
    return norm(x + h, b["mlp_norm"])

  x = norm(table_VD[tokens_BL], p["embed_norm"])
  for i in range(cfg.num_layers):
    x = block(x, x, p[f"block_{i}"])
  if cfg.emd_layers:
    q = x + p["emd_positions"][pos_BL]
    for _ in range(cfg.emd_layers):
      q = block(q, x, p["emd_block"])
    x = q
  h = norm(_gelu_erf(_dense(x, p["mlm_transform"])), p["mlm_norm"])
  return h @ table_VD.T + p["mlm_bias"]


CASES = {  # log buckets past 4 (positions reach 8), rows 1..15 of 16 reachable; exact, clipped at 3
  "buckets_emd": dict(position_buckets=8, max_relative_positions=40, emd_layers=2),
  "exact_no_emd": dict(position_buckets=0, max_relative_positions=3, emd_layers=0),
}


@pytest.mark.parametrize("case", CASES)
def test_deberta_mlm_logits_match_a_float64_numpy_reference(case):
  cfg = encoder("deberta", **CASES[case])
  assert cfg.position == "disentangled" and cfg.norm_position == "post"
  assert deberta.reachable_rows(8, 40, cfg.max_len) == (1, 16)  # the sliced table
  params = random_params(cfg, seed=2)
  assert "rel_embed" in params and not any("rel" in k for k in params["block_0"]["attn"])
  tokens_BL, pos_BL, seg_BL, _ = packed_batch(cfg, seed=2)
  got = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL))
  want = reference_deberta_logits(cfg, params, tokens_BL, pos_BL, seg_BL)
  assert want.std() > 1.0
  real = seg_BL > 0  # padding rows attend only to padding: not compared
  np.testing.assert_allclose(got[real], want[real], rtol=2e-4, atol=2e-4)


def test_without_the_emd_only_relative_positions_matter_and_the_emd_adds_absolute_ones():
  tokens_BL, pos_BL, seg_BL, _ = packed_batch(encoder("deberta"), seed=3)
  for case, absolute in (("exact_no_emd", False), ("buckets_emd", True)):
    cfg = encoder("deberta", **CASES[case])
    params = random_params(cfg, seed=3)
    out = np.asarray(forward(cfg)(params, tokens_BL, pos_BL, seg_BL))
    shifted = np.asarray(forward(cfg)(params, tokens_BL, pos_BL + 5, seg_BL))
    moved = np.abs(shifted - out)[seg_BL > 0].max()
    assert (moved > 1e-2) if absolute else (moved < 1e-4), (case, moved)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "preset,options,overrides,message",
  [
    ("gpt", "", {"position": "disentangled"}, r"model\.position='disentangled'.*bidirectional"),
    ("bert", "arch=deberta", {"norm_position": "pre"}, r"model\.emd_layers=2.*'post'"),
    ("bert", "arch=modern", {"emd_layers": 1}, r"model\.emd_layers=1.*'disentangled'"),
    ("bert", "arch=deberta", {"num_kv_heads": 2}, r"model\.num_kv_heads=2"),
    ("bert", "arch=deberta", {"position_buckets": 64, "max_relative_positions": 20}, "exceed"),
  ],
)
def test_invalid_deberta_configs_are_refused_naming_the_key(preset, options, overrides, message):
  config = tiny_config(preset, options)
  config.model.update(overrides)
  with pytest.raises(ValueError, match=message):
    validate_config(config)
