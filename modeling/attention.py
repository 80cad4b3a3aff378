"""Attention: one function for MHA / GQA / MQA, masks, RoPE, and a KV cache.

Masks are built from positions and segment ids, so packed sequences never
attend across documents, and a KV cache is just keys at known positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from modeling.layers import Dense, DotGeneral

MASK_KINDS = ("causal", "bidirectional")
ATTENTION_IMPLS = ("xla", "cudnn")
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


def apply_rope(x_BLHK: jax.Array, pos_BL: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half layout), computed in float32."""
  half = x_BLHK.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BL1F = (pos_BL.astype(jnp.float32)[:, :, None] * freq)[:, :, None, :]
  sin, cos = jnp.sin(angle_BL1F), jnp.cos(angle_BL1F)
  x = x_BLHK.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)


def attend(
  q_BLHK: jax.Array,
  k_BSGK: jax.Array,
  v_BSGK: jax.Array,
  mask_B1LS: jax.Array,
  impl: str = "xla",
) -> jax.Array:
  """Softmax attention of H query heads over G kv heads (H % G == 0)."""
  b, q_len, h, k = q_BLHK.shape
  g = k_BSGK.shape[2]
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
      q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS, implementation="cudnn"
    )
  if impl != "xla":
    raise ValueError(f"model.attention_impl={impl!r}: allowed {ATTENTION_IMPLS}")
  q_BLGRK = q_BLHK.reshape(b, q_len, g, h // g, k)
  logits = jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32)
  logits = logits * (k**-0.5)
  logits = jnp.where(mask_B1LS[:, :, None], logits, _NEG)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BSGK.dtype)
  out = jnp.einsum("bgrls,bsgk->blgrk", probs, v_BSGK)
  return out.reshape(b, q_len, h, k)


def write_cache(cache_BSGK: jax.Array, new_BLGK: jax.Array, pos_BL: jax.Array) -> jax.Array:
  """Scatters new keys/values into the cache at their positions."""
  b_idx = jnp.arange(cache_BSGK.shape[0])[:, None]
  return cache_BSGK.at[b_idx, pos_BL].set(new_BLGK.astype(cache_BSGK.dtype))


class Attention(nn.Module):
  """Self-attention with q/k/v/o projections, optional RoPE and KV cache."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mask_kind: str = "causal"
  window: int = 0
  rope: bool = False
  rope_theta: float = 10000.0
  impl: str = "xla"
  use_bias: bool = False
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  out_init_scale: float = 0.02
  dot_general: DotGeneral = lax.dot_general

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    pos_BL: jax.Array,
    seg_BL: jax.Array,
    cache: dict[str, jax.Array] | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    dense = dict(dtype=self.dtype, use_bias=self.use_bias, dot_general=self.dot_general)
    h, g, k = self.num_heads, self.num_kv_heads, self.head_dim
    q_BLHK = Dense((h, k), ("embed",), ("heads", "head_dim"), name="query", **dense)(x_BLD)
    k_BLGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="key", **dense)(x_BLD)
    v_BLGK = Dense((g, k), ("embed",), ("kv_heads", "head_dim"), name="value", **dense)(x_BLD)
    if self.rope:
      q_BLHK = apply_rope(q_BLHK, pos_BL, self.rope_theta)
      k_BLGK = apply_rope(k_BLGK, pos_BL, self.rope_theta)
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
    mask = make_mask(pos_BL, kv_pos_BS, seg_BL, kv_seg_BS, self.mask_kind, self.window)
    out_BLHK = attend(q_BLHK, k_BSGK, v_BSGK, mask, self.impl)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ("act_batch", "act_length", "act_heads", None))
    y_BLD = Dense(
      (x_BLD.shape[-1],),
      ("heads", "head_dim"),
      ("embed",),
      name="out",
      kernel_init=nn.initializers.normal(self.out_init_scale),
      **dense,
    )(out_BLHK)
    return nn.Dropout(self.dropout)(y_BLD, deterministic=deterministic), cache
