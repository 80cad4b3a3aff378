"""model.neighbor_mix: each position of a bidirectional stack also reads a linear map of its
neighbours' inputs, within its segment; zero at init."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, bert, gpt, mdlm, t5
from modeling.layers import NeighborMix
from modeling.transformer import Transformer
from tests.tiny_models import tiny
from train.validation import validate_config

SEG_BL = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)


def _params(reach: int, d: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  names = [f"before_{o}" for o in range(1, reach + 1)] + [f"after_{o}" for o in range(1, reach + 1)]
  return {n: rng.standard_normal((d, d)).astype(np.float32) for n in names}


def _reference(x_BLD, seg_BL, params, reach):
  """float64 NumPy: x_i + sum over 0 < |o| <= reach, i + o in the row and in i's segment."""
  x = x_BLD.astype(np.float64)
  out = x.copy()
  b_, l_, _ = x.shape
  for b in range(b_):
    for i in range(l_):
      for o in range(-reach, reach + 1):
        j = i + o
        if o == 0 or not 0 <= j < l_ or seg_BL[b, j] != seg_BL[b, i]:
          continue
        w = params[f"before_{-o}" if o < 0 else f"after_{o}"].astype(np.float64)
        out[b, i] += x[b, j] @ w
  return out


@pytest.mark.parametrize("reach", [1, 3])
def test_matches_a_float64_numpy_reference(reach):
  d = 6
  x_BLD = np.random.default_rng(1).standard_normal((2, SEG_BL.shape[1], d)).astype(np.float32)
  params = _params(reach, d)
  got = NeighborMix(reach).apply({"params": params}, jnp.asarray(x_BLD), jnp.asarray(SEG_BL))
  np.testing.assert_allclose(got, _reference(x_BLD, SEG_BL, params, reach), rtol=1e-5, atol=1e-5)


def test_each_position_reads_its_reach_within_its_segment_only():
  """The Jacobian d out_i / d x_j is nonzero exactly for j = i and for 0 < |i - j| <= reach
  in i's segment: nothing crosses a segment boundary or reaches farther."""
  reach, d = 2, 4
  params = _params(reach, d, seed=2)
  x_BLD = jnp.asarray(np.random.default_rng(3).standard_normal((2, SEG_BL.shape[1], d)))

  def f(x):
    return NeighborMix(reach).apply({"params": params}, x, jnp.asarray(SEG_BL))

  jac = jax.jacfwd(f)(x_BLD.astype(jnp.float32))  # [B, L, D, B, L, D]
  for b in range(2):
    reads = np.abs(np.asarray(jac[b, :, :, b])).sum(axis=(1, 3)) > 0  # [L, L]
    i, j = np.meshgrid(np.arange(SEG_BL.shape[1]), np.arange(SEG_BL.shape[1]), indexing="ij")
    expected = (i == j) | ((np.abs(i - j) <= reach) & (SEG_BL[b][i] == SEG_BL[b][j]))
    np.testing.assert_array_equal(reads, expected)
  assert not np.any(np.asarray(jac[0, :, :, 1])) and not np.any(np.asarray(jac[1, :, :, 0]))


def _diffusion_cfg(neighbor_mix: int):
  return tiny("mdlm", 12, vocab=40, neighbor_mix=neighbor_mix)


def test_zero_init_leaves_the_model_unchanged_and_params_are_named_for_sharding():
  tokens_BL = jnp.asarray(np.random.default_rng(4).integers(4, 40, (2, 12)), jnp.int32)
  pos_BL = jnp.broadcast_to(jnp.arange(12), (2, 12))
  seg_BL = jnp.ones((2, 12), jnp.int32)
  outs = {}
  for reach in (0, 2):
    model = Transformer(_diffusion_cfg(reach))
    boxed = model.init(jax.random.key(0), tokens_BL, pos_BL, seg_BL)["params"]
    outs[reach] = model.apply({"params": nn.unbox(boxed)}, tokens_BL, pos_BL, seg_BL)[0]
    if reach:
      mix = boxed["neighbor_mix"]
      assert sorted(mix) == ["after_1", "after_2", "before_1", "before_2"]
      rules = {name for name, _ in base.get_config().logical_axis_rules}
      for box in mix.values():
        assert box.names == ("embed", "factor") and set(box.names) <= rules
        assert not np.any(np.asarray(box.value))
  np.testing.assert_array_equal(outs[0], outs[2])


def test_the_stack_reads_the_mix():
  """Nonzero weights change the logits, and only at positions with a neighbour in the row:
  a one-token segment's logits are those of the model without the mix."""
  cfg = _diffusion_cfg(1)
  model = Transformer(cfg)
  tokens_BL = jnp.asarray(np.random.default_rng(5).integers(4, 40, (1, 12)), jnp.int32)
  pos_BL = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]])
  seg_BL = jnp.asarray([[1] * 11 + [2]])
  params = nn.unbox(model.init(jax.random.key(0), tokens_BL, pos_BL, seg_BL)["params"])
  rng = np.random.default_rng(6)
  d = cfg.d_model
  mixed = dict(
    params,
    neighbor_mix={
      k: jnp.asarray(rng.standard_normal((d, d)), jnp.float32) for k in ("before_1", "after_1")
    },
  )
  a = model.apply({"params": params}, tokens_BL, pos_BL, seg_BL)[0]
  b = model.apply({"params": mixed}, tokens_BL, pos_BL, seg_BL)[0]
  assert np.all(np.abs(np.asarray(a - b))[0, :11].max(axis=-1) > 1e-3)
  np.testing.assert_allclose(a[0, 11], b[0, 11], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", [mdlm, bert])
def test_bidirectional_single_stacks_accept_it(preset):
  config = preset.get_config("size=tiny")
  config.model.neighbor_mix = 2
  validate_config(config)


@pytest.mark.parametrize(
  "preset, value, pattern",
  [
    (gpt, 1, r"model\.neighbor_mix=1: needs one bidirectional stack .* model\.family='decoder'"),
    (t5, 1, r"model\.neighbor_mix=1: needs one bidirectional stack .* model\.family='encdec'"),
    (mdlm, -1, r"model\.neighbor_mix=-1: must be >= 0"),
    (mdlm, 4096, r"model\.neighbor_mix=4096: must be < data\.seq_len"),
  ],
)
def test_bad_values_are_named(preset, value, pattern):
  config = preset.get_config("size=tiny")
  config.model.neighbor_mix = value
  with pytest.raises(ValueError, match=pattern):
    validate_config(config)
