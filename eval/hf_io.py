"""Hugging Face checkpoints in and out: `import_hf` makes a workdir from a model folder,
`export_hf` writes a workdir as one (config.json + model.safetensors + tokenizer files).

Import streams: tensors are read one at a time (`safetensors`), converted through the
architecture's links (eval/hf_arch.py) and placed straight into their shardings on the
config's mesh, so the host holds one full tensor at a time and no device gathers more
than its shard. Everything is checked (architecture, config, files, tokenizer size, every
tensor's name and shape) before anything is written to the workdir.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read it)
import numpy as np
from absl import logging
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from configs import base
from eval.hf_arch import ARCHITECTURES, Arch, Link, Unsupported, arch_of
from modeling.vocab import NUM_SPECIAL
from train import families, sharding
from train.checkpoint import ParamsWriter
from train.data import make_tokenizer
from train.data.tokenizers import HF_TOKENIZER_FILES
from train.optim import make_optimizer
from train.trainer import abstract_state, load_for_inference
from train.validation import validate_config

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "spiece.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "generation_config.json",
  "config.json",
)
# fields of the model config that do not change what the model computes
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat", "attention_impl", "dropout", "quant_deployed")
# and of `model.moe`: the dropless path taken, and what only training reads
MOE_RUNTIME_FIELDS = {"impl": "ragged", "bias_update_rate": 0.0, "balance_loss": 0.0}


# ---- reading a model folder


class SafetensorsFolder:
  """The tensors of `model.safetensors` or a sharded `model.safetensors.index.json`."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    single = os.path.join(hf_dir, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      missing = sorted(
        {v for v in weight_map.values() if not os.path.exists(os.path.join(hf_dir, v))}
      )
      if missing:
        raise ValueError(f"{index} names files that are not in {hf_dir}: {missing}")
      self.files = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, "numpy") as f:
        self.files = dict.fromkeys(f.keys(), single)
    else:
      raise ValueError(f"--hf_dir={hf_dir}: no model.safetensors or model.safetensors.index.json")
    self.dtypes: dict[str, int] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def read(self, name: str) -> np.ndarray:
    """One tensor as float32 (bf16 / fp16 are cast; counted in `dtypes`)."""
    with safe_open(self.files[name], "numpy") as f:  # opened per tensor: nothing stays mapped
      x = f.get_tensor(name)
    self.dtypes[str(x.dtype)] = self.dtypes.get(str(x.dtype), 0) + 1
    return x.astype(np.float32, copy=False)


def _canonical(name: str, arch: Arch) -> str:
  """Checkpoint name -> the name the links use: the base model's prefix dropped (old GPT-2
  checkpoints lack it), TF-era LayerNorm gamma/beta renamed."""
  if arch.prefix and name.startswith(arch.prefix):
    name = name[len(arch.prefix) :]
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
    "LayerNorm.beta", "LayerNorm.bias"
  )


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--hf_dir={hf_dir}: no config.json")
  with open(path) as f:
    return json.load(f)


def fourfold_config(hf: dict, arch: Arch, tokenizer_dir: str):
  """A full fourfold config for the checkpoint (unscanned layers, its tokenizer)."""
  config = base.get_config()
  config.model.family = arch.family
  config.model.update(arch.read_config(hf))
  config.model.scan_layers = False  # the links name one tensor per layer
  config.task.update(arch.task)
  config.data.tokenizer = f"hf:{os.path.abspath(tokenizer_dir)}"
  max_len = config.model.max_len
  config.data.seq_len = min(256, max_len) if max_len else 256
  config.train.num_samples = 0
  return config


def _flatten(tree) -> dict[str, object]:
  return traverse_util.flatten_dict(tree, sep="/")


def _unflatten(flat: dict[str, object]) -> dict:
  return traverse_util.unflatten_dict(flat, sep="/")


