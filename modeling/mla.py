"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv:2405.04434) section 2.1, as used by
DeepSeek-V3 (arXiv:2412.19437) and Kimi K2.

With H heads, a no-position width N, a rotary width P, a value width V and latent ranks R
(keys and values) and Rq (queries, 0: none):

  q          = RMSNorm(x W_DQ) W_UQ          [H, N + P]   (Rq = 0: q = x W_Q)
  [c_KV; kr] = x W_DKV                       [R + P]
  c_KV       = RMSNorm(c_KV)                              the latent, shared by all heads
  [k_N; v]   = c_KV W_UKV                    [H, N + V]
  k_h        = [k_N,h ; RoPE(kr)]                         one rotary key, shared by all heads
  o_h        = softmax(s [q_N,h ; RoPE(q_P,h)] . k_h) v_h,  s = mscale^2 / sqrt(N + P)
  y          = [o_1 .. o_H] W_O

The KV cache holds only [c_KV ; RoPE(kr)]: R + P numbers per token and layer, against
2 G K for grouped-query attention. Decoding from it uses the absorbed form (V2, section
2.1.2): q_N,h . (c_KV W_UK,h) = (q_N,h W_UK,h^T) . c_KV, so each query moves into the latent
space and all heads score one shared key of width R + P (multi-query attention over the
cache); the attended latent then goes through W_UV,h and W_O. Training and calls without a
cache use the plain (expanded) form, which computes the same thing.

The absorbed form needs W_UKV to act linearly on c_KV; a quantized layer (model.quant)
rounds its input to 8 bits per token, so there the cached latents are expanded each step
instead (same cache, the expanded arithmetic). LoRA adapters on kv_b are folded into W_UKV.
RoPE is rotate-half (modeling/rope.py); DeepSeek's checkpoints lay the rotary features out
interleaved, which an importer permutes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from modeling import lora as lora_lib
from modeling.attention import Attention, attend, causal_blocks_for, make_mask, write_cache
from modeling.layers import Dense, Norm


@dataclasses.dataclass(frozen=True)
class Mla:
  """MLA's sizes (defaults: DeepSeek-V3's)."""

  q_lora_rank: int = 1536  # Rq: the query latent; 0: queries straight from x
  kv_lora_rank: int = 512  # R: the key/value latent c_KV
  qk_nope_head_dim: int = 128  # N: each head's query/key features without position
  qk_rope_head_dim: int = 64  # P: the rotary features (one key head shared by all heads)
  v_head_dim: int = 128  # V: each head's value features

  @property
  def cache_width(self) -> int:
    """Cached numbers per token and layer: c_KV and the rotated shared key."""
    return self.kv_lora_rank + self.qk_rope_head_dim

  def matmul_params(self, d_model: int, num_heads: int) -> int:
    """Weights of MLA's projections (the attention part of 6N)."""
    h, n, p, v = num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
    rq = self.q_lora_rank
    query = d_model * rq + rq * h * (n + p) if rq else d_model * h * (n + p)
    kv = d_model * self.cache_width + self.kv_lora_rank * h * (n + v)
    return query + kv + h * v * d_model


