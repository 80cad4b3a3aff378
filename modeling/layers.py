"""Building blocks: Dense with an injectable dot_general, Embed, norms, MLPs.

Every parameter carries logical axis names (docs/ARCHITECTURE.md); the mesh
rules in `config.logical_axis_rules` turn them into shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from modeling.lora import BASE_DOT_GENERAL, DEQUANTIZE, QUANT_LEAVES, Lora
from modeling.quant import blend

DotGeneral = Callable[..., jax.Array]


def mesh_axes(rule_axes: str | Sequence[str] | None) -> tuple[str, ...]:
  """The mesh axes a logical-axis rule maps to, as a tuple: None -> (), "fsdp" -> ("fsdp",)."""
  if rule_axes is None:
    return ()
  return (rule_axes,) if isinstance(rule_axes, str) else tuple(rule_axes)


def param_with_axes(
  module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence[str | None]
) -> jax.Array:
  """Declares a float32 parameter with logical axis names."""
  return module.param(
    name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32
  )


class Dense(nn.Module):
  """y = x @ W (+ b) contracting the last `len(in_axes)` dims of x.

  `dot_general` is injectable so quantized matmuls (modeling/quant.py) plug in
  without touching model code. W is read in whatever form the params hold it: a float
  `kernel` (always so at init), or a quantized base's leaves (modeling/lora.py: NF4,
  dequantized to the compute dtype; packed ternary, through the deployed BitLinear). With
  `lora` targeting this module's path, y += scale * (x @ A) @ B (LoRA); the branch is skipped
  when the params hold no adapters, so one module serves the base alone too.
  """

  features: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.normal(0.02)
  dot_general: DotGeneral = lax.dot_general
  lora: Lora | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[-n_in:]
    kernel, dot_general = self._kernel((*in_shape, *self.features))
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    x = x.astype(self.dtype)
    y = dot_general(x, kernel, (contract, ((), ())))
    if self._adapted():
      y = y + self._adapter(x, in_shape, contract)
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, self.features, self.out_axes)
      y = y + bias.astype(self.dtype)
    return y

  def _kernel(self, shape: tuple[int, ...]) -> tuple[jax.Array, DotGeneral]:
    """W in the compute dtype, and the dot_general it goes through."""
    if not self.is_initializing():
      for kind, leaves in QUANT_LEAVES.items():
        if self.has_variable("params", next(iter(leaves))):
          stored = {k: nn.unbox(self.get_variable("params", k)) for k in leaves}
          kernel = DEQUANTIZE[kind](stored, shape, self.dtype)
          return kernel, BASE_DOT_GENERAL[kind] or self.dot_general
    kernel = param_with_axes(
      self, "kernel", self.kernel_init, shape, (*self.in_axes, *self.out_axes)
    )
    return kernel.astype(self.dtype), self.dot_general

  def _adapted(self) -> bool:
    if self.lora is None or not self.lora.adapts("/".join(self.scope.path)):
      return False
    return self.is_initializing() or self.has_variable("params", "lora_a")

  def _adapter(self, x: jax.Array, in_shape: tuple[int, ...], contract) -> jax.Array:
    """scale * (x @ A) @ B. A: kaiming-uniform as PEFT's (U(+-1/sqrt(fan_in))); B: zeros, so
    the adapted model starts as the base, bit for bit."""
    n_in, rank = len(in_shape), self.lora.rank
    a_init = nn.initializers.variance_scaling(
      1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1
    )
    a = param_with_axes(self, "lora_a", a_init, (*in_shape, rank), (*self.in_axes, "lora_rank"))
    b = param_with_axes(
      self,
      "lora_b",
      nn.initializers.zeros,
      (rank, *self.features),
      ("lora_rank", *self.out_axes),
    )
    xa = lax.dot_general(x, a.astype(self.dtype), (contract, ((), ())))
    xab = lax.dot_general(xa, b.astype(self.dtype), (((xa.ndim - 1,), (0,)), ((), ())))
    return self.lora.scale * xab


class Embed(nn.Module):
  """Token embedding table [V, D]; `attend` reuses it as a tied output head."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  axes: tuple[str, str] = ("vocab", "embed")

  def setup(self) -> None:
    self.embedding = param_with_axes(
      self,
      "embedding",
      nn.initializers.normal(0.02),
      (self.num_embeddings, self.features),
      self.axes,
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    return jnp.einsum("bld,vd->blv", x_BLD.astype(self.dtype), self.embedding.astype(self.dtype))


NORMS = ("layernorm", "rmsnorm")


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32, returned in the compute dtype."""

  kind: str = "layernorm"
  eps: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * param_with_axes(self, "scale", nn.initializers.ones, (d,), ("norm",))
    if self.kind == "layernorm" and self.use_bias:
      y = y + param_with_axes(self, "bias", nn.initializers.zeros, (d,), ("norm",))
    return y.astype(self.dtype)


def subln(kwargs: dict, x: jax.Array) -> jax.Array:
  """SubLN (BitNet b1.58 2B4T), the submodule `sub_norm` of the caller: Norm(**kwargs)(x);
  with a `mix` in kwargs (a conversion's lambda), x + mix (norm(x) - x), so a float model
  that lacks the norm is unchanged at mix = 0."""
  kwargs = dict(kwargs)
  mix = kwargs.pop("mix", None)
  y = Norm(name="sub_norm", **kwargs)(x)
  return y if mix is None else blend(x, y, mix)


MLP_KINDS = ("gelu", "relu", "swiglu", "geglu")
GATED = ("swiglu", "geglu")  # a gate and an up projection
GELUS = ("tanh", "erf")  # GPT-2's tanh approximation ("gelu_new"), or the exact erf form (BERT)


def gelu(x: jax.Array, kind: str = "tanh") -> jax.Array:
  return nn.gelu(x, approximate=kind == "tanh")


class Mlp(nn.Module):
  """GELU MLP (GPT-2, BERT), ReLU (the original T5), or gated: SwiGLU (Llama), GeGLU
  (T5 v1.1's gated-GELU). Both GELUs follow `gelu` (GELUS)."""

  d_ff: int
  kind: str = "gelu"
  gelu: str = "tanh"
  use_bias: bool = True
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  out_init_scale: float = 0.02
  dot_general: DotGeneral = lax.dot_general
  sub_norm: dict | None = None  # Norm kwargs: SubLN before the down projection (BitNet)
  lora: Lora | None = None  # LoRA adapters where lora.targets matches (modeling/lora.py)

  @nn.compact
  def __call__(self, x_BLD: jax.Array, deterministic: bool = True) -> jax.Array:
    dense = dict(
      dtype=self.dtype, use_bias=self.use_bias, dot_general=self.dot_general, lora=self.lora
    )
    up = Dense((self.d_ff,), ("embed",), ("mlp",), name="up", **dense)(x_BLD)
    if self.kind in GATED:
      gate = Dense((self.d_ff,), ("embed",), ("mlp",), name="gate", **dense)(x_BLD)
      h_BLF = (nn.silu(gate) if self.kind == "swiglu" else gelu(gate, self.gelu)) * up
    elif self.kind == "relu":
      h_BLF = nn.relu(up)
    else:
      h_BLF = gelu(up, self.gelu)
    h_BLF = nn.with_logical_constraint(h_BLF, ("act_batch", "act_length", "act_mlp"))
    if self.sub_norm is not None:
      h_BLF = subln(self.sub_norm, h_BLF)
    out = Dense(
      (x_BLD.shape[-1],),
      ("mlp",),
      ("embed",),
      name="down",
      kernel_init=nn.initializers.normal(self.out_init_scale),
      **dense,
    )(h_BLF)
    return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class NeighborMix(nn.Module):
  """x_i + sum over 0 < |o| <= reach of W_o x_{i+o}: every position also reads a learned
  linear map of its neighbours' inputs, within its segment (row ends and segment boundaries
  contribute nothing). The W_o start at zero, so at init the layer is the identity.

  For bidirectional stacks (masked diffusion, MLM): an AR model's residual at position i holds
  token i, so it has bigram statistics before attention has learned anything; a [MASK]
  position holds nothing, and this gives it its neighbours from the first step.
  """

  reach: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLD: jax.Array, seg_BL: jax.Array) -> jax.Array:
    d, length = x_BLD.shape[-1], x_BLD.shape[1]
    out_BLD = x_BLD
    for offset in [o for o in range(-self.reach, self.reach + 1) if o]:
      name = f"before_{-offset}" if offset < 0 else f"after_{offset}"
      w_DD = param_with_axes(self, name, nn.initializers.zeros, (d, d), ("embed", "factor"))
      j_L = jnp.arange(length) + offset
      inside_L = (j_L >= 0) & (j_L < length)
      j_L = jnp.clip(j_L, 0, length - 1)
      same_BL = inside_L[None, :] & (seg_BL[:, j_L] == seg_BL)
      moved_BLD = x_BLD[:, j_L] @ w_DD.astype(self.dtype)
      out_BLD = out_BLD + jnp.where(same_BL[..., None], moved_BLD, 0.0)
    return out_BLD
