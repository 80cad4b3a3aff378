"""Transformer stacks built from shared blocks.

`Transformer` is one stack of blocks with a token embedding and a head; the mask
kind decides whether it is a decoder (causal) or an encoder (bidirectional).
`EncoderDecoder` (T5) is two stacks of the same blocks sharing one embedding: a
bidirectional encoder, and a causal decoder whose blocks add cross-attention.
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
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from modeling.attention import Attention
from modeling.deberta import DisentangledAttention, RelativeEmbeddings
from modeling.layers import Dense, Embed, Mlp, NeighborMix, Norm, gelu, param_with_axes
from modeling.lora import Lora
from modeling.mla import LatentAttention, Mla
from modeling.moe import Moe, MoeMlp
from modeling.quant import make_dot_general
from modeling.rope import Rope

REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
POSITIONS = ("learned", "rope", "relative", "alibi", "none", "disentangled")  # + DeBERTa
NORM_POSITIONS = ("pre", "post")  # x + f(norm(x)), or norm(x + f(x)) (BERT)
ATTENTIONS = ("mha", "mla")  # multi-head (GQA, MQA), multi-head latent (modeling/mla.py)
BLOCKS = ("serial", "parallel")  # attention then MLP, or both from one norm (PaLM, GPT-J)


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
  rope: Rope = Rope()  # position="rope": theta, partial rotation, context scaling
  position_offset: int = 0  # position="learned": the table row of position 0 (RoBERTa: 2)
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  mlp: str = "gelu"
  gelu: str = "tanh"  # tanh | erf: every GELU (MLP, GeGLU, MLM head)
  scale_attention: bool = True  # logits scaled by 1/sqrt(head_dim); False: T5 (unscaled)
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout: float = 0.0
  sliding_window: int = 0
  attention_impl: str = "xla"
  dtype: str = "float32"
  scan_layers: bool = True
  remat: str = "none"
  norm_position: str = "pre"  # pre | post
  block: str = "serial"  # serial | parallel: x + attn(norm(x)) + mlp(norm(x)), one norm (PaLM)
  embed_norm: bool = False  # a norm on the embeddings of a pre-norm stack (BLOOM)
  type_vocab_size: int = 0  # token-type (segment A/B) embeddings; 0: none
  embed_dim: int = 0  # factorized embedding width (ALBERT); 0: d_model
  share_layers: bool = False  # every layer uses one set of weights (ALBERT)
  head: str = "lm"  # lm | mlm | classify | tokens | pool
  num_labels: int = 0  # outputs of the classify / tokens heads
  pooling: str = (
    "cls"  # cls (first token) | mean (over the tokens) | pooler (BERT's tanh(dense(cls)))
  )
  time_conditioning: bool = False  # diffusion: add an embedding of the time t to the input
  quant: str = "none"  # none | bitnet158 | bitnet1: the body's linear layers (modeling/quant.py)
  quant_deployed: bool = False  # kernels hold already-quantized weights (a packed checkpoint)
  num_decoder_layers: int = 0  # encoder-decoder: decoder blocks; 0: num_layers
  rel_buckets: int = 32  # position="relative": T5's log-spaced buckets
  rel_max_distance: int = 128  # position="relative": distances beyond share the last bucket
  neighbor_mix: int = 0  # bidirectional stacks: positions also read +-this many neighbours' inputs
  lora: Lora = Lora()  # adapters on the blocks' Dense layers; rank 0: none (modeling/lora.py)
  moe: Moe = Moe()  # mixture of experts in place of the MLP; num_experts 0: none (modeling/moe.py)
  attention: str = "mha"  # ATTENTIONS: the self-attention of every block
  mla: Mla = Mla()  # attention="mla": its sizes (modeling/mla.py)
  position_buckets: int = 256  # position="disentangled": DeBERTa-v2's log buckets per side
  max_relative_positions: int = 512  # position="disentangled": where the log buckets end
  emd_layers: int = 0  # head="mlm": passes of DeBERTa's enhanced mask decoder; 0: none

  @property
  def jnp_dtype(self) -> jnp.dtype:
    return DTYPES[self.dtype]


class Block(nn.Module):
  """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)).
  Post-norm: norm(x + attn(x)), then norm(x + mlp(x)).
  Parallel (`block="parallel"`, pre-norm; PaLM, Chowdhery et al. 2022, sec. 2, after
  GPT-J): x + attn(norm(x)) + mlp(norm(x)), one norm feeding both sublayers.

  With `cross`, a cross-attention sublayer over the encoder's output sits between the two
  (T5's decoder). `ctx` holds what every layer shares: the relative-position `bias`, and
  the encoder's output `enc` (None when decoding from a cache) and `enc_seg`.
  With `routed`, a mixture of experts (modeling/moe.py) stands in for the MLP.
  """

  cfg: TransformerConfig
  deterministic: bool = True
  cross: bool = False
  routed: bool = False

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    pos_BL: jax.Array,
    seg_BL: jax.Array,
    cache: dict | None,
    ctx: dict | None = None,
  ) -> tuple[jax.Array, dict | None]:
    c = self.cfg
    ctx = ctx or {}
    dtype = c.jnp_dtype
    out_scale = 0.02 / (2 * c.num_layers) ** 0.5  # GPT-2's scaled init of residual outputs
    norm = dict(kind=c.norm, eps=c.norm_eps, use_bias=c.use_bias, dtype=dtype)
    pre = c.norm_position == "pre"
    attn_norm, mlp_norm = Norm(name="attn_norm", **norm), Norm(name="mlp_norm", **norm)
    quantized = c.quant != "none"
    mix = ctx.get("quant_mix")  # a conversion's lambda (quant_mix), else None
    linear = dict(
      dot_general=make_dot_general(c.quant, c.quant_deployed, mix),
      sub_norm=(norm if mix is None else {**norm, "mix": mix}) if quantized else None,  # SubLN
      lora=c.lora,
    )
    attention = dict(
      num_heads=c.num_heads,
      num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim,
      impl=c.attention_impl,
      scale=None if c.scale_attention else 1.0,
      use_bias=c.use_bias,
      dropout=c.dropout,
      dtype=dtype,
      out_init_scale=out_scale,
      **linear,
    )
    self_attention, self_keys = Attention, ("k", "v")
    if c.attention == "mla":  # the latent cache; quantized layers decode in the expanded form
      mla = dict(mla=c.mla, norm_eps=c.norm_eps, absorb=not quantized)
      self_attention, self_keys = functools.partial(LatentAttention, **mla), ("c_kv",)
    self_cache = None if cache is None else {k: cache[k] for k in self_keys}
    attn_in_BLD = attn_norm(x_BLD) if pre else x_BLD
    if c.position == "disentangled":  # DeBERTa; the enhanced mask decoder's keys: ctx["kv"]
      h_BLD = DisentangledAttention(name="attn", **attention)(
        attn_in_BLD, pos_BL, seg_BL, ctx["rel"], self.deterministic, ctx.get("kv")
      )
    else:
      h_BLD, self_cache = self_attention(
        mask_kind=c.mask_kind,
        window=c.sliding_window,
        rope=c.rope if c.position == "rope" else None,
        name="attn",
        **attention,
      )(
        attn_in_BLD,
        pos_BL,
        seg_BL,
        self_cache,
        self.deterministic,
        ctx.get("bias"),
      )
    x_BLD = x_BLD + h_BLD if pre else attn_norm(x_BLD + h_BLD)
    if self.cross:
      cross_norm = Norm(name="cross_norm", **norm)
      cross_cache = None if cache is None else {"k": cache["ck"], "v": cache["cv"]}
      h_BLD, cross_cache = Attention(cross=True, name="cross_attn", **attention)(
        cross_norm(x_BLD) if pre else x_BLD,
        pos_BL,
        seg_BL,
        cross_cache,
        self.deterministic,
        kv_BSD=ctx.get("enc"),
        kv_seg_BS=ctx["enc_seg"],
      )
      x_BLD = x_BLD + h_BLD if pre else cross_norm(x_BLD + h_BLD)
    if cache is not None:
      cache = dict(self_cache)
      if self.cross:
        cache.update(ck=cross_cache["k"], cv=cross_cache["v"])
    if c.block == "parallel":  # the MLP reads what attention read (cross-attention aside)
      mlp_in_BLD = attn_in_BLD
    else:
      mlp_in_BLD = mlp_norm(x_BLD) if pre else x_BLD
    if self.routed:
      moe = MoeMlp(c.moe, dtype, out_scale, linear["dot_general"], linear["sub_norm"], name="moe")
      h_BLD = nn.Dropout(c.dropout)(moe(mlp_in_BLD, seg_BL), deterministic=self.deterministic)
    else:
      h_BLD = Mlp(
        d_ff=c.d_ff,
        kind=c.mlp,
        gelu=c.gelu,
        use_bias=c.use_bias,
        dropout=c.dropout,
        dtype=dtype,
        out_init_scale=out_scale,
        name="mlp",
        **linear,
      )(mlp_in_BLD, self.deterministic)
    x_BLD = x_BLD + h_BLD if pre else mlp_norm(x_BLD + h_BLD)
    x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))
    return x_BLD, cache


def init_cache(cfg: TransformerConfig, batch: int, length: int) -> dict[str, jax.Array]:
  """An empty KV cache, stacked over layers: k, v of [layers, B, S, G, K]; with MLA, c_kv of
  [layers, B, S, kv_lora_rank + qk_rope_head_dim] (the latent and the rotated shared key)."""
  if cfg.attention == "mla":
    shape = (cfg.num_layers, batch, length, cfg.mla.cache_width)
    return {"c_kv": jnp.zeros(shape, cfg.jnp_dtype)}
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}


def init_encdec_cache(cfg: TransformerConfig, batch: int, src_len: int, length: int) -> dict:
  """An empty encoder-decoder cache: the decoder's self-attention k, v [layers, B, length,
  G, K], cross-attention ck, cv [layers, B, src_len, G, K] (written by the first call,
  which runs the encoder) and the source's segment ids."""
  layers = cfg.num_decoder_layers or cfg.num_layers
  self_shape = (layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  cross_shape = (layers, batch, src_len, cfg.num_kv_heads, cfg.head_dim)
  dt = cfg.jnp_dtype
  return {
    "k": jnp.zeros(self_shape, dt),
    "v": jnp.zeros(self_shape, dt),
    "ck": jnp.zeros(cross_shape, dt),
    "cv": jnp.zeros(cross_shape, dt),
    "src_segment_ids": jnp.zeros((batch, src_len), jnp.int32),
  }


def relative_buckets(
  rel_BLS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """T5's bucket of each relative position (key position - query position).

  Half the buckets (all of them, one-sided) hold the exact distances 0 .. n/2 - 1; the
  rest cover n/2 .. max_distance with logarithmically growing widths, and every longer
  distance shares the last. Bidirectional buckets give keys after the query the upper
  half. A causal stack only looks back, so later keys fall into bucket 0 (masked anyway).
  """
  n = num_buckets // 2 if bidirectional else num_buckets
  offset_BLS = jnp.where(rel_BLS > 0, n, 0) if bidirectional else jnp.zeros_like(rel_BLS)
  dist_BLS = jnp.abs(rel_BLS) if bidirectional else jnp.maximum(-rel_BLS, 0)
  exact = n // 2
  safe_BLS = jnp.maximum(dist_BLS, exact).astype(jnp.float32)
  log_BLS = jnp.log(safe_BLS / exact) / jnp.log(max_distance / exact) * (n - exact)
  far_BLS = jnp.minimum(exact + log_BLS.astype(jnp.int32), n - 1)
  return offset_BLS + jnp.where(dist_BLS < exact, dist_BLS, far_BLS)


class RelativeBias(nn.Module):
  """[B, H, L, S] additive attention bias: one learned scalar per (bucket, head), shared by
  every layer of a stack (T5)."""

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, q_pos_BL: jax.Array, kv_pos_BS: jax.Array) -> jax.Array:
    table = param_with_axes(
      self,
      "embedding",
      nn.initializers.normal(0.1),
      (self.num_buckets, self.num_heads),
      (None, "heads"),
    )
    rel_BLS = kv_pos_BS[:, None, :] - q_pos_BL[:, :, None]
    buckets_BLS = relative_buckets(rel_BLS, self.bidirectional, self.num_buckets, self.max_distance)
    return jnp.take(table, buckets_BLS, axis=0).transpose(0, 3, 1, 2)


def key_positions(pos_BL: jax.Array, cache: dict | None) -> jax.Array:
  """[B, S]: the keys' positions; with a KV cache, keys sit at their positions in it."""
  if cache is None:
    return pos_BL
  s = cache["k"].shape[2]
  return jnp.broadcast_to(jnp.arange(s, dtype=pos_BL.dtype), (pos_BL.shape[0], s))


def alibi_slopes(num_heads: int) -> np.ndarray:
  """[H] ALiBi's slopes (Press et al. 2022, "Train Short, Test Long", sec. 3): for n, the
  largest power of two <= H, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); the
  other H - n heads take the odd terms of the sequence for 2n heads, 2^(-4/n), 2^(-12/n),
  ... (the paper's code and BLOOM's `_get_alibi_slopes`)."""
  n = 2 ** math.floor(math.log2(num_heads))
  slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
  extra = 2.0 ** (-4.0 * np.arange(1, 2 * (num_heads - n), 2) / n)
  return np.concatenate([slopes, extra])


def alibi_bias(num_heads: int, q_pos_BL: jax.Array, kv_pos_BS: jax.Array) -> jax.Array:
  """[B, H, L, S] float32: -m_h * |key position - query position|. For the keys a causal
  query sees this is ALiBi's m_h * (j - i); BLOOM adds m_h * j, equal after the softmax
  (constant along each row). A bidirectional stack gets the same penalty on both sides."""
  dist_BLS = jnp.abs(kv_pos_BS[:, None, :] - q_pos_BL[:, :, None]).astype(jnp.float32)
  slopes_H = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  return -slopes_H[None, :, None, None] * dist_BLS[:, None]


def run_stack(
  c: TransformerConfig,
  deterministic: bool,
  x_BLD: jax.Array,
  pos_BL: jax.Array,
  seg_BL: jax.Array,
  cache: dict | None,
  ctx: dict | None = None,
  prefix: str = "",
  cross: bool = False,
) -> tuple[jax.Array, dict | None]:
  """The blocks (scanned, looped, or one shared) and the final norm, as submodules of the
  calling module named `{prefix}blocks` / `{prefix}block_{i}` / `{prefix}final_norm`.
  With `position="relative"` it adds `{prefix}rel_bias`, computed once for all layers;
  `position="alibi"` computes its fixed bias once for all layers."""
  ctx = dict(ctx or {})
  if c.position == "alibi":
    ctx["bias"] = alibi_bias(c.num_heads, pos_BL, key_positions(pos_BL, cache))
  if c.position == "relative":
    kv_pos_BS = key_positions(pos_BL, cache)
    ctx["bias"] = RelativeBias(
      c.num_heads,
      c.mask_kind != "causal",
      c.rel_buckets,
      c.rel_max_distance,
      name=f"{prefix}rel_bias",
    )(pos_BL, kv_pos_BS).astype(c.jnp_dtype)
  block = Block
  if c.remat != "none":
    block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
  if c.share_layers:  # one block, applied num_layers times
    shared = block(c, deterministic, cross, name=f"{prefix}shared_block")
    for _ in range(c.num_layers):
      x_BLD, _ = shared(x_BLD, pos_BL, seg_BL, None, ctx)
  elif c.scan_layers:  # one scanned group per kind of layer: MoE's dense first layers apart
    dense = min(c.moe.first_dense_layers, c.num_layers) if c.moe.num_experts else c.num_layers
    groups = [("dense_blocks", 0, dense, False), ("blocks", dense, c.num_layers, True)]
    groups = [g for g in groups if g[2] > g[1]]
    if len(groups) == 1:  # every layer alike: the one group `blocks`
      groups = [("blocks", 0, c.num_layers, c.moe.num_experts > 0)]
    caches = []
    for name, start, stop, routed in groups:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=stop - start,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, deterministic, cross, routed, name=f"{prefix}{name}")
      group_cache = cache
      if cache is not None and len(groups) > 1:
        group_cache = jax.tree.map(lambda a, s=start, e=stop: a[s:e], cache)
      x_BLD, group_cache = stack(x_BLD, pos_BL, seg_BL, group_cache, ctx)
      caches.append(group_cache)
    if cache is not None:
      cache = (
        caches[0] if len(caches) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *caches)
      )
  else:
    new_layers = []
    for i in range(c.num_layers):
      layer_cache = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
      routed = c.moe.is_moe(i)
      x_BLD, layer_cache = block(c, deterministic, cross, routed, name=f"{prefix}block_{i}")(
        x_BLD, pos_BL, seg_BL, layer_cache, ctx
      )
      new_layers.append(layer_cache)
    if cache is not None:
      cache = jax.tree.map(lambda *a: jnp.stack(a), *new_layers)
  if c.norm_position == "pre":
    norm = dict(kind=c.norm, eps=c.norm_eps, use_bias=c.use_bias, dtype=c.jnp_dtype)
    x_BLD = Norm(name=f"{prefix}final_norm", **norm)(x_BLD)
  return x_BLD, cache