class LatentAttention(Attention):
  """Causal or bidirectional MLA self-attention with the latent KV cache {"c_kv": [B, S,
  R + P]}. Reuses Attention's output path (SubLN, `out`, dropout) and Dense settings
  (bias, quantized dot_general, LoRA); `num_kv_heads`, `head_dim` and `scale` do not apply
  (the sizes are `mla`'s, the scale is 1 / sqrt(N + P) times `rope.softmax_scale`)."""

  mla: Mla = Mla()
  norm_eps: float = 1e-6  # the latents' RMSNorm
  absorb: bool = True  # decode in the absorbed form; False: expand the cached latents

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    pos_BL: jax.Array,
    seg_BL: jax.Array,
    cache: dict[str, jax.Array] | None = None,
    deterministic: bool = True,
    bias_BHLS: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    if bias_BHLS is not None or self.rope is None:
      raise ValueError("MLA takes RoPE positions and no additive bias")
    m, h = self.mla, self.num_heads
    n, p, r = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    dense = self._dense_kwargs()
    up = {**dense, "use_bias": False}  # DeepSeek's up-projections have no bias
    norm = dict(kind="rmsnorm", eps=self.norm_eps, dtype=self.dtype)
    if m.q_lora_rank:
      cq_BLQ = Dense((m.q_lora_rank,), ("embed",), ("latent",), name="q_a", **dense)(x_BLD)
      cq_BLQ = Norm(name="q_norm", **norm)(cq_BLQ)
      q_BLHK = Dense((h, n + p), ("latent",), ("heads", "head_dim"), name="q_b", **up)(cq_BLQ)
    else:
      q_BLHK = Dense((h, n + p), ("embed",), ("heads", "head_dim"), name="query", **dense)(x_BLD)
    q_BLHK = nn.with_logical_constraint(q_BLHK, ("act_batch", "act_length", "act_heads", None))
    q_nope_BLHN, q_rope_BLHP = q_BLHK[..., :n], self.rope(q_BLHK[..., n:], pos_BL)
    kv_BLC = Dense((r + p,), ("embed",), ("latent",), name="kv_a", **dense)(x_BLD)
    c_BLR = Norm(name="kv_norm", **norm)(kv_BLC[..., :r])
    k_rope_BL1P = self.rope(kv_BLC[..., None, r:], pos_BL)
    kv_b = Dense((h, n + m.v_head_dim), ("latent",), ("heads", "head_dim"), name="kv_b", **up)
    scale = (n + p) ** -0.5 * self.rope.softmax_scale

    if cache is None:
      mask = make_mask(pos_BL, pos_BL, seg_BL, seg_BL, self.mask_kind, self.window)
      blocks = causal_blocks_for(x_BLD.shape[1]) if self.mask_kind == "causal" else 1
      out_BLHV = self._expanded(
        kv_b, q_nope_BLHN, q_rope_BLHP, c_BLR, k_rope_BL1P, mask, scale, blocks
      )
      return self._output(out_BLHV, x_BLD, deterministic), None

    new_BLC = jnp.concatenate([c_BLR, k_rope_BL1P[:, :, 0]], axis=-1)
    cache = {"c_kv": write_cache(cache["c_kv"], new_BLC, pos_BL)}
    c_BSC = cache["c_kv"].astype(self.dtype)
    b, s = c_BSC.shape[:2]
    kv_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=pos_BL.dtype), (b, s))
    ones_BS, ones_BL = jnp.ones_like(kv_pos_BS, seg_BL.dtype), jnp.ones_like(seg_BL)
    mask = make_mask(pos_BL, kv_pos_BS, ones_BL, ones_BS, self.mask_kind, self.window)
    if self.absorb:
      out_BLHV = self._absorbed(kv_b, q_nope_BLHN, q_rope_BLHP, c_BSC, mask, scale)
    else:
      c_BSR, k_rope_BS1P = c_BSC[..., :r], c_BSC[:, :, None, r:]
      out_BLHV = self._expanded(kv_b, q_nope_BLHN, q_rope_BLHP, c_BSR, k_rope_BS1P, mask, scale, 1)
    return self._output(out_BLHV, x_BLD, deterministic), cache

  def _expanded(self, kv_b, q_nope_BLHN, q_rope_BLHP, c_BSR, k_rope_BS1P, mask, scale, blocks):
    """Keys and values up-projected from the latents: H heads of N + P (query, key) and V."""
    n = self.mla.qk_nope_head_dim
    kv_BSHX = kv_b(c_BSR)
    k_nope_BSHN, v_BSHV = kv_BSHX[..., :n], kv_BSHX[..., n:]
    k_rope_BSHP = jnp.broadcast_to(k_rope_BS1P, (*k_nope_BSHN.shape[:3], k_rope_BS1P.shape[-1]))
    q_BLHK = jnp.concatenate([q_nope_BLHN, q_rope_BLHP], axis=-1)
    k_BSHK = jnp.concatenate([k_nope_BSHN, k_rope_BSHP.astype(k_nope_BSHN.dtype)], axis=-1)
    return attend(q_BLHK, k_BSHK, v_BSHV, mask, "xla", blocks, None, scale)

  def _absorbed(self, kv_b, q_nope_BLHN, q_rope_BLHP, c_BSC, mask, scale):
    """W_UK folded into the queries, W_UV applied after attending over the cached latents:
    one shared key [c_KV ; RoPE(kr)] of width R + P and one shared value c_KV."""
    n, r = self.mla.qk_nope_head_dim, self.mla.kv_lora_rank
    w_RHX = self._kv_b_weight(kv_b, c_BSC[..., :r])
    w_uk_RHN, w_uv_RHV = w_RHX[..., :n], w_RHX[..., n:]
    q_lat_BLHR = jnp.einsum("blhn,rhn->blhr", q_nope_BLHN, w_uk_RHN)
    q_BLHC = jnp.concatenate([q_lat_BLHR, q_rope_BLHP.astype(q_lat_BLHR.dtype)], axis=-1)
    k_BS1C, v_BS1R = c_BSC[:, :, None, :], c_BSC[:, :, None, :r]
    o_BLHR = attend(q_BLHC, k_BS1C, v_BS1R, mask, "xla", 1, None, scale)
    return jnp.einsum("blhr,rhv->blhv", o_BLHR, w_uv_RHV)

  def _kv_b_weight(self, kv_b: Dense, c_BSR: jax.Array) -> jax.Array:
    """W_UKV [R, H, N + V] as kv_b applies it: its kernel plus any LoRA update folded in."""
    if self.is_initializing():  # create kv_b's params (the expanded form's call)
      kv_b(c_BSR)
    own = dict(nn.unbox(kv_b.variables["params"]))
    folded = lora_lib.fold({"kv_b": own}, self.lora or lora_lib.Lora())["kv_b"]
    return folded["kernel"].astype(self.dtype)
