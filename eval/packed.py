"""Packed BitNet checkpoints: ternary weights at 2 (or 1.6) bits, binary at 1 bit.

A packed file is one .npz: the run's config (JSON), every full-precision parameter as
float32, and for each quantized kernel (the attention and MLP projections of a
`model.quant` model) its codes (uint8: four 2-bit or five base-3 ternary digits per byte, or
eight binary signs per byte), its scale (float32) and its shape. Scanned layers are
quantized per layer, as the training forward pass does. Loading rebuilds each kernel as
W_q * scale and runs the model with `quant_deployed`, so the packed model's forward pass is
the training-mode quantized forward pass, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from modeling import quant
from modeling.transformer import Transformer
from train import families
from train.data import make_tokenizer
from train.trainer import load_for_inference, saved_config

QUANTIZED_PARENTS = ("attn", "mlp")  # BitLinear layers: their kernels are quantized
SEP = "/"


def is_quantized(path: tuple[str, ...]) -> bool:
  """A kernel of an attention or MLP projection (not a head, embedding or norm)."""
  return path[-1] == "kernel" and any(p in QUANTIZED_PARENTS for p in path[:-2])


def quantize_kernel(kind: str, w: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  wq, scale = jax.jit(quant.WEIGHT_QUANTIZERS[kind])(w)
  return np.asarray(wq), np.asarray(scale, np.float32)


def pack_params(params, kind: str, scanned: bool, base3: bool = False) -> dict[str, np.ndarray]:
  """The arrays of a packed file (without the config)."""
  out = {}
  for path, leaf in flax.traverse_util.flatten_dict(params).items():
    name = SEP.join(path)
    w = np.asarray(leaf, np.float32)
    if not is_quantized(path):
      out[name] = w
      continue
    slices = list(w) if scanned and path[0] == "blocks" else [w]  # one scale per layer
    codes, scales = [], []
    for s in slices:
      wq, scale = quantize_kernel(kind, jnp.asarray(s))
      packed = quant.pack_binary(wq) if kind == "bitnet1" else quant.pack_ternary(wq, base3)
      codes.append(packed)
      scales.append(scale)
    out[f"{name}::codes"] = np.stack(codes)
    out[f"{name}::scale"] = np.stack(scales).astype(np.float32)
    out[f"{name}::shape"] = np.asarray(w.shape, np.int64)
  return out


def unpack_params(arrays: dict[str, np.ndarray], kind: str, base3: bool = False) -> dict:
  """Params with every quantized kernel rebuilt as W_q * scale (float32)."""
  flat = {}
  for key, value in arrays.items():
    if key == "config" or key.endswith(("::scale", "::shape")):
      continue
    if key.endswith("::codes"):
      name = key[: -len("::codes")]
      shape = tuple(arrays[f"{name}::shape"])
      scales = arrays[f"{name}::scale"]
      per_slice = int(np.prod(shape)) // len(scales)
      slices = []
      for codes, scale in zip(value, scales, strict=True):
        if kind == "bitnet1":
          wq = quant.unpack_binary(codes, per_slice)
        else:
          wq = quant.unpack_ternary(codes, per_slice, base3)
        slices.append(wq * np.float32(scale))
      flat[tuple(name.split(SEP))] = jnp.asarray(np.concatenate(slices).reshape(shape))
    else:
      flat[tuple(key.split(SEP))] = jnp.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def write_packed(workdir: str, output: str, base3: bool = False) -> dict[str, int]:
  """Writes the packed file; returns the byte counts it reports."""
  config, model, params, _ = load_for_inference(workdir)
  kind = config.model.quant
  if kind == "none":
    raise ValueError(
      f"--workdir={workdir}: model.quant='none'; --format=packed needs a bitnet158 or bitnet1 run"
    )
  if base3 and kind != "bitnet158":
    raise ValueError("--base3 packs ternary weights; this run is bitnet1 (binary)")
  arrays = pack_params(params, kind, model.cfg.scan_layers, base3)
  meta = dict(config=config.to_dict(), base3=base3)
  arrays["config"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, "wb") as f:
    np.savez(f, **arrays)
  n_quant = sum(int(np.prod(v)) for k, v in arrays.items() if k.endswith("::shape"))
  n_all = sum(x.size for x in jax.tree.leaves(params))
  packed = sum(arrays[k].nbytes for k in arrays if k.endswith(("::codes", "::scale")))
  return {
    "quantized_weights": n_quant,
    "all_weights": n_all,
    "quantized_packed_bytes": packed,
    "quantized_float32_bytes": 4 * n_quant,
    "quantized_bfloat16_bytes": 2 * n_quant,
    "file_bytes": os.path.getsize(output),
    "all_float32_bytes": 4 * n_all,
  }


def load_packed(path: str):
  """(config, model, params, tokenizer) from a packed file; the model runs `quant_deployed`."""
  if not os.path.exists(path):
    raise ValueError(f"--packed={path!r}: no such file")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  if "config" not in arrays:
    raise ValueError(f"--packed={path!r}: not a fourfold packed file (no config)")
  meta = json.loads(arrays["config"].tobytes().decode())
  config = saved_config(meta["config"])
  tokenizer = make_tokenizer(config.data.tokenizer)
  cfg = families.resolve(config).transformer_config(config, tokenizer.vocab_size)
  model = Transformer(dataclasses.replace(cfg, quant_deployed=True))
  params = unpack_params(arrays, config.model.quant, meta["base3"])
  return config, model, params, tokenizer
