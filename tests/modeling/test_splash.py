"""The Pallas splash kernel, run in Pallas's interpreter on CPU, against the XLA path."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modeling.attention import attend, attend_splash, make_mask

B, L, H, K = 2, 128, 4, 16
SEG_BL = np.ones((B, L), np.int32)
SEG_BL[1, 50:], SEG_BL[1, 120:] = 2, 0  # row 1: two documents, then padding
POS_BL = np.stack([np.arange(L), np.r_[np.arange(50), np.arange(70), np.zeros(8, int)]]).astype(
  np.int32
)
VALID_BL = SEG_BL > 0


def qkv(g, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(B, L, H, K), (B, L, g, K), (B, L, g, K)]
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def xla(q, k, v, kind, window):
  mask = make_mask(*map(jnp.asarray, (POS_BL, POS_BL, SEG_BL, SEG_BL)), kind, window)
  return attend(q, k, v, mask)


@pytest.mark.parametrize("g", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kind", ["causal", "bidirectional"])
@pytest.mark.parametrize("window", [0, 16])
def test_splash_matches_xla(g, kind, window):
  q, k, v = qkv(g)
  out = attend_splash(q, k, v, jnp.asarray(SEG_BL), kind, window, interpret=True)
  np.testing.assert_allclose(
    np.asarray(out)[VALID_BL], np.asarray(xla(q, k, v, kind, window))[VALID_BL], atol=2e-6
  )


def test_splash_gradients_match_xla():
  q, k, v = qkv(2, seed=1)
  w = jnp.asarray(
    np.random.default_rng(2).normal(size=(B, L, H, K)) * VALID_BL[..., None, None], jnp.float32
  )

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

  splash_grads = jax.grad(
    loss(lambda *a: attend_splash(*a, jnp.asarray(SEG_BL), "causal", 0, True)), (0, 1, 2)
  )(q, k, v)
  xla_grads = jax.grad(loss(lambda *a: xla(*a, "causal", 0)), (0, 1, 2))(q, k, v)
  for s, x in zip(splash_grads, xla_grads, strict=True):
    np.testing.assert_allclose(np.asarray(s), np.asarray(x), atol=2e-5)


def test_splash_rejects_lengths_off_the_block():
  q = jnp.zeros((1, 100, 2, 8))
  with pytest.raises(ValueError, match="divisible by 128"):
    attend_splash(q, q, q, jnp.ones((1, 100), jnp.int32))


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install libtpu)"
)
def test_llama_train_step_with_splash_compiles_for_tpu():
  """Ahead-of-time compile for a TPU v5e chip, on this CPU-only machine."""
  import os

  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental import topologies
  from jax.sharding import Mesh

  from configs import llama
  from modeling.flops import flops_per_token, matmul_params
  from train import families, sharding
  from train.data.tokenizers import ByteTokenizer
  from train.optim import learning_rate_schedule, make_optimizer
  from train.step import make_train_step
  from train.trainer import abstract_state

  c = llama.get_config("size=tiny")
  c.model.attention_impl, c.data.seq_len, c.train.batch_size = "splash", 128, 4
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  mesh = Mesh(np.asarray(topo.devices[:1]).reshape(1, 1, 1, 1), sharding.MESH_AXES)
  model, objective = families.resolve(c).build(c, ByteTokenizer())
  tx = make_optimizer(c.train)
  rules = sharding.rules(c)
  abstract, shardings, _ = abstract_state(c, model, tx, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {
    k: jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=batch_sh)
    for k in ("tokens", "positions", "segment_ids")
  }
  step = sharding.jit_train_step(
    make_train_step(model, objective, tx, learning_rate_schedule(c.train)), shardings, batch_sh
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = step.lower(abstract, batch).compile()
  assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernel, not an XLA fallback
  # XLA counts the step's matmuls (6N per token) and some elementwise work, not the kernel's
  # attention scores (12 L h k S per token), which the formula adds.
  tokens = 4 * 128
  matmuls = 6 * matmul_params(model.cfg) * tokens
  scores = flops_per_token(model.cfg, 128) * tokens - matmuls
  flops = compiled.cost_analysis()["flops"]
  assert matmuls <= flops < matmuls + 0.5 * scores, (flops, matmuls, scores)
