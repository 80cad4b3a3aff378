"""Attention: one function for MHA / GQA / MQA, masks, RoPE, and a KV cache.

Masks are built from positions and segment ids, so packed sequences never
attend across documents, and a KV cache is just keys at known positions. An
additive bias [B, H, L, S] (T5's relative positions) joins the logits; cross-
attention takes its keys and values from another sequence (the encoder's).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from modeling.layers import Dense, DotGeneral, subln
from modeling.lora import Lora
from modeling.rope import Rope, apply_rope  # noqa: F401  (apply_rope: re-exported)

MASK_KINDS = ("causal", "bidirectional")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(
  q_pos_BL: jax.Array,
  kv_pos_BS: jax.Array,
  q_seg_BL: jax.Array,
  kv_seg_BS: jax.Array,
  kind: str = "causal",
  window: int = 0,
) -> jax.Array:
  """Boolean mask [B, 1, L, S]: True where a query may attend to a key.

  Always intersected with same-segment; `causal` compares positions (which
  restart at every packed document); `window` > 0 limits how far back a query
  sees (sliding-window attention).
  """
  if kind not in MASK_KINDS:
    raise ValueError(f"mask kind {kind!r}: allowed {MASK_KINDS}")
  q_pos = q_pos_BL[:, :, None]
  kv_pos = kv_pos_BS[:, None, :]
  mask = q_seg_BL[:, :, None] == kv_seg_BS[:, None, :]
  if kind == "causal":
    mask &= kv_pos <= q_pos
  if window > 0:
    mask &= jnp.abs(q_pos - kv_pos) < window
  return mask[:, None, :, :]


def attend(
  q_BLHK: jax.Array,
  k_BSGK: jax.Array,
  v_BSGK: jax.Array,
  mask_B1LS: jax.Array,
  impl: str = "xla",
  causal_blocks: int = 1,
  bias_BHLS: jax.Array | None = None,
  scale: float | None = None,
) -> jax.Array:
  """Softmax attention of H query heads over G kv heads (H % G == 0).

  `causal_blocks` > 1 promises that query i never sees a key after index i (self-
  attention with a causal mask, packed or not): the queries are then split into that
  many blocks, and each block attends only to the keys up to its end, which skips
  most of the masked upper triangle. The result is the same. `bias_BHLS` (float) is added
  to the scaled logits. `scale` multiplies the logits: None is 1/sqrt(head_dim), 1.0 is
  T5's unscaled attention.
  """
  if scale is None:
    scale = q_BLHK.shape[-1] ** -0.5
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
      q_BLHK, k_BSGK, v_BSGK, bias=bias_BHLS, mask=mask_B1LS, scale=scale, implementation="cudnn"
    )
  if impl != "xla":
    raise ValueError(f"model.attention_impl={impl!r}: allowed {ATTENTION_IMPLS}")
  q_len = q_BLHK.shape[1]
  if causal_blocks <= 1:
    return _attend_xla(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS, scale)
  if q_len % causal_blocks or k_BSGK.shape[1] != q_len:
    raise ValueError(f"causal_blocks={causal_blocks} needs equal q/kv lengths divisible by it")
  size = q_len // causal_blocks
  outs = []
  for i in range(causal_blocks):
    q_rows, kv_end = slice(i * size, (i + 1) * size), (i + 1) * size
    outs.append(
      _attend_xla(
        q_BLHK[:, q_rows],
        k_BSGK[:, :kv_end],
        v_BSGK[:, :kv_end],
        mask_B1LS[:, :, q_rows, :kv_end],
        None if bias_BHLS is None else bias_BHLS[:, :, q_rows, :kv_end],
        scale,
      )
    )
  return jnp.concatenate(outs, axis=1)


def causal_blocks_for(q_len: int, block: int = 64) -> int:
  """How many query blocks block-causal attention uses for a sequence length."""
  return q_len // block if q_len % block == 0 and q_len >= 2 * block else 1


def _attend_xla(q_BLHK, k_BSGK, v_BSGK, mask_B1LS, bias_BHLS=None, scale=None) -> jax.Array:
  b, q_len, h, k = q_BLHK.shape
  g = k_BSGK.shape[2]
  # Heads-major layout, with the R = H / G query heads of a kv group stacked along the
  # query axis (Q = R * L): both einsums become plain batched matmuls over [B, G].
  r = h // g
  q_BGQK = (
    (q_BLHK * (k**-0.5 if scale is None else scale))
    .reshape(b, q_len, g, r, k)
    .transpose(0, 2, 3, 1, 4)
    .reshape(b, g, r * q_len, k)
  )
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  logits_BGQS = jnp.einsum("bgqk,bgsk->bgqs", q_BGQK, k_BGSK, preferred_element_type=jnp.float32)
  if bias_BHLS is not None:  # [B, H, L, S] -> [B, G, R * L, S], the layout of the logits
    s_len = k_BSGK.shape[1]
    bias_BGQS = jnp.broadcast_to(bias_BHLS, (b, h, q_len, s_len)).reshape(b, g, r * q_len, s_len)
    logits_BGQS = logits_BGQS + bias_BGQS.astype(jnp.float32)
  mask_B1QS = jnp.tile(mask_B1LS, (1, 1, r, 1)) if r > 1 else mask_B1LS
  logits_BGQS = jnp.where(mask_B1QS, logits_BGQS, _NEG)
  probs_BGQS = jax.nn.softmax(logits_BGQS, axis=-1).astype(v_BSGK.dtype)
  out_BGQK = jnp.einsum("bgqs,bgsk->bgqk", probs_BGQS, v_BGSK)
  v_dim = v_BSGK.shape[-1]  # may differ from the query's (MLA)
  out_BGQV = out_BGQK.reshape(b, g, r, q_len, v_dim).transpose(0, 3, 1, 2, 4)
  return out_BGQV.reshape(b, q_len, h, v_dim)


def attend_splash(
  q_BLHK: jax.Array,
  k_BLGK: jax.Array,
  v_BLGK: jax.Array,
  seg_BL: jax.Array,
  kind: str = "causal",
  window: int = 0,
  interpret: bool = False,
  scale: float | None = None,
) -> jax.Array:
  """Self-attention with the Pallas TPU splash kernel (same result as `attend`).

  Splash takes its masks as static structure (causal, full, local window) plus
  segment ids, so it needs the mask spec, not a mask array. Within a packed row,
  index order is position order, so the index-based masks equal `make_mask`'s.
  `interpret=True` runs the kernel in Pallas's interpreter (any backend, slow).
  The sequence length must be a multiple of 128 (the kernel's block).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as masks,
  )

  b, length, h, k = q_BLHK.shape
  g = k_BLGK.shape[2]
  if length % 128:
    raise ValueError(
      f"attention_impl='splash' needs a sequence length divisible by 128, got {length}"
    )
  shape = (length, length)
  if window > 0:
    mask = masks.LocalMask(shape, (window - 1, 0 if kind == "causal" else window - 1), offset=0)
  elif kind == "causal":
    mask = masks.CausalMask(shape)
  else:
    mask = masks.FullMask(shape)
  block = min(512, length)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  r = h // g
  make = splash.make_splash_mha if r == 1 else splash.make_splash_mqa
  kernel = make(
    masks.MultiHeadMask([mask] * (g if r == 1 else r)),
    block_sizes=sizes,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
  q_BHLK = (q_BLHK * (k**-0.5 if scale is None else scale)).transpose(0, 2, 1, 3)
  k_BGLK, v_BGLK = k_BLGK.transpose(0, 2, 1, 3), v_BLGK.transpose(0, 2, 1, 3)
  seg_BL = seg_BL.astype(jnp.int32)

  def one_row(q_HLK, k_GLK, v_GLK, seg_L):
    ids = splash.SegmentIds(q=seg_L, kv=seg_L)
    if r == 1:
      return kernel(q_HLK, k_GLK, v_GLK, segment_ids=ids)
    q_GRLK = q_HLK.reshape(g, r, length, k)
    per_group = jax.vmap(lambda q, kk, vv: kernel(q, kk, vv, segment_ids=ids))
    return per_group(q_GRLK, k_GLK, v_GLK).reshape(h, length, k)

  out_BHLK = jax.vmap(one_row)(q_BHLK, k_BGLK, v_BGLK, seg_BL)
  return out_BHLK.transpose(0, 2, 1, 3).astype(q_BLHK.dtype)


def write_cache(cache_BSGK: jax.Array, new_BLGK: jax.Array, pos_BL: jax.Array) -> jax.Array:
  """Scatters new keys/values into the cache at their positions."""
  b_idx = jnp.arange(cache_BSGK.shape[0])[:, None]
  return cache_BSGK.at[b_idx, pos_BL].set(new_BLGK.astype(cache_BSGK.dtype))


class Attention(nn.Module):
  """Self- or cross-attention with q/k/v/o projections, optional RoPE, bias and KV cache.

  Cross-attention (`cross=True`) projects keys and values from `kv_BSD` (the encoder's
  output, with `kv_pos_BS`, `kv_seg_BS`); with a cache, those keys and values are written
  once, when `kv_BSD` is given, and read from the cache when it is None.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mask_kind: str = "causal"
  window: int = 0
  rope: Rope | None = None
  scale: float | None = None  # logits scale; None: 1/sqrt(head_dim); 1.0: T5 (unscaled)
  impl: str = "xla"
  use_bias: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  out_init_scale: float = 0.02
  dot_general: DotGeneral = lax.dot_general
  sub_norm: dict | None = None  # Norm kwargs: SubLN before the output projection (BitNet)
  cross: bool = False
  lora: Lora | None = None  # LoRA adapters where lora.targets matches (modeling/lora.py)

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    pos_BL: jax.Array,
    seg_BL: jax.Array,
    cache: dict[str, jax.Array] | None = None,
    deterministic: bool = True,
    bias_BHLS: jax.Array | None = None,
    kv_BSD: jax.Array | None = None,
    kv_pos_BS: jax.Array | None = None,
    kv_seg_BS: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    dense = self._dense_kwargs()
    h, g, k = self.num_heads, self.num_kv_heads, self.head_dim
    q_BLHK = Dense((h, k), ("embed",), ("heads", "head_dim"), name="query", **dense)(x_BLD)
    if self.cross:
      return self._cross(q_BLHK, x_BLD, pos_BL, seg_BL, cache, deterministic, kv_BSD, kv_seg_BS)
    k_BLGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="key", **dense)(x_BLD)
    v_BLGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="value", **dense)(x_BLD)
    if self.rope is not None:
      q_BLHK, k_BLGK = self.rope(q_BLHK, pos_BL), self.rope(k_BLGK, pos_BL)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("act_batch", "act_length", "act_heads", None))

    if cache is None:
      k_BSGK, v_BSGK, kv_pos_BS, kv_seg_BS = k_BLGK, v_BLGK, pos_BL, seg_BL
    else:
      cache = {
        "k": write_cache(cache["k"], k_BLGK, pos_BL),
        "v": write_cache(cache["v"], v_BLGK, pos_BL),
      }
      k_BSGK, v_BSGK = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
      s = k_BSGK.shape[1]
      kv_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=pos_BL.dtype), (x_BLD.shape[0], s))
      kv_seg_BS = jnp.ones_like(kv_pos_BS, dtype=seg_BL.dtype)
      seg_BL = jnp.ones_like(seg_BL)
    if self.impl == "splash" and cache is None:
      out_BLHK = attend_splash(
        q_BLHK, k_BSGK, v_BSGK, seg_BL, self.mask_kind, self.window, scale=self.scale
      )
    else:  # decoding with a cache always takes the XLA path
      mask = make_mask(pos_BL, kv_pos_BS, seg_BL, kv_seg_BS, self.mask_kind, self.window)
      causal = self.mask_kind == "causal" and cache is None
      blocks = causal_blocks_for(x_BLD.shape[1]) if causal else 1
      impl = "xla" if self.impl == "splash" else self.impl
      out_BLHK = attend(q_BLHK, k_BSGK, v_BSGK, mask, impl, blocks, bias_BHLS, self.scale)
    return self._output(out_BLHK, x_BLD, deterministic), cache

  def _cross(self, q_BLHK, x_BLD, pos_BL, seg_BL, cache, deterministic, kv_BSD, kv_seg_BS):
    dense = self._dense_kwargs()
    g, k = self.num_kv_heads, self.head_dim
    if kv_BSD is not None:  # project the encoder's output (training, or the first decode call)
      k_BSGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="key", **dense)(kv_BSD)
      v_BSGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="value", **dense)(kv_BSD)
      if cache is not None:
        cache = {"k": k_BSGK.astype(cache["k"].dtype), "v": v_BSGK.astype(cache["v"].dtype)}
    else:
      k_BSGK, v_BSGK = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
    kv_pos_BS = jnp.zeros(k_BSGK.shape[:2], pos_BL.dtype)  # positions do not matter here
    q_seg_BL = jnp.ones_like(seg_BL) if cache is not None else seg_BL  # decoding: one example
    mask = make_mask(pos_BL, kv_pos_BS, q_seg_BL, kv_seg_BS, "bidirectional")
    impl = "xla" if self.impl == "splash" else self.impl
    out_BLHK = attend(q_BLHK, k_BSGK, v_BSGK, mask, impl, scale=self.scale)
    return self._output(out_BLHK, x_BLD, deterministic), cache

  def _dense_kwargs(self) -> dict:
    return dict(
      dtype=self.dtype, use_bias=self.use_bias, dot_general=self.dot_general, lora=self.lora
    )

  def _output(self, out_BLHK, x_BLD, deterministic) -> jax.Array:
    """SubLN (quantized blocks), the output projection and dropout."""
    dense = self._dense_kwargs()
    h, k = out_BLHK.shape[2:]  # the value width: head_dim, or MLA's v_head_dim
    out_BLHK = nn.with_logical_constraint(out_BLHK, ("act_batch", "act_length", "act_heads", None))
    if self.sub_norm is not None:  # over all heads at once, as the fused projection sees them
      b, n = out_BLHK.shape[:2]
      out_BLF = subln(self.sub_norm, out_BLHK.reshape(b, n, h * k))
      out_BLHK = out_BLF.reshape(b, n, h, k)
    y_BLD = Dense(
      (x_BLD.shape[-1],),
      ("heads", "head_dim"),
      ("embed",),
      name="out",
      kernel_init=nn.initializers.normal(self.out_init_scale),
      **dense,
    )(out_BLHK)
    return nn.Dropout(self.dropout)(y_BLD, deterministic=deterministic)
