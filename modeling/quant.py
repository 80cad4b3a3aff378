"""BitLinear: quantization-aware training of ternary (BitNet b1.58) and binary (BitNet) weights.

A quantized Dense is the ordinary Dense with an injected `dot_general` (modeling/layers.py):
the same parameters (full-precision latent weights), the same shapes and sharding.

  bitnet158  weights: scale = mean(|W|) over the tensor, W_q = clip(round(W / scale), -1, 1)
             (Ma et al. 2024); activations: 8 bits per token by absmax, x_q =
             clip(round(x * 127 / max|x|), -128, 127) over the contracted dims.
  bitnet1    weights: W_q = sign(W - mean(W)) (+1 at 0), scale = mean(|W|) (Wang et al. 2023);
             activations as above.

The matmul is computed on the dequantized values, (x_q * s_x) @ (W_q * s_w), in float:
numerically what a kernel computing x_q @ W_q in integers and rescaling gives, up to float
rounding. Both quantizers pass gradients straight through (STE: the gradient of the rounded
value is taken as the identity). `deployed=True` takes the kernel as already quantized
(W_q * s_w, as `unpack` rebuilds it from a packed checkpoint), so the forward pass from packed
weights is the training-mode forward pass, bit for bit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QUANT_KINDS = ("none", "bitnet158", "bitnet1")
WARMUP_SHAPES = ("linear", "cosine")  # train.quant_warmup_shape: lambda against the step
EPS = 1e-5


def ste(x: jax.Array, q: jax.Array) -> jax.Array:
  """Exactly q in the forward pass (x - x is 0), the identity's gradient in the backward."""
  return lax.stop_gradient(q) + (x - lax.stop_gradient(x))


def ternary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(W_q in {-1, 0, 1}, scale): absmean quantization of the whole tensor."""
  scale = jnp.maximum(jnp.mean(jnp.abs(w)), EPS)
  return jnp.clip(jnp.round(w / scale), -1, 1), scale


def binary(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(W_q in {-1, 1}, scale): the sign around the mean, scaled by the mean magnitude."""
  scale = jnp.maximum(jnp.mean(jnp.abs(w)), EPS)
  return jnp.where(w - jnp.mean(w) >= 0, 1.0, -1.0).astype(w.dtype), scale


WEIGHT_QUANTIZERS = {"bitnet158": ternary, "bitnet1": binary}


def absmax_int8(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(x_q in [-128, 127], scale) per token: the max magnitude over `axes` maps to 127."""
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = jnp.maximum(amax, EPS) / 127.0
  return jnp.clip(jnp.round(x / scale), -128, 127), scale


def quantize_weight(kind: str, w: jax.Array) -> jax.Array:
  """The dequantized weight W_q * scale, with a straight-through gradient."""
  wq, scale = WEIGHT_QUANTIZERS[kind](w)
  return ste(w, wq * scale)


def quantize_activation(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  xq, scale = absmax_int8(x, axes)
  return ste(x, xq * scale)


def blend(x: jax.Array, q: jax.Array, mix: jax.Array | None) -> jax.Array:
  """x + mix (q - x), as (1 - mix) x + mix q: exactly x at mix = 0, exactly q at mix = 1 (and
  q itself when mix is None). The gradient with respect to x is the identity when q is
  straight-through."""
  if mix is None:
    return q
  mix = jnp.asarray(mix, x.dtype)
  return (1 - mix) * x + mix * q


def bit_dot_general(
  lhs,
  rhs,
  dimension_numbers,
  precision=None,
  preferred_element_type=None,
  *,
  kind,
  deployed,
  mix=None,
):
  """lax.dot_general of 8-bit activations (lhs) and quantized weights (rhs); with `mix`, of
  their blends with the float values (conversion)."""
  (lhs_contract, _), _ = dimension_numbers
  x = blend(lhs, quantize_activation(lhs, tuple(lhs_contract)), mix)
  w = rhs if deployed else blend(rhs, quantize_weight(kind, rhs), mix)
  return lax.dot_general(x, w, dimension_numbers, precision, preferred_element_type)


def make_dot_general(kind: str, deployed: bool = False, mix: jax.Array | None = None):
  """The dot_general a Dense uses for `model.quant=kind`: lax.dot_general for `none`. `mix`:
  the conversion's lambda (a traced scalar), None for plain BitLinear."""
  if kind == "none":
    return lax.dot_general
  if kind not in WEIGHT_QUANTIZERS:
    raise ValueError(f"model.quant={kind!r}: allowed {list(QUANT_KINDS)}")
  return functools.partial(bit_dot_general, kind=kind, deployed=deployed, mix=mix)


def warmup_mix(step: jax.Array, steps: int, shape: str = "linear") -> jax.Array:
  """lambda at `step` (the updates done so far) of a warmup over `steps`: 0 at step 0, 1 from
  step `steps` on (and always 1 when steps is 0). linear: step / steps; cosine: (1 -
  cos(pi step / steps)) / 2, slow at both ends."""
  if shape not in WARMUP_SHAPES:
    raise ValueError(f"train.quant_warmup_shape={shape!r}: allowed {list(WARMUP_SHAPES)}")
  if steps <= 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
  if shape == "cosine":
    t = 0.5 * (1.0 - jnp.cos(math.pi * t))
  return jnp.where(step >= steps, 1.0, t).astype(jnp.float32)


# ---- packed storage: 2 bits (or 1.6 bits, base 3) per ternary weight, 1 bit per binary weight


def pack_ternary(wq: np.ndarray, base3: bool = False) -> np.ndarray:
  """{-1, 0, 1} -> uint8 codes: four 2-bit codes per byte, or five base-3 digits per byte."""
  codes = (np.asarray(wq).reshape(-1) + 1).astype(np.uint8)  # 0, 1, 2
  per = 5 if base3 else 4
  codes = np.concatenate([codes, np.ones(-codes.size % per, np.uint8)]).reshape(-1, per)
  weights = 3 ** np.arange(per) if base3 else 4 ** np.arange(per)
  return (codes.astype(np.uint32) @ weights.astype(np.uint32)).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, size: int, base3: bool = False) -> np.ndarray:
  """uint8 codes -> float32 {-1, 0, 1}, the first `size` weights."""
  per, radix = (5, 3) if base3 else (4, 4)
  digits = (packed.astype(np.int32)[:, None] // radix ** np.arange(per)) % radix
  return (digits.reshape(-1)[:size] - 1).astype(np.float32)


def pack_binary(wq: np.ndarray) -> np.ndarray:
  """{-1, 1} -> uint8, eight weights per byte (bit set for +1)."""
  return np.packbits(np.asarray(wq).reshape(-1) > 0)


def unpack_binary(packed: np.ndarray, size: int) -> np.ndarray:
  return np.unpackbits(packed)[:size].astype(np.float32) * 2 - 1
