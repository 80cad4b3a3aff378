"""Transformer stacks built from shared blocks.

`Transformer` is one stack of blocks with a token embedding and a head; the mask
kind decides whether it is a decoder (causal) or an encoder (bidirectional).
Layers may be scanned (`nn.scan`), rematerialized, or all share one set of weights
(ALBERT). Blocks are pre-norm (GPT-2, Llama, modern encoders) or post-norm (BERT).

Heads (`cfg.head`), all on the same stack, so a pretrained stack's parameters keep
their names under any head:
  lm        logits [B, L, V]: tied embedding or a separate `head` matrix
  mlm       logits [B, L, V]: dense + GELU + norm, then the tied embedding and a bias (BERT)
  classify  logits [B, C] from the pooled sequence: dense + tanh pooler, then C outputs
  tokens    logits [B, L, C]: one label per token (NER)
  pool      the pooled sequence [B, D] (sentence embeddings)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from modeling.attention import Attention
from modeling.layers import Dense, Embed, Mlp, Norm, param_with_axes
from modeling.quant import make_dot_general

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
  norm_position: str = "pre"  # pre | post
  type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0: none
  embed_dim: int = 0  # factorized embedding width (ALBERT); 0: d_model
  share_layers: bool = False  # every layer uses one set of weights (ALBERT)
  head: str = "lm"  # lm | mlm | classify | tokens | pool
  num_labels: int = 0  # outputs of the classify / tokens heads
  pooling: str = "cls"  # cls (first token) | mean (over the sequence's tokens)
  time_conditioning: bool = False  # diffusion: add an embedding of the time t to the input
  quant: str = "none"  # none | bitnet158 | bitnet1: the body's linear layers (modeling/quant.py)
  quant_deployed: bool = False  # kernels hold already-quantized weights (a packed checkpoint)

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]


class Block(nn.Module):
  """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
  Post-norm: norm(x + attn(x)), then norm(x + mlp(x))."""

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
    pre = c.norm_position == "pre"
    attn_norm, mlp_norm = Norm(name="attn_norm", **norm), Norm(name="mlp_norm", **norm)
    quantized = c.quant != "none"
    linear = dict(
      dot_general=make_dot_general(c.quant, c.quant_deployed),
      sub_norm=norm if quantized else None,  # SubLN (BitNet b1.58 2B4T)
    )
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
      **linear,
    )(attn_norm(x_BLD) if pre else x_BLD, pos_BL, seg_BL, cache, self.deterministic)
    x_BLD = x_BLD + h_BLD if pre else attn_norm(x_BLD + h_BLD)
    h_BLD = Mlp(
      d_ff=c.d_ff,
      kind=c.mlp,
      use_bias=c.use_bias,
      dropout=c.dropout,
      dtype=dtype,
      out_init_scale=out_scale,
      name="mlp",
      **linear,
    )(mlp_norm(x_BLD) if pre else x_BLD, self.deterministic)
    x_BLD = x_BLD + h_BLD if pre else mlp_norm(x_BLD + h_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))
    return x_BLD, cache


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> dict[str, jax.Array]:
  """An empty KV cache, stacked over layers: k, v of [layers, B, S, G, K]."""
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}


def pool(x_BLD: jax.Array, seg_BL: jax.Array, kind: str) -> jax.Array:
  """[B, D]: the first token (CLS) or the mean over the row's non-padding tokens."""
  if kind == "cls":
    return x_BLD[:, 0]
  w_BL = (seg_BL > 0).astype(x_BLD.dtype)
  return jnp.einsum("bld,bl->bd", x_BLD, w_BL) / jnp.maximum(w_BL.sum(-1, keepdims=True), 1.0)


