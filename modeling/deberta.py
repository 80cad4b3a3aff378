"""DeBERTa's disentangled attention (He et al. 2021, "DeBERTa: Decoding-enhanced BERT with
Disentangled Attention", eq. 4), with DeBERTa-v2/v3's log-bucketed relative positions and
position projections shared with the content ones (`share_att_key`).

Each token is a content vector; each relative distance delta(i, j) = bucket(pos_i - pos_j)
is a row of one table of relative embeddings P, shared by every layer and layer-normed
(v2's `norm_rel_ebd`). A layer projects P through its own query and key projections,
q^r = P W_q, k^r = P W_k, and scores

  A_ij = (q_i . k_j  +  q_i . k^r_delta(i,j)  +  k_j . q^r_delta(i,j)) / sqrt(3 K)

content-to-content, content-to-position (c2p) and position-to-content (p2c); the scale is
1 / sqrt(K * (1 + the number of position terms)). Like DebertaV2's code (and unlike eq. 4's
delta(j, i)), p2c reads the row of delta(i, j): the buckets are odd, so the code's double
negation lands there.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from modeling.attention import Attention, attend, make_mask
from modeling.layers import Dense, Norm, param_with_axes

POSITION_TERMS = 2  # c2p and p2c: the scale is 1 / sqrt(head_dim * (1 + POSITION_TERMS))


def log_bucket_position(rel: jax.Array, buckets: int, max_distance: int) -> jax.Array:
  """DeBERTa-v2's bucket of each relative position (query position - key position).

  Distances up to buckets / 2 stay exact; longer ones are spaced logarithmically so that
  max_distance - 1 lands on bucket buckets - 1 (and longer ones beyond, clipped by
  `relative_index`). The sign is kept. buckets <= 0: the exact distances.
  """
  if buckets <= 0:
    return rel
  mid = buckets // 2
  dist = jnp.abs(rel)
  safe = jnp.where(dist < mid, mid - 1, dist).astype(jnp.float32)
  ratio = jnp.log(jnp.asarray((max_distance - 1) / mid, jnp.float32))
  log_pos = jnp.ceil(jnp.log(safe / mid) / ratio * (mid - 1)).astype(rel.dtype) + mid
  return jnp.where(dist <= mid, rel, jnp.sign(rel) * log_pos)


def span(buckets: int, max_distance: int) -> int:
  """Rows of the relative table on each side of distance 0 (it holds 2 x span rows)."""
  return buckets if buckets > 0 else max_distance


def relative_index(pos_BL: jax.Array, buckets: int, max_distance: int) -> jax.Array:
  """[B, L, L]: the table row of each (query i, key j): bucket(pos_i - pos_j) + span,
  clipped to the table."""
  s = span(buckets, max_distance)
  rel_BLL = pos_BL[:, :, None] - pos_BL[:, None, :]
  return jnp.clip(log_bucket_position(rel_BLL, buckets, max_distance) + s, 0, 2 * s - 1)


def reachable_rows(buckets: int, max_distance: int, max_len: int) -> tuple[int, int]:
  """[lo, hi): the table rows that positions below max_len can reach (the buckets grow
  monotonically with the distance; one row of margin for float rounding)."""
  s = span(buckets, max_distance)
  with jax.ensure_compile_time_eval():  # a Python int, also while a jit traces the model
    far = int(log_bucket_position(np.int32(max_len - 1), buckets, max_distance)) + 1
  reach = min(s, far)
  return s - reach, min(s + reach + 1, 2 * s)


class RelativeEmbeddings(nn.Module):
  """The layer-normed relative table, shared by every layer, and each (query, key) pair's
  row [B, L, L]. The table has 2 span rows; only those positions below max_len can reach
  are projected (DeBERTa-v3's 512 rows at a context of 128: 257)."""

  d_model: int
  buckets: int
  max_distance: int
  max_len: int
  norm: dict  # Norm kwargs (DeBERTa: the model's LayerNorm)

  @nn.compact
  def __call__(self, pos_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    rows = 2 * span(self.buckets, self.max_distance)
    table_RD = param_with_axes(
      self, "embedding", nn.initializers.normal(0.02), (rows, self.d_model), (None, "embed")
    )
    lo, hi = reachable_rows(self.buckets, self.max_distance, self.max_len)
    rel_RD = Norm(name="norm", **self.norm)(table_RD[lo:hi].astype(self.norm["dtype"]))
    return rel_RD, relative_index(pos_BL, self.buckets, self.max_distance) - lo


class DisentangledAttention(Attention):
  """Bidirectional self-attention scored as in the module docstring. `kv_BSD` (the enhanced
  mask decoder's) gives keys and values from another sequence of the same positions."""

  @nn.compact
  def __call__(
    self,
    x_BLD: jax.Array,
    pos_BL: jax.Array,
    seg_BL: jax.Array,
    rel: tuple[jax.Array, jax.Array],
    deterministic: bool = True,
    kv_BSD: jax.Array | None = None,
  ) -> jax.Array:
    rel_RD, idx_BLS = rel
    kv_BSD = x_BLD if kv_BSD is None else kv_BSD
    dense = self._dense_kwargs()
    h, k = self.num_heads, self.head_dim
    query = Dense((h, k), ("embed",), ("heads", "head_dim"), name="query", **dense)
    key = Dense((h, k), ("embed",), ("kv_heads", "head_dim"), name="key", **dense)
    value = Dense((h, k), ("embed",), ("kv_heads", "head_dim"), name="value", **dense)
    q_BLHK, k_BSHK, v_BSHK = query(x_BLD), key(kv_BSD), value(kv_BSD)
    qr_RHK, kr_RHK = query(rel_RD), key(rel_RD)  # share_att_key: the layer's own projections

    b, length, s = idx_BLS.shape[0], q_BLHK.shape[1], k_BSHK.shape[1]
    idx_BHLS = jnp.broadcast_to(idx_BLS[:, None], (b, h, length, s))
    c2p_BHLR = jnp.einsum("blhk,rhk->bhlr", q_BLHK, kr_RHK)
    c2p_BHLS = jnp.take_along_axis(c2p_BHLR, idx_BHLS, axis=-1)
    p2c_BHSR = jnp.einsum("bshk,rhk->bhsr", k_BSHK, qr_RHK)  # row j reads delta(i, j)
    p2c_BHLS = jnp.take_along_axis(p2c_BHSR, idx_BHLS.swapaxes(2, 3), axis=-1).swapaxes(2, 3)

    scale = (k * (1 + POSITION_TERMS)) ** -0.5
    mask = make_mask(pos_BL, pos_BL, seg_BL, seg_BL, "bidirectional")
    impl = "xla" if self.impl == "splash" else self.impl
    bias_BHLS = (c2p_BHLS + p2c_BHLS) * scale
    out_BLHK = attend(q_BLHK, k_BSHK, v_BSHK, mask, impl, 1, bias_BHLS, scale)
    return self._output(out_BLHK, x_BLD, deterministic)
