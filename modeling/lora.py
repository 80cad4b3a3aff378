"""LoRA adapters on the blocks' linear layers, over a float, NF4 (QLoRA) or packed ternary base.

LoRA (Hu et al. 2021): a frozen kernel W [in, out] gains a trainable low-rank update,

  y = x W + (alpha / r) (x A) B,   A [in, r], B [r, out], B = 0 at init,

so training starts from the base model exactly. `layers.Dense` adds the adapters where
`Lora.targets` (a regex) matches its module path ("blocks/attn/query", "block_3/mlp/up",
"decoder_blocks/cross_attn/value"). Only the adapters train: `split` separates them from
the base, `merge` puts them back, `fold` adds the update into the kernels for export.

The frozen base may be stored smaller than float (`quantize_base`), on the attention and MLP
projections only (embeddings, heads, poolers and time embeddings stay float):

  nf4      QLoRA (Dettmers et al. 2023): 4-bit NormalFloat codes in blocks of 64 with one
           absmax per block, the absmax themselves double-quantized (mean-centred, int8 in
           blocks of 256 with one float32 scale each): 4.127 bits per weight.
  ternary  a BitNet b1.58 model (model.quant=bitnet158): W_q in {-1, 0, 1} packed four to a
           byte plus the absmean scale; unpacked W_q * scale goes through the deployed
           BitLinear dot_general, so the forward pass is the float-latent model's, bit for bit.

Dense dequantizes on the fly to the compute dtype; the float kernel is never stored. Scanned
stacks hold each leaf with a leading layer axis, and each layer is quantized on its own (as
the training forward pass sees one layer's kernel at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from modeling import quant

BASE_QUANTS = ("none", "nf4", "ternary")
ADAPTERS = ("lora_a", "lora_b")  # the adapter leaves of an adapted Dense


@dataclasses.dataclass(frozen=True)
class Lora:
  """LoRA on the Dense layers whose module path matches `targets` (`re.search`)."""

  rank: int = 0  # 0: no adapters
  alpha: float = 16.0
  targets: str = "attn/(query|key|value|out)$"
  base_quant: str = "none"  # none | nf4 | ternary: how the frozen base is stored

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def adapts(self, path: str) -> bool:
    """Whether the Dense at this "/"-joined module path gets adapters."""
    return self.rank > 0 and re.search(self.targets, path) is not None


# ---- NF4: 4-bit NormalFloat with double-quantized block scales (QLoRA) ---------------------

# Dettmers et al. 2023, appendix E: 8 positive and 7 negative quantiles of N(0, 1) and an
# exact zero, normalised to [-1, 1].
NF4_VALUES = (
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
)
NF4_BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax per float32 scale (the double quantization)


def _blocks(x: jax.Array, size: int, fill=0) -> jax.Array:
  """x flattened row-major, padded with `fill` to whole blocks: [n_blocks, size]."""
  flat = x.reshape(-1)
  return jnp.pad(flat, (0, -flat.size % size), constant_values=fill).reshape(-1, size)


def nf4_quantize(w: jax.Array) -> dict[str, jax.Array]:
  """A kernel (any shape) -> NF4 leaves: `kernel_nf4` uint8 [n_blocks, 32] (two codes a
  byte, the first in the high nibble), `kernel_absmax` int8 [n_blocks], `kernel_absmax_scale`
  float32 [ceil(n_blocks / 256)], `kernel_absmax_mean` float32 []."""
  blocks = _blocks(w.astype(jnp.float32), NF4_BLOCK)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  x = blocks / jnp.where(absmax > 0, absmax, 1.0)[:, None]
  values = jnp.asarray(NF4_VALUES, jnp.float32)
  codes = jnp.searchsorted((values[1:] + values[:-1]) / 2, x).astype(jnp.uint8)  # the nearest
  mean = jnp.mean(absmax)
  groups = _blocks(absmax - mean, ABSMAX_BLOCK)
  scale = jnp.max(jnp.abs(groups), axis=1) / 127.0
  q = jnp.round(groups / jnp.where(scale > 0, scale, 1.0)[:, None])
  return {
    "kernel_nf4": (codes[:, 0::2] << 4) | codes[:, 1::2],
    "kernel_absmax": q.reshape(-1)[: absmax.size].astype(jnp.int8),
    "kernel_absmax_scale": scale,
    "kernel_absmax_mean": mean,
  }


def nf4_dequantize(leaves: Mapping[str, jax.Array], shape, dtype=jnp.float32) -> jax.Array:
  """NF4 leaves -> the kernel of `shape`: NF4_VALUES[code] * the block's dequantized absmax."""
  packed = leaves["kernel_nf4"]
  codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(packed.shape[0], NF4_BLOCK)
  scale = jnp.repeat(leaves["kernel_absmax_scale"], ABSMAX_BLOCK)[: packed.shape[0]]
  absmax = leaves["kernel_absmax"].astype(jnp.float32) * scale + leaves["kernel_absmax_mean"]
  w = jnp.asarray(NF4_VALUES, jnp.float32)[codes] * absmax[:, None]
  size = functools.reduce(lambda a, b: a * b, shape, 1)
  return w.reshape(-1)[:size].reshape(shape).astype(dtype)


