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
  yarn      YaRN (Peng et al. 2023, arXiv:2309.00071) as DeepSeek-V3 configures it: over the
            rotated dims, a linear ramp between the dims that turn beta_fast and beta_slow
            times within original_max_len blends inv_freq (fast dims, kept) with
            inv_freq / factor (slow dims, interpolated); cos and sin are multiplied by
            mscale(factor, mscale) / mscale(factor, mscale_all_dim) (both set), else by
            mscale(factor, 1), where mscale(s, m) = 0.1 m ln(s) + 1; with mscale_all_dim set,
            MLA's softmax scale is multiplied by mscale(factor, mscale_all_dim)^2

Frequencies are computed once in float32 exactly as transformers computes them, so an
imported model's logits match its source.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3", "longrope", "yarn")


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
  beta_fast: float = 32.0  # yarn: dims turning more often within original_max_len: kept
  beta_slow: float = 1.0  # yarn: dims turning less often than this are divided by factor
  mscale: float = 1.0  # yarn: cos and sin's temperature numerator (see the module docstring)
  mscale_all_dim: float = 0.0  # yarn: its denominator, and MLA's softmax mscale; 0: none

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
    if self.scaling == "yarn":
      return self._yarn(base, dim), None
    raise ValueError(f"rope scaling {self.scaling!r}: allowed {ROPE_SCALINGS}")

  def _yarn(self, base: np.ndarray, dim: int) -> np.ndarray:
    """YaRN's blend of extrapolated (inv) and interpolated (inv / factor) frequencies. The
    dim that turns b times within original_max_len: d(b) = dim ln(L / (2 pi b)) / (2 ln
    theta); the ramp runs over [floor d(beta_fast), ceil d(beta_slow)] (DeepSeek's code)."""

    def turning_dim(turns: float) -> float:
      return (
        dim * math.log(self.original_max_len / (turns * 2 * math.pi)) / (2 * math.log(self.theta))
      )

    low = max(math.floor(turning_dim(self.beta_fast)), 0)
    high = min(math.ceil(turning_dim(self.beta_slow)), dim - 1)
    ramp = (np.arange(dim // 2, dtype=np.float32) - low) / np.float32((high - low) or 1e-3)
    keep = np.float32(1.0) - np.clip(ramp, 0, 1).astype(np.float32)  # 1: extrapolate (keep)
    extrapolated = (np.float32(1.0) / base).astype(np.float32)
    interpolated = (np.float32(1.0) / (np.float32(self.factor) * base)).astype(np.float32)
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)

  @property
  def cos_sin_scale(self) -> float:
    """What cos and sin are multiplied by: longrope's attention_factor, YaRN's temperature."""
    if self.scaling != "yarn":
      return self.attention_factor
    if self.mscale and self.mscale_all_dim:
      return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
    return yarn_mscale(self.factor)

  @property
  def softmax_scale(self) -> float:
    """The factor MLA multiplies its softmax scale by: DeepSeek's mscale(factor,
    mscale_all_dim)^2 under YaRN with mscale_all_dim set, else 1."""
    if self.scaling != "yarn" or not self.mscale_all_dim:
      return 1.0
    return yarn_mscale(self.factor, self.mscale_all_dim) ** 2

  def __call__(self, x_BLHK: jax.Array, pos_BL: jax.Array) -> jax.Array:
    """x rotated by its positions; float32 inside, returned in x's dtype."""
    inv_F, long_F = self.inv_freqs(x_BLHK.shape[-1])
    inv_F = jnp.asarray(inv_F)
    if long_F is not None:  # transformers picks the table from the call's largest position
      inv_F = jnp.where(jnp.max(pos_BL) + 1 > self.original_max_len, jnp.asarray(long_F), inv_F)
    return apply_rope(x_BLHK, pos_BL, inv_F, self.cos_sin_scale)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature sqrt(1 / t) = 0.1 mscale ln(factor) + 1 (Peng et al. 2023,
  eq. 22 with DeepSeek's multiplier mscale); 1 without extension (factor <= 1)."""
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


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