def unstack_layers(params: dict) -> dict:
  """Scanned stacks (`blocks`, `encoder_blocks`, ...: each leaf with a leading layer axis) ->
  one subtree per layer (`block_0`, `encoder_block_0`, ...), the unscanned model's tree that
  the links name; every other param unchanged."""
  out = {}
  for key, value in params.items():
    if key.endswith("blocks") and isinstance(value, dict):
      layers = jax.tree.leaves(value)[0].shape[0]
      for i in range(layers):
        out[f"{key[: -len('blocks')]}block_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    else:
      out[key] = value
  return out


def _place(x: np.ndarray, target) -> jax.Array:
  """A host array -> a global array in `target`'s sharding, each device given its slice."""
  placed = jax.make_array_from_callback(x.shape, target.sharding, lambda index: x[index])
  return placed.block_until_ready()  # the transfer is done before the host array goes


def convert_tensors(
  folder: SafetensorsFolder,
  arch: Arch,
  links: list[Link],
  abstract: dict,
  write: Callable,
  reads_past: Callable[[str], bool] | None = None,
):
  """Converts every link's tensors, placed in their shardings, handing them to `write` a
  layer at a time; returns (parameters, tensors read past). Errors name the missing or extra
  tensors, or the first shape that does not fit."""
  available = {_canonical(n, arch): n for n in folder.names()}
  wanted = [n for link in links for n in link.hf]
  missing = [n for n in wanted if n not in available]
  if missing:
    raise ValueError(
      f"{arch.name}: the checkpoint lacks {len(missing)} tensors the config needs: {missing[:8]}"
    )
  leftover = sorted(set(available) - set(wanted))
  reads_past = reads_past or (lambda n: any(n.startswith(u) for u in arch.unused))
  unused = [n for n in leftover if reads_past(n)]
  extra = [n for n in leftover if n not in unused and not any(n.endswith(s) for s in arch.ignored)]
  if extra:
    raise ValueError(
      f"{arch.name}: the checkpoint has {len(extra)} tensors the model does not use: {extra[:8]}"
    )
  if unused:
    logging.info("%s: not used (heads or layers %s lacks): %s", arch.name, arch.name, unused)
  written: set[str] = set()
  group, group_name = {}, None
  for link in links:
    name = link.ours[0].split("/")[0]  # one partial save per layer (or top-level param)
    if group and name != group_name:
      write(_unflatten(group))
      group = {}
    group_name = name
    shapes = [tuple(abstract[p].shape) for p in link.ours]
    arrays = [folder.read(available[n]) for n in link.hf]
    try:
      ours = link.to_ours(arrays, shapes)
    except ValueError as e:  # a split or reshape that does not fit
      got = [a.shape for a in arrays]
      raise ValueError(
        f"{link.hf}: shape {got} does not fit {dict(zip(link.ours, shapes, strict=True))}: {e}"
      ) from e
    for path, x, shape in zip(link.ours, ours, shapes, strict=True):
      if x.shape != shape:
        raise ValueError(f"{link.hf}: gives {path} shape {x.shape}, the config needs {shape}")
      group[path] = _place(x, abstract[path])
      written.add(path)
    del arrays, ours  # one link's host arrays at a time
  not_loaded = sorted(set(abstract) - written)
  if not_loaded:
    raise ValueError(f"{arch.name}: no checkpoint tensor fills {not_loaded[:8]}")
  write(_unflatten(group))
  return sum(int(np.prod(abstract[p].shape)) for p in written), unused


def _refuse_non_empty(workdir: str, overwrite: bool) -> None:
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise ValueError(f"--workdir={workdir} exists and is not empty; pass --overwrite to replace it")


def import_hf(hf_dir: str, workdir: str, overwrite: bool = False, mesh: dict | None = None) -> dict:
  """Writes `workdir` (config.json, tokenizer/, checkpoints/0 holding the params) from a
  Hugging Face model folder; returns a summary. The params are written a layer at a time into
  a sibling directory that replaces `workdir` only when everything passed: nothing is written
  to `workdir` if any check fails. `mesh` ({data, fsdp, tensor} sizes, -1 for the rest)
  shards each param over the devices as it is placed."""
  _refuse_non_empty(workdir, overwrite)
  hf = read_hf_config(hf_dir)
  arch = arch_of(hf)
  folder = SafetensorsFolder(hf_dir)
  if not any(os.path.exists(os.path.join(hf_dir, f)) for f in HF_TOKENIZER_FILES):
    raise ValueError(f"--hf_dir={hf_dir}: no tokenizer file, one of {HF_TOKENIZER_FILES}")
  config = fourfold_config(hf, arch, hf_dir)
  config.mesh.update(mesh or {})  # where the params are placed as they are read
  tokenizer = make_tokenizer(config.data.tokenizer)
  rows = config.model.vocab_size
  if tokenizer.vocab_size > rows:
    raise ValueError(
      f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} ids but the embedding only "
      f"{rows} rows (config.json vocab_size)"
    )
  wiring = validate_config(config)
  model, _ = wiring.build(config, tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  abstract, _, _ = abstract_state(config, model, make_optimizer(config.train), mesh, rules)
  abstract = _flatten(abstract.params)

  target = os.path.abspath(workdir)
  staging = tempfile.mkdtemp(
    prefix=os.path.basename(target) + ".importing-", dir=os.path.dirname(target)
  )
  try:
    writer = ParamsWriter(staging)
    links, cfg = arch.links(model.cfg), model.cfg
    reads_past = lambda name: arch.reads_past(name, cfg)  # noqa: E731
    n, unused = convert_tensors(folder, arch, links, abstract, writer.add, reads_past)
    writer.finish()
    tok_dir = os.path.join(staging, "tokenizer")
    os.makedirs(tok_dir)
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(hf_dir, name)):
        shutil.copy(os.path.join(hf_dir, name), tok_dir)
    config.data.tokenizer = f"hf:{os.path.join(target, 'tokenizer')}"
    with open(os.path.join(staging, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    _refuse_non_empty(workdir, overwrite)
    if os.path.isdir(target):
      shutil.rmtree(target)
    os.replace(staging, target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  casts = {k: v for k, v in folder.dtypes.items() if k != "float32"}
  if casts:
    logging.info("cast to float32 (the params' dtype): %s", casts)
  return {
    "architecture": arch.name,
    "parameters": n,
    "tensors": sum(folder.dtypes.values()),
    "unused": unused,
  }


# ---- writing a model folder


def _model_fields(config, vocab_size: int) -> dict:
  cfg = families.resolve(config).transformer_config(config, vocab_size)
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
  fields["moe"].update(MOE_RUNTIME_FIELDS)
  if cfg.mlp in ("relu", "swiglu") and cfg.head != "mlm":
    del fields["gelu"]  # no GELU anywhere in the model
  return fields


def mismatches(config, arch: Arch, vocab_size: int) -> list[str]:
  """What `arch` cannot represent: the model fields that differ once the config is written
  as `arch`'s config.json and read back."""
  if config.model.family != arch.family or families.resolve(config).task.head != _head(arch):
    return [f"model.family={config.model.family!r} / task.name={config.task.name!r}"]
  probe = copy.deepcopy(config)
  probe.model = base.get_config().model
  probe.model.family = arch.family
  try:
    probe.model.update(arch.read_config(hf_config_of(config, arch, vocab_size)))
  except Unsupported as e:
    return [str(e)]
  ours, back = _model_fields(config, vocab_size), _model_fields(probe, vocab_size)
  return [
    f"model.{k}={ours[k]!r} (written as {arch.name} it reads back as {back.get(k)!r})"
    for k in ours
    if ours[k] != back.get(k)  # `gelu` is left out of a model without GELU
  ]


def _head(arch: Arch) -> str:
  return families.FAMILIES[arch.family].tasks[arch.task["name"]].head


def hf_config_of(config, arch: Arch, vocab_size: int) -> dict:
  """`arch`'s config.json fields for the model (derived sizes resolved)."""
  m = copy.deepcopy(config.model)
  m.vocab_size = families.resolve(config).transformer_config(config, vocab_size).vocab_size
  m.head_dim = m.head_dim or m.d_model // m.num_heads
  m.max_len = m.max_len or config.data.seq_len
  m.num_decoder_layers = m.num_decoder_layers or m.num_layers
  return arch.write_config(m)


def choose_arch(config, vocab_size: int, preferred: str = "") -> Arch:
  """The architecture that represents this model exactly (the imported one first)."""
  order = sorted(ARCHITECTURES.values(), key=lambda a: a.name != preferred)
  problems = {}
  for arch in order:
    problems[arch.name] = mismatches(config, arch, vocab_size)
    if not problems[arch.name]:
      return arch
  near = {k: v for k, v in problems.items() if not v[0].startswith("model.family=")}
  detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in (near or problems).items())
  raise ValueError(f"no Hugging Face architecture represents this model exactly: {detail}")


def export_hf(workdir: str, output: str) -> dict:
  """Writes `output` (config.json, model.safetensors, tokenizer files) from a workdir."""
  config, model, params, tokenizer = load_for_inference(workdir)
  tok_dir = _tokenizer_dir(config)
  source = (
    read_hf_config(tok_dir)
    if tok_dir and os.path.exists(os.path.join(tok_dir, "config.json"))
    else {}
  )
  arch = choose_arch(config, tokenizer.vocab_size, (source.get("architectures") or [""])[0])
  cfg = model.cfg
  if cfg.scan_layers:
    raise ValueError(
      "model.scan_layers=True: export a run with unscanned layers (the links name one tensor per layer)"
    )
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in _flatten(params).items()}
  tensors = {}
  for link in arch.links(cfg):
    for name, x in zip(link.hf, link.to_hf([flat[p] for p in link.ours]), strict=True):
      tensors[arch.prefix + name] = np.ascontiguousarray(x)
  hf = {
    **_special_ids(tokenizer, arch),
    **{k: v for k, v in source.items() if k.endswith("token_id") or k == "task_specific_params"},
    **hf_config_of(config, arch, tokenizer.vocab_size),
    "architectures": [arch.name],
    "model_type": arch.model_type,
    "torch_dtype": "float32",
    "dtype": "float32",
  }
  os.makedirs(output, exist_ok=True)
  save_file(tensors, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(output, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  _write_tokenizer(tokenizer, tok_dir, output)
  return {
    "architecture": arch.name,
    "tensors": len(tensors),
    "parameters": sum(x.size for x in tensors.values()),
  }


def _tokenizer_dir(config) -> str:
  spec = config.data.tokenizer
  return spec[len("hf:") :] if spec.startswith("hf:") else ""


def _special_ids(tokenizer, arch: Arch) -> dict:
  s = tokenizer.specials
  stop = list(s.stop_ids)
  out = {
    "bos_token_id": s.bos,
    "eos_token_id": stop[0] if len(stop) == 1 else stop,
    "pad_token_id": s.pad,
  }
  if arch.family == "encdec":
    out["decoder_start_token_id"] = s.decoder_start
  return out


def _write_tokenizer(tokenizer, tok_dir: str, output: str) -> None:
  if tok_dir:
    for name in TOKENIZER_FILES:
      if name != "config.json" and os.path.exists(os.path.join(tok_dir, name)):
        shutil.copy(os.path.join(tok_dir, name), output)
    return
  if not tokenizer.is_byte_level:
    raise ValueError(
      f"data.tokenizer: the weights are written, but {type(tokenizer).__name__} has no "
      "Hugging Face form here (byte-level and hf: tokenizers do)"
    )
  write_byte_tokenizer(output)


# GPT-2's reversible map of the 256 bytes onto printable characters (byte-level BPE's alphabet)
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
BYTE_CHARS = {b: chr(b) for b in _PRINTABLE} | {
  b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in _PRINTABLE)
}
# the ids 0..7, named so that no ordinary text spells them (transformers matches special
# tokens in the text before the bytes)
SPECIAL_NAMES = tuple(
  f"<|fourfold_{n}|>" for n in ("pad", "eos", "bos", "mask", "cls", "sep", "unk", "reserved7")
)


def write_byte_tokenizer(output: str) -> None:
  """tokenizer.json + tokenizer_config.json giving the byte tokenizer's ids: byte b is
  NUM_SPECIAL + b (a byte-level BPE with no merges), the specials at 0..7."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  vocab = {name: i for i, name in enumerate(SPECIAL_NAMES)}
  vocab |= {BYTE_CHARS[b]: NUM_SPECIAL + b for b in range(256)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in SPECIAL_NAMES])
  tok.save(os.path.join(output, "tokenizer.json"))
  roles = ("pad", "eos", "bos", "mask", "cls", "sep", "unk")
  names = {f"{r}_token": SPECIAL_NAMES[i] for i, r in enumerate(roles)}
  with open(os.path.join(output, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **names}, f, indent=2)