# ---- ternary: BitNet b1.58's W_q packed four to a byte, and its scale ----------------------


def ternary_quantize(w: jax.Array) -> dict[str, jax.Array]:
  """A float-latent kernel -> `kernel_ternary` uint8 [ceil(size / 4)] (quant.pack_ternary's
  layout: code W_q + 1, the first weight in the low two bits) and `kernel_scale` float32 []
  (quant.ternary's absmean)."""
  wq, scale = quant.ternary(w)
  c = _blocks((wq + 1).astype(jnp.uint8), 4, fill=1)  # padding decodes to 0
  packed = c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)
  return {"kernel_ternary": packed, "kernel_scale": scale.astype(jnp.float32)}


def ternary_dequantize(leaves: Mapping[str, jax.Array], shape, dtype=jnp.float32) -> jax.Array:
  """Ternary leaves -> W_q * scale of `shape`, as quant.quantize_weight computes it."""
  packed = leaves["kernel_ternary"]
  codes = (packed[:, None] >> jnp.asarray([0, 2, 4, 6], jnp.uint8)) & 3
  size = functools.reduce(lambda a, b: a * b, shape, 1)
  wq = codes.reshape(-1)[:size].astype(jnp.float32) - 1
  return (wq * leaves["kernel_scale"]).reshape(shape).astype(dtype)


# Per kind: the leaves replacing `kernel` (the first one tells the kind), their logical axes
# after any layer axes, quantize, dequantize, and the dot_general the dequantized kernel takes
# (None: the Dense's own).
QUANT_LEAVES = {
  "nf4": {
    "kernel_nf4": ("quant_blocks", None),
    "kernel_absmax": ("quant_blocks",),
    "kernel_absmax_scale": (None,),
    "kernel_absmax_mean": (),
  },
  "ternary": {"kernel_ternary": ("quant_blocks",), "kernel_scale": ()},
}
QUANTIZE = {"nf4": nf4_quantize, "ternary": ternary_quantize}
DEQUANTIZE = {"nf4": nf4_dequantize, "ternary": ternary_dequantize}
BASE_DOT_GENERAL = {"nf4": None, "ternary": quant.make_dot_general("bitnet158", deployed=True)}


def bits_per_weight(leaves: Mapping[str, jax.Array], size: int) -> float:
  """Storage of a quantized kernel of `size` weights, every scale included."""
  return sum(x.size * x.dtype.itemsize * 8 for x in jax.tree.leaves(leaves)) / size


# ---- param trees ---------------------------------------------------------------------------

# The body's Dense layers (their parent module and names) and their kernels' rank without
# layer axes; quantize_base touches these and nothing else.
BODY_DENSE = {
  "attn": (("query", "key", "value", "out"), 3),
  "cross_attn": (("query", "key", "value", "out"), 3),
  "mlp": (("up", "gate", "down"), 2),
}


def _is_module(x) -> bool:
  return isinstance(x, Mapping)


def _modules(tree: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Mapping]]:
  """("/"-joined path, subtree) of every module in a nested-dict param tree."""
  yield "/".join(path), tree
  for key, value in tree.items():
    if _is_module(value):
      yield from _modules(value, (*path, key))


def _map_modules(fn: Callable, tree: Mapping, path: tuple[str, ...] = ()) -> dict:
  """The tree with each module's own leaves (a dict of them) replaced by fn(path, leaves)."""
  out = {k: _map_modules(fn, v, (*path, k)) for k, v in tree.items() if _is_module(v)}
  own = fn(path, {k: v for k, v in tree.items() if not _is_module(v)})
  return {**own, **out}


def _quant_kind(leaves: Mapping) -> str | None:
  return next((k for k, names in QUANT_LEAVES.items() if next(iter(names)) in leaves), None)


def dense_paths(params: Mapping) -> list[str]:
  """The module path of every Dense (a float or quantized kernel): what targets can match."""
  kernels = ("kernel", *(next(iter(names)) for names in QUANT_LEAVES.values()))
  return [p for p, m in _modules(params) if any(k in m for k in kernels)]


def adapter_paths(params: Mapping) -> list[str]:
  """The module path of every Dense with adapters."""
  return [p for p, m in _modules(params) if ADAPTERS[0] in m]


