"""The KV cache bytes per token of multi-head latent attention, by formula and as compiled.

  python -m bench.mla_cache

For DeepSeek-V3's attention shape (61 layers, 128 heads, kv_lora_rank 512, qk_rope_head_dim
64, bfloat16) the cache holds layers x (kv_lora_rank + qk_rope_head_dim) numbers per token:
61 x 576 x 2 = 70,272 bytes. The compiled figure comes from XLA: a one-token decode step
of the model is lowered and compiled for this machine's backend on abstract shapes
(`jax.eval_shape`, `jax.ShapeDtypeStruct`: no weights are made); its
`memory_analysis().argument_size_in_bytes`, less the params' and the tokens' bytes, is the
cache, divided by the positions it holds. The MLP is a dense SwiGLU of DeepSeek-V3's dense layers' width (its mixture of
experts does not touch the cache). It also prints what multi-head attention with the same
heads would cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from modeling.mla import Mla
from modeling.rope import Rope
from modeling.transformer import Transformer, TransformerConfig, init_cache

DEEPSEEK_V3 = TransformerConfig(
  vocab_size=129280,
  num_layers=61,
  num_heads=128,
  num_kv_heads=128,
  d_model=7168,
  d_ff=18432,
  head_dim=128,
  max_len=163840,
  position="rope",
  rope=Rope(
    theta=10000.0,
    scaling="yarn",
    factor=40.0,
    original_max_len=4096,
    mscale=1.0,
    mscale_all_dim=1.0,
  ),
  norm="rmsnorm",
  norm_eps=1e-6,
  mlp="swiglu",
  use_bias=False,
  tie_embeddings=False,
  dtype="bfloat16",
  scan_layers=True,
  attention="mla",
  mla=Mla(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64),
)


def formula_bytes_per_token(cfg: TransformerConfig) -> int:
  """Every leaf of `init_cache`: layers x (kv_lora_rank + qk_rope_head_dim) for MLA, layers x
  2 x kv heads x head_dim otherwise, times the compute dtype's bytes."""
  width = cfg.mla.cache_width if cfg.attention == "mla" else 2 * cfg.num_kv_heads * cfg.head_dim
  return cfg.num_layers * width * jnp.dtype(cfg.jnp_dtype).itemsize


def compiled_bytes_per_token(cfg: TransformerConfig, length: int = 256, batch: int = 1) -> float:
  """The cache's bytes per token in a compiled one-token decode step with a cache of `length`:
  memory_analysis().argument_size_in_bytes less the params' and the token arrays' bytes (from
  their abstract shapes), over batch x length."""
  model = Transformer(cfg)
  tok_B1 = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tok_B1, tok_B1, tok_B1)["params"]
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, length))

  def step(params, tok_B1, pos_B1, cache):
    return model.apply({"params": params}, tok_B1, pos_B1, jnp.ones_like(tok_B1), cache)

  compiled = jax.jit(step).lower(params, tok_B1, tok_B1, cache).compile()
  others = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((params, tok_B1, tok_B1)))
  per_token = (compiled.memory_analysis().argument_size_in_bytes - others) / (batch * length)
  return int(per_token) if per_token.is_integer() else per_token


def main() -> None:
  cfg = DEEPSEEK_V3
  m = cfg.mla
  formula = formula_bytes_per_token(cfg)
  print(
    f"deepseek_v3 MLA cache: {cfg.num_layers} layers x (kv_lora_rank {m.kv_lora_rank} + "
    f"qk_rope_head_dim {m.qk_rope_head_dim}) x {jnp.dtype(cfg.jnp_dtype).itemsize} bytes "
    f"({cfg.dtype})"
  )
  print(f"formula: {formula:,} bytes per token")
  compiled = compiled_bytes_per_token(cfg)
  print(f"compiled decode step ({jax.default_backend()}): {compiled:,} bytes per token")
  # what multi-head attention would cache: every head's key (N + P) and value (V)
  mha = cfg.num_layers * cfg.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
  mha *= jnp.dtype(cfg.jnp_dtype).itemsize
  print(f"MHA of the same heads would cache {mha:,} bytes per token, {mha / formula:.1f}x MLA's")
  print(f"mla_cache_bytes_per_token={compiled}")
  np.testing.assert_equal(compiled, formula)


if __name__ == "__main__":
  main()