def quant_mix(module: nn.Module) -> dict:
  """{"quant_mix": lambda} when the caller's variables hold one (collection `quant`, name
  `mix`: a conversion's blend from float to quantized, modeling/quant.py), else {}: what
  every block reads from its ctx."""
  if not module.has_variable("quant", "mix"):
    return {}
  return {"quant_mix": module.get_variable("quant", "mix")}


POOLINGS = ("cls", "mean", "pooler")  # task.pooling


def pool(x_BLD: jax.Array, seg_BL: jax.Array, kind: str) -> jax.Array:
  """[B, D]: the first token (CLS; also under BERT's pooler) or the mean over the row's
  non-padding tokens."""
  if kind in ("cls", "pooler"):
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
      rows = c.max_len + c.position_offset
      table = param_with_axes(
        self, "pos_embedding", nn.initializers.normal(0.01), (rows, width), (None, width_axis)
      )
      x_BLE = x_BLE + jnp.take(table, positions_BL + c.position_offset, axis=0).astype(dtype)
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
    if c.norm_position == "post" or c.embed_norm:  # BERT (not the last block), BLOOM (both)
      x_BLE = Norm(name="embed_norm", **norm)(x_BLE)
    if factorized:
      x_BLE = Dense((c.d_model,), ("factor",), ("embed",), dtype=dtype, name="embed_proj")(x_BLE)
    x_BLD = nn.Dropout(c.dropout)(x_BLE, deterministic=deterministic)
    if c.neighbor_mix:
      x_BLD = NeighborMix(c.neighbor_mix, dtype, name="neighbor_mix")(x_BLD, segment_ids_BL)
    x_BLD = nn.with_logical_constraint(x_BLD, ("act_batch", "act_length", "act_embed"))

    ctx = quant_mix(self)
    if c.position == "disentangled":  # one relative table for every layer (DeBERTa)
      rel = RelativeEmbeddings(
        c.d_model, c.position_buckets, c.max_relative_positions, c.max_len, norm, name="rel_embed"
      )
      ctx = {**ctx, "rel": rel(positions_BL)}
    x_BLD, cache = run_stack(c, deterministic, x_BLD, positions_BL, segment_ids_BL, cache, ctx)
    self.sow("intermediates", "hidden", x_BLD)  # the final hidden state (distillation's cos)
    if c.emd_layers and c.head == "mlm":
      x_BLD = self.enhanced_mask_decoder(x_BLD, positions_BL, segment_ids_BL, ctx, deterministic)
    return self.head(x_BLD, segment_ids_BL, embed, deterministic), cache

  def enhanced_mask_decoder(self, h_BLD, pos_BL, seg_BL, ctx, deterministic) -> jax.Array:
    """DeBERTa's EMD (He et al. 2021, sec. 3.2): absolute positions enter only here, for
    the MLM head. Queries start from the stack's output H plus an absolute position
    embedding; keys and values stay H; one block, its weights shared by the emd_layers
    passes, each reading the previous pass's output as its queries."""
    c = self.cfg
    table = param_with_axes(
      self, "emd_positions", nn.initializers.normal(0.02), (c.max_len, c.d_model), (None, "embed")
    )
    q_BLD = h_BLD + jnp.take(table, pos_BL, axis=0).astype(c.jnp_dtype)
    block = Block(c, deterministic, name="emd_block")
    for _ in range(c.emd_layers):
      q_BLD, _ = block(q_BLD, pos_BL, seg_BL, None, {**ctx, "kv": h_BLD})
    return q_BLD

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
      h_BLE = Norm(c.norm, c.norm_eps, True, dtype, name="mlm_norm")(gelu(h_BLE, c.gelu))
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
    if c.head == "pool" and c.pooling != "pooler":
      return pooled_BD.astype(jnp.float32)
    # BERT's pooler (dense + tanh); classify then adds the classifier
    pooled_BD = jnp.tanh(
      Dense((c.d_model,), ("embed",), ("factor",), True, dtype, name="pooler")(pooled_BD)
    )
    if c.head == "pool":
      return pooled_BD.astype(jnp.float32)
    pooled_BD = nn.Dropout(c.dropout)(pooled_BD, deterministic=deterministic)
    out = Dense((c.num_labels,), ("factor",), ("labels",), True, dtype, name="classifier")
    return out(pooled_BD).astype(jnp.float32)


