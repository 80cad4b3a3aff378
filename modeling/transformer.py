"""Transformer stacks built from shared blocks.

`Transformer` is one stack of pre-norm blocks with a token embedding and a
vocabulary head; the mask kind decides whether it is a decoder (causal) or an
encoder (bidirectional). Layers may be scanned (`nn.scan`) and rematerialized.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from modeling.attention import Attention
from modeling.layers import Dense, Embed, Mlp, Norm, param_with_axes

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """What a transformer stack needs to know; built from `config.model`."""

  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  d_model: int
  d_ff: int
  head_dim: int
  max_len: int
  mask_kind: str = "causal"
  position: str = "learned"
  rope_theta: float = 10000.0
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  mlp: str = "gelu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  sliding_window: int = 0
  attention_impl: str = "xla"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(
    self, x_BLD: jax.Array, pos_BL: jax.Array, seg_BL: jax.Array, cache: dict | None
  ) -> tuple[jax.Array, dict | None]:
    c = self.cfg
    dtype = c.jnp_dtype
    out_scale = 0.02 / (2 * c.num_layers) ** 0.5  # GPT-2's scaled init of residual outputs
    norm = dict(kind=c.norm, eps=c.norm_eps, use_bias=c.use_bias, dtype=dtype)
    h_BLD, cache = Attention(
      num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      mask_kind=c.mask_kind,
      window=c.sliding_window,
      rope=c.position == "rope",
      rope_theta=c.rope_theta,
      impl=c.attention_impl,
      use_bias=c.use_bias,
      dropout=c.dropout,
      dtype=dtype,
      out_init_scale=out_scale,
      name="attn",
    )(Norm(name="attn_norm", **norm)(x_BLD), pos_BL, seg_BL, cache, self.deterministic)
    x_BLD = x_BLD + h_BLD
    h_BLD = Mlp(
      d_ff=c.d_ff,
      kind=c.mlp,
      use_bias=c.use_bias,
      dropout=c.dropout,
      dtype=dtype,
      out_init_scale=out_scale,
      name="mlp",
    )(Norm(name="mlp_norm", **norm)(x_BLD), self.deterministic)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, ("act_batch", "act_length", "act_embed"))
    return x_BLD, cache


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> dict[str, jax.Array]:
  """An empty KV cache, stacked over layers: k, v of [layers, B, S, G, K]."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}


class Transformer(nn.Module):
  """Token ids -> logits [B, L, V] (float32), with an optional KV cache."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
    cache: dict | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict | None]:
    c = self.cfg
    dtype = c.jnp_dtype
    embed = Embed(c.vocab_size, c.d_model, dtype=dtype, name="embed")
    x_BLD = embed(tokens_BL)
    if c.position == "learned":
      table = param_with_axes(
        self, "pos_embedding", nn.initializers.normal(0.01), (c.max_len, c.d_model), (None, "embed")
      )
      x_BLD = x_BLD + jnp.take(table, positions_BL, axis=0).astype(dtype)
    x_BLD = nn.Dropout(c.dropout)(x_BLD, deterministic=deterministic)
    x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))

    block = Block
    policy = REMAT_POLICIES[c.remat]
    if c.remat != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
    if c.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, deterministic, name="blocks")
      x_BLD, cache = stack(x_BLD, positions_BL, segment_ids_BL, cache)
    else:
      new_layers = []
      for i in range(c.num_layers):
        layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
        x_BLD, layer_cache = block(c, deterministic, name=f"block_{i}")(
          x_BLD, positions_BL, segment_ids_BL, layer_cache
        )
        new_layers.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *a: jnp.stack(a), *new_layers)

    x_BLD = Norm(c.norm, c.norm_eps, c.use_bias, dtype, name="final_norm")(x_BLD)
    if c.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      logits_BLV = Dense((c.vocab_size,), ("embed",), ("vocab",), dtype=dtype, name="head")(x_BLD)
    logits_BLV = nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
    return logits_BLV.astype(jnp.float32), cache
