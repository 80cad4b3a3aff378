"""Rotary position embeddings (RoPE) and the context-extension scalings of published models.

Each head's first `rotary_dim` features are rotated in the rotate-half layout (feature i
pairs with i + rotary_dim / 2, as Hugging Face's Llama, Phi-3 and GPT-NeoX do); the rest
pass through (Phi's `partial_rotary_factor`). Feature pair i turns by `position x
inv_freq[i]`, with inv_freq[i] = theta^(-2i / rotary_dim), changed by the scaling:

  none      as above (RoFormer, Llama 2)
  linear    every inv_freq divided by `factor` (position interpolation)
  llama3    Llama 3.1: wavelengths longer than original_max_len / low_freq_factor are
            divided by `factor`, shorter than original_max_len / high_freq_factor kept,
            and those between blended smoothly
  longrope  Phi-3 (LongRoPE): inv_freq[i] divided by short_factor[i] while the call's
            positions stay below original_max_len, by long_factor[i] once one passes it;
            cos and sin are multiplied by `attention_factor`

Frequencies are computed once in float32 exactly as transformers computes them, so an
imported model's logits match its source.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class Rope:
  theta: float = 10000.0
  fraction: float = 1.0  # share of each head's features rotated (partial_rotary_factor)
  scaling: str = "none"  # ROPE_SCALINGS
  factor: float = 1.0  # linear, llama3: the context extension factor
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_max_len: int = 0  # llama3, longrope: the context the model was pretrained at
  short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors below original_max_len
  long_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors past it
  attention_factor: float = 1.0  # longrope: cos and sin are scaled by it

  def rotary_dim(self, head_dim: int) -> int:
    return int(head_dim * self.fraction)

  def inv_freqs(self, head_dim: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(float32 inverse frequencies [rotary_dim / 2], those used past original_max_len or
    None): transformers' `_compute_*_parameters` for the same settings."""
    dim = self.rotary_dim(head_dim)
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(self.theta) ** exponent
    inv = (np.float32(1.0) / base).astype(np.float32)
    if self.scaling == "none":
      return inv, None
    if self.scaling == "linear":
      return (inv / np.float32(self.factor)).astype(np.float32), None
    if self.scaling == "llama3":
      old = self.original_max_len
      low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
      wavelen = 2 * math.pi / inv
      scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
      smooth = (old / wavelen - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor
      )
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
      return np.where(medium, smoothed, scaled).astype(np.float32), None
    if self.scaling == "longrope":
      short = np.asarray(self.short_factor, np.float32)
      long = np.asarray(self.long_factor, np.float32)
      if short.shape != inv.shape or long.shape != inv.shape:
        raise ValueError(
          f"rope longrope: short_factor ({short.size}) and long_factor ({long.size}) need "
          f"rotary_dim / 2 = {inv.size} values"
        )
      return (1.0 / (short * base)).astype(np.float32), (1.0 / (long * base)).astype(np.float32)
    raise ValueError(f"rope scaling {self.scaling!r}: allowed {ROPE_SCALINGS}")

  def __call__(self, x_BLHK: jax.Array, pos_BL: jax.Array) -> jax.Array:
    """x rotated by its positions; float32 inside, returned in x's dtype."""
    inv_F, long_F = self.inv_freqs(x_BLHK.shape[-1])
    inv_F = jnp.asarray(inv_F)
    if long_F is not None:  # transformers picks the table from the call's largest position
      inv_F = jnp.where(jnp.max(pos_BL) + 1 > self.original_max_len, jnp.asarray(long_F), inv_F)
    return apply_rope(x_BLHK, pos_BL, inv_F, self.attention_factor)


def apply_rope(
  x_BLHK: jax.Array, pos_BL: jax.Array, inv_F: jax.Array | float = 10000.0, scale: float = 1.0
) -> jax.Array:
  """Rotates the first 2F features of each head (rotate-half layout) by pos x inv_F.

  `inv_F` is the inverse frequencies, or a base theta for the plain RoPE of all features;
  `scale` multiplies cos and sin (longrope's attention factor)."""
  if not hasattr(inv_F, "shape"):
    inv_F = Rope(theta=float(inv_F)).inv_freqs(x_BLHK.shape[-1])[0]
  half = inv_F.shape[0]
  angle_BL1F = (pos_BL.astype(jnp.float32)[:, :, None] * inv_F)[:, :, None, :]
  sin, cos = jnp.sin(angle_BL1F) * scale, jnp.cos(angle_BL1F) * scale
  x = x_BLHK.astype(jnp.float32)
  x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x_BLHK.dtype)