def split(params: Mapping) -> tuple[dict, dict]:
  """(adapters, base): the lora_a / lora_b leaves with their nesting, and everything else."""
  adapters, base = {}, {}
  for key, value in params.items():
    if _is_module(value):
      a, b = split(value)
      if a:
        adapters[key] = a
      if b or not a:
        base[key] = b
    elif key in ADAPTERS:
      adapters[key] = value
    else:
      base[key] = value
  return adapters, base


def merge(adapters: Mapping, base: Mapping) -> dict:
  """The union of two param trees (split's inverse); a leaf in both is an error."""
  out = dict(base)
  for key, value in adapters.items():
    if key not in out:
      out[key] = value
    elif _is_module(value) and _is_module(out[key]):
      out[key] = merge(value, out[key])
    else:
      raise ValueError(f"merge: {key!r} is in both trees")
  return out


def _unboxed(x):
  return (x.value, x.names) if isinstance(x, nn.LogicallyPartitioned) else (x, None)


def _per_layer(fn: Callable, layers: int) -> Callable:
  for _ in range(layers):
    fn = jax.vmap(fn)
  return fn


def quantize_base(base: Mapping, kind: str) -> dict:
  """Every body Dense's `kernel` -> the `kind` leaves (QUANT_LEAVES), each layer of a scanned
  stack on its own; biases, norms, embeddings and heads unchanged. Works under jit and
  eval_shape, on plain or boxed (nn.LogicallyPartitioned) trees: a boxed kernel gives boxed
  leaves with its layer axes' names followed by QUANT_LEAVES' names."""
  if kind not in BASE_QUANTS:
    raise ValueError(f"model.lora.base_quant={kind!r}: allowed {list(BASE_QUANTS)}")
  if kind == "none":
    return base

  def quantize(path, leaves):
    names, rank = BODY_DENSE.get(path[-2] if len(path) > 1 else "", ((), 0))
    if "kernel" not in leaves or not path or path[-1] not in names:
      return leaves
    box = leaves.pop("kernel")
    w, axes = _unboxed(box)
    layers = w.ndim - rank
    quantized = _per_layer(QUANTIZE[kind], layers)(w)
    if axes is not None:
      quantized = {
        k: box.replace(value=v, names=(*axes[:layers], *QUANT_LEAVES[kind][k]))
        for k, v in quantized.items()
      }
    return {**leaves, **quantized}

  return _map_modules(quantize, base)


def dequantize_base(params: Mapping, shapes: Mapping) -> dict:
  """Quantized kernels -> float32 `kernel` leaves. `shapes`: the float model's param tree
  (arrays, or `jax.eval_shape` of its init; boxed or not), which holds each kernel's shape."""

  def dequantize(path, leaves):
    kind = _quant_kind(leaves)
    if kind is None:
      return leaves
    where = shapes
    for key in path:
      where = where[key]
    shape = _unboxed(where["kernel"])[0].shape
    own = {k: _unboxed(leaves.pop(k))[0] for k in QUANT_LEAVES[kind]}
    first, axes = next(iter(QUANT_LEAVES[kind].items()))
    layers = own[first].ndim - len(axes)
    fn = _per_layer(lambda q: DEQUANTIZE[kind](q, shape[layers:]), layers)
    return {**leaves, "kernel": fn(own)}

  return _map_modules(dequantize, params)


def fold(params: Mapping, lora: Lora, shapes: Mapping | None = None) -> dict:
  """A plain float param tree without adapters: W + scale * A @ B in every adapted Dense,
  the kernel dequantized first (`shapes` as in dequantize_base; needed for a quantized base).
  Over a ternary base the folded kernel is no longer ternary: a quant_deployed model reads it,
  but rounds the adapter's input to 8 bits too."""
  if any(_quant_kind(m) for _, m in _modules(params)):
    if shapes is None:
      raise ValueError("fold: the base is quantized; pass `shapes` (the float param tree)")
    params = dequantize_base(params, shapes)

  def add(path, leaves):
    if ADAPTERS[0] not in leaves:
      return leaves
    a, b = leaves.pop("lora_a"), leaves.pop("lora_b")
    w = leaves["kernel"]
    layers = a.ndim + b.ndim - 2 - w.ndim
    lead = a.shape[:layers]
    a_LIR = a.reshape(*lead, -1, a.shape[-1]).astype(jnp.float32)
    b_LRO = b.reshape(*lead, b.shape[layers], -1).astype(jnp.float32)
    ab = jnp.einsum("...ir,...ro->...io", a_LIR, b_LRO, precision=lax.Precision.HIGHEST)
    return {**leaves, "kernel": (w + lora.scale * ab.reshape(w.shape)).astype(w.dtype)}

  return _map_modules(add, params)