class EncoderDecoder(nn.Module):
  """T5: token ids of the source (encoder) and of the decoder's input -> logits [B, L, V].

  Training passes both sides; the decoder's input (`targets_in_BL`, the targets shifted
  right) defaults to the source, which `init` uses. Decoding passes a cache
  (`init_encdec_cache`): the first call gives the source, runs the encoder once and writes
  every layer's cross-attention keys and values; later calls pass `tokens_BS=None` and
  read them from the cache.
  """

  cfg: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BS: jax.Array | None,
    positions_BS: jax.Array | None,
    segment_ids_BS: jax.Array | None,
    cache: dict | None = None,
    deterministic: bool = True,
    *,
    targets_in_BL: jax.Array | None = None,
    targets_positions_BL: jax.Array | None = None,
    targets_segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict | None]:
    c = self.cfg
    dtype = c.jnp_dtype
    embed = Embed(c.vocab_size, c.d_model, dtype=dtype, name="embed")
    embed_norm = Norm(c.norm, c.norm_eps, c.use_bias, dtype, name="embed_norm")

    def embed_in(ids_BL):  # with c.embed_norm, one norm shared by both sides, as the embedding
      return embed_norm(embed(ids_BL)) if c.embed_norm else embed(ids_BL)

    drop = nn.Dropout(c.dropout)
    constrain = functools.partial(
      nn.with_logical_constraint, logical_axis_resources=("act_batch", "act_length", "act_embed")
    )
    enc_cfg = dataclasses.replace(c, mask_kind="bidirectional")
    dec_cfg = dataclasses.replace(
      c, mask_kind="causal", num_layers=c.num_decoder_layers or c.num_layers
    )
    layers = None if cache is None else {k: v for k, v in cache.items() if k != "src_segment_ids"}
    mix = quant_mix(self)
    ctx = {**mix, "enc": None}
    if tokens_BS is not None:
      x_BSD = constrain(drop(embed_in(tokens_BS), deterministic=deterministic))
      ctx["enc"], _ = run_stack(
        enc_cfg, deterministic, x_BSD, positions_BS, segment_ids_BS, None, mix, prefix="encoder_"
      )
      ctx["enc_seg"] = segment_ids_BS
    else:
      ctx["enc_seg"] = cache["src_segment_ids"]
    if targets_in_BL is None:  # init: the source stands in for the decoder's input
      targets_in_BL, targets_positions_BL, targets_segment_ids_BL = (
        tokens_BS,
        positions_BS,
        segment_ids_BS,
      )
    y_BLD = constrain(drop(embed_in(targets_in_BL), deterministic=deterministic))
    y_BLD, layers = run_stack(
      dec_cfg,
      deterministic,
      y_BLD,
      targets_positions_BL,
      targets_segment_ids_BL,
      layers,
      ctx,
      prefix="decoder_",
      cross=True,
    )
    self.sow("intermediates", "hidden", y_BLD)  # the decoder's final hidden state
    if c.tie_embeddings:  # the original T5 rescales before its tied output layer
      logits_BLV = embed.attend(y_BLD * c.d_model**-0.5)
    else:
      logits_BLV = Dense((c.vocab_size,), ("embed",), ("vocab",), dtype=dtype, name="head")(y_BLD)
    logits_BLV = nn.with_logical_constraint(logits_BLV, ("act_batch", "act_length", "act_vocab"))
    if cache is not None:
      cache = {**layers, "src_segment_ids": ctx["enc_seg"]}
    return logits_BLV.astype(jnp.float32), cache