class TimeEmbedding(nn.Module):
  """[B] times in [0, 1] -> [B, width]: sinusoidal features of 1000 t, then dense, SiLU, dense
  (the diffusion time conditioning of DiT/MDLM, added to the token embeddings)."""

  width: int
  axis: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B: jax.Array) -> jax.Array:
    half = 128
    freqs = jnp.exp(-jnp.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_BH = 1000.0 * t_B.astype(jnp.float32)[:, None] * freqs
    feats_BF = jnp.concatenate([jnp.cos(angles_BH), jnp.sin(angles_BH)], axis=-1)
    h = Dense((self.width,), (None,), ("factor",), True, self.dtype, name="time_in")(feats_BF)
    return Dense((self.width,), ("factor",), (self.axis,), True, self.dtype, name="time_out")(
      nn.silu(h)
    )


class Transformer(nn.Module):
  """Token ids -> the head's output (float32), with an optional KV cache."""

  cfg: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
    cache: dict | None = None,
    deterministic: bool = True,
    token_types_BL: jax.Array | None = None,
    time_B: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    c = self.cfg
    dtype = c.jnp_dtype
    norm = dict(kind=c.norm, eps=c.norm_eps, use_bias=c.use_bias, dtype=dtype)
    factorized = bool(c.embed_dim) and c.embed_dim != c.d_model
    embed_axes = ("vocab", "factor") if factorized else ("vocab", "embed")
    embed = Embed(
      c.vocab_size, c.embed_dim or c.d_model, dtype=dtype, axes=embed_axes, name="embed"
    )
    x_BLE = embed(tokens_BL)
    width = c.embed_dim or c.d_model
    width_axis = embed_axes[1]
    if c.position == "learned":
      table = param_with_axes(
        self, "pos_embedding", nn.initializers.normal(0.01), (c.max_len, width), (None, width_axis)
      )
      x_BLE = x_BLE + jnp.take(table, positions_BL, axis=0).astype(dtype)
    if c.type_vocab_size:
      types = param_with_axes(
        self,
        "type_embedding",
        nn.initializers.normal(0.02),
        (c.type_vocab_size, width),
        (None, width_axis),
      )
      ids_BL = jnp.zeros_like(tokens_BL) if token_types_BL is None else token_types_BL
      x_BLE = x_BLE + jnp.take(types, ids_BL, axis=0).astype(dtype)
    if c.time_conditioning:
      t_B = jnp.zeros(tokens_BL.shape[:1], jnp.float32) if time_B is None else time_B
      x_BLE = x_BLE + TimeEmbedding(width, width_axis, dtype, name="time_embed")(t_B)[:, None, :]
    if c.norm_position == "post":  # BERT normalizes the embeddings, not the last block
      x_BLE = Norm(name="embed_norm", **norm)(x_BLE)
    if factorized:
      x_BLE = Dense((c.d_model,), ("factor",), ("embed",), dtype=dtype, name="embed_proj")(x_BLE)
    x_BLD = nn.Dropout(c.dropout)(x_BLE, deterministic=deterministic)
    x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))

    block = Block
    policy = REMAT_POLICIES[c.remat]
    if c.remat != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
    if c.share_layers:  # one block, applied num_layers times
      shared = block(c, deterministic, name="shared_block")
      for _ in range(c.num_layers):
        x_BLD, _ = shared(x_BLD, positions_BL, segment_ids_BL, None)
    elif c.scan_layers:
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
    if c.norm_position == "pre":
      x_BLD = Norm(name="final_norm", **norm)(x_BLD)
    return self.head(x_BLD, segment_ids_BL, embed, deterministic), cache

  def head(self, x_BLD, seg_BL, embed: Embed, deterministic: bool) -> jax.Array:
    c = self.cfg
    dtype = c.jnp_dtype
    if c.head == "lm":
      if c.tie_embeddings:
        logits_BLV = embed.attend(x_BLD)
      else:
        head = Dense((c.vocab_size,), ("embed",), ("vocab",), dtype=dtype, name="head")
        logits_BLV = head(x_BLD)
      logits_BLV = nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
      return logits_BLV.astype(jnp.float32)
    if c.head == "mlm":
      width = c.embed_dim or c.d_model
      h_BLE = Dense(
        (width,), ("embed",), ("factor",), use_bias=True, dtype=dtype, name="mlm_transform"
      )(x_BLD)
      h_BLE = Norm(c.norm, c.norm_eps, True, dtype, name="mlm_norm")(nn.gelu(h_BLE))
      bias_V = self.param(
        "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (c.vocab_size,)
      )
      logits_BLV = embed.attend(h_BLE) + bias_V.astype(dtype)
      logits_BLV = nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
      return logits_BLV.astype(jnp.float32)
    if c.head == "tokens":
      x_BLD = nn.Dropout(c.dropout)(x_BLD, deterministic=deterministic)
      out = Dense((c.num_labels,), ("embed",), ("labels",), True, dtype, name="token_classifier")
      return out(x_BLD).astype(jnp.float32)
    pooled_BD = pool(x_BLD, seg_BL, c.pooling)
    if c.head == "pool":
      return pooled_BD.astype(jnp.float32)
    # classify: BERT's pooler (dense + tanh) then the classifier
    pooled_BD = jnp.tanh(
      Dense((c.d_model,), ("embed",), ("factor",), True, dtype, name="pooler")(pooled_BD)
    )
    pooled_BD = nn.Dropout(c.dropout)(pooled_BD, deterministic=deterministic)
    out = Dense((c.num_labels,), ("factor",), ("labels",), True, dtype, name="classifier")
    return out(pooled_BD).astype(jnp.float32)
