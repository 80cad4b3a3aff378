"""LoRA runs out of fourfold: folded into their base for any export format, or as PEFT
adapters for a Hugging Face base.

A LoRA run's checkpoint holds the adapters alone (the base is rebuilt from `init_from` or the
seeded init), so the ordinary exporters would write the base without them. Two ways out:

  merged  `write_merged_workdir`: every adapted kernel becomes W + (alpha / r) A B
          (modeling.lora.fold; an NF4 base is dequantized first, a bfloat16 one cast to
          float32), written as a plain workdir (config.json with model.lora.rank=0, a
          params-only checkpoint) that eval.export, eval.sample, eval.main and fine-tuning read.
  peft    `export_peft`: adapter_config.json + adapter_model.safetensors in PEFT's LoRA
          layout, found through eval/hf_arch.py's links, for the HF base the run started from.

PEFT computes h = W x + (lora_alpha / r) B A x with lora_A.weight A [r, in] and lora_B.weight
B [out, r]; fourfold's adapters are a [*in, r] and b [r, *out] with y = x W + (alpha / r) x a b,
so A = a^T and B = b^T with the in and out dims flattened. A fused HF projection (GPT-2's
c_attn, Phi-3's qkv_proj and gate_up_proj) holding k adapted parts j, each with rows o_j ..
o_j + n_j of the fused output, gets one block adapter of rank k r:

  A = [a_1^T; ...; a_k^T]  [k r, in]      B[o_j : o_j + n_j, (j-1) r : j r] = b_j^T, else 0

so B A stacks each part's b_j^T a_j^T on its own rows (zero rows for parts without
adapters), and `rank_pattern` / `alpha_pattern` give that module r' = k r and alpha' = k alpha,
keeping alpha' / r' = alpha / r: the update is exactly the separate adapters'.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from configs import base
from eval.hf_io import (
  TOKENIZER_FILES,
  _flatten,
  _tokenizer_dir,
  choose_arch,
  read_hf_config,
  unstack_layers,
)
from modeling import lora
from train import families
from train.checkpoint import ParamsWriter
from train.data import make_tokenizer
from train.step import make_init_params
from train.trainer import load_for_inference

# the PEFT task_type of each architecture's head (None: PEFT's plain PeftModel)
PEFT_TASK_TYPES = {
  "GPT2LMHeadModel": "CAUSAL_LM",
  "LlamaForCausalLM": "CAUSAL_LM",
  "Phi3ForCausalLM": "CAUSAL_LM",
  "T5ForConditionalGeneration": "SEQ_2_SEQ_LM",
  "BertModel": "FEATURE_EXTRACTION",
  "BertForMaskedLM": None,
  "RobertaForMaskedLM": None,
}
PEFT_PREFIX = "base_model.model."  # PeftModel's name for the wrapped model's modules
MERGE_REFUSED = ("packed", "gguf")  # formats of ternary weights: no merged kernel is ternary


def read_config(workdir: str):
  """The workdir's config.json as saved (its own mesh), keys added since at their defaults."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"--workdir={workdir!r}: no config.json; is it a fourfold training workdir?")
  with open(path) as f:
    return base.from_saved(json.load(f))


def check_request(workdir: str, fmt: str, merge_lora: bool) -> None:
  """Refuses what would export the wrong model: a LoRA run without --merge_lora (its base
  alone would be written), --merge_lora on a run without adapters or into a BitNet-only
  format, --format=workdir without --merge_lora, and --merge_lora with --format=peft."""
  rank = read_config(workdir).model.lora.rank
  if fmt == "peft" and merge_lora:
    raise ValueError("--format=peft writes the adapters alone; drop --merge_lora")
  if fmt == "peft":
    return
  if merge_lora and fmt in MERGE_REFUSED:
    raise ValueError(
      f"--merge_lora --format={fmt}: {fmt} holds a BitNet model's ternary weights, and a merged "
      "kernel W + (alpha / r) A B is not ternary; export --format=hf or --format=workdir"
    )
  if merge_lora and not rank:
    raise ValueError(
      f"--merge_lora: --workdir={workdir} is not a LoRA run (model.lora.rank=0); export it "
      "without --merge_lora"
    )
  if rank and not merge_lora:
    raise ValueError(
      f"--workdir={workdir} is a LoRA run (model.lora.rank={rank}): its checkpoint holds the "
      f"adapters only. Pass --merge_lora to fold them into the base for --format={fmt}, or "
      "write the adapters alone with --format=peft"
    )
  if fmt == "workdir" and not merge_lora:
    raise ValueError("--format=workdir writes a LoRA run merged into its base: pass --merge_lora")


def float_shapes(config, model, unscanned: bool = False) -> dict:
  """The float model's param tree as shapes (jax.eval_shape of its init): every kernel's
  shape, which a quantized base's leaves do not hold. `unscanned`: one subtree per layer."""
  if unscanned:
    model = model.clone(cfg=dataclasses.replace(model.cfg, scan_layers=False))
  example = {k: jnp.zeros((1, n), jnp.int32) for k, n in families.packed_lengths(config).items()}
  return nn.unbox(jax.eval_shape(make_init_params(model, example), jax.random.PRNGKey(0)))


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def merged_params(workdir: str):
  """(config, model, params, summary): the LoRA run's weights with every adapter folded into
  its kernel, all float32. Refused where the merged model would not compute the LoRA model's
  function: a BitNet model (model.quant) rounds each kernel to ternary in its forward pass,
  and W + (alpha / r) A B is not ternary."""
  m = read_config(workdir).model  # checked before the weights are loaded
  if not m.lora.rank:
    raise ValueError(f"--merge_lora: --workdir={workdir} is not a LoRA run (model.lora.rank=0)")
  if m.quant != "none":
    raise ValueError(
      f"--merge_lora: model.quant={m.quant!r} (model.lora.base_quant={m.lora.base_quant!r}) "
      "quantizes each kernel in the forward pass, so the folded W + (alpha / r) A B would be "
      "rounded with the adapters inside it: no merged model computes this LoRA model's "
      "function. Merging is supported over float and NF4 bases (model.quant='none')"
    )
  config, model, params, _ = load_for_inference(workdir)
  lo = model.cfg.lora
  adapters, stored_base = lora.split(params)
  adapted = lora.adapter_paths(unstack_layers(params))  # one path per layer's matrix
  as_float = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
  folded = lora.fold(jax.tree.map(as_float, params), lo, float_shapes(config, model))
  summary = {
    "adapted": adapted,
    "rank": lo.rank,
    "alpha": lo.alpha,
    "base_quant": lo.base_quant,
    "base_dtype": m.lora.base_dtype,
    "adapter_parameters": sum(x.size for x in jax.tree.leaves(adapters)),
    "adapter_bytes": _nbytes(adapters),
    "base_bytes": _nbytes(stored_base),
    "parameters": sum(x.size for x in jax.tree.leaves(folded)),
    "merged_bytes": _nbytes(folded),
  }
  return config, model, folded, summary


def _copy_tokenizer(config, output: str) -> None:
  """An hf: tokenizer is copied beside the weights (as eval.import_hf does), so the merged
  workdir stands alone; byte and spm: tokenizers are named by the config."""
  tok_dir = _tokenizer_dir(config)
  if not tok_dir:
    return
  dest = os.path.join(output, "tokenizer")
  os.makedirs(dest, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(tok_dir, name)):
      shutil.copy(os.path.join(tok_dir, name), dest)
  config.data.tokenizer = f"hf:{os.path.abspath(dest)}"


def write_merged_workdir(workdir: str, output: str, unscanned: bool = False) -> dict:
  """Writes `output` as a plain fourfold workdir of the merged model: the run's config.json
  with model.lora.rank=0, a float32 base and no init_from (the checkpoint holds every
  weight), its tokenizer, and checkpoints/0 holding the params only (like an import).
  `unscanned`: scanned layers written one subtree each (the HF links name one tensor per
  layer). Returns merged_params' summary."""
  if os.path.isdir(output) and os.listdir(output):
    raise ValueError(f"--output={output} exists and is not empty; give a new directory")
  _, model, params, summary = merged_params(workdir)
  config = read_config(workdir)  # as saved: the run's own mesh, not the inference one
  config.model.lora = base.get_config().model.lora  # rank 0: no adapters, a float32 base
  config.init_from = ""
  if unscanned and model.cfg.scan_layers:
    params = unstack_layers(params)
    config.model.scan_layers = False
  os.makedirs(output, exist_ok=True)
  writer = ParamsWriter(output)
  writer.add(params)
  writer.finish()
  _copy_tokenizer(config, output)
  with open(os.path.join(output, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return summary


# ---- PEFT


def _short(module: str) -> str:
  return module.rsplit(".", 1)[-1]


def _names(chosen: dict[str, object], candidates: list[str], regex: bool) -> dict[str, object]:
  """{PEFT name: value} selecting exactly the modules of `chosen` among `candidates`: a
  module's last name ("q_proj") where every candidate with that name is chosen with the same
  value, else its full path. PEFT matches target_modules by equality or a '.'-bounded
  suffix, and rank_pattern / alpha_pattern as regexes (`regex`: full paths escaped)."""
  by_short: dict[str, list[str]] = {}
  for m in candidates:
    by_short.setdefault(_short(m), []).append(m)
  out = {}
  for short, modules in by_short.items():
    hit = [m for m in modules if m in chosen]
    if not hit:
      continue
    if len(hit) == len(modules) and len({json.dumps(chosen[m]) for m in hit}) == 1:
      out[short] = chosen[hit[0]]
    else:
      out.update({(re.escape(m) if regex else m): chosen[m] for m in hit})
  return out


def _orientation(link, shapes: list[tuple], n_in: int) -> str:
  """'linear' ([out, in], outputs stacked on rows) or 'conv1d' ([in, out], on columns): what
  the link's to_hf makes of distinct probe values, so a link of another form is refused
  instead of receiving misplaced adapters."""
  probes, start = [], 0
  for shape in shapes:
    size = int(np.prod(shape))
    probes.append(np.arange(start, start + size, dtype=np.float64).reshape(shape))
    start += size
  flats = [p.reshape(n_in, -1) for p in probes]
  got = link.to_hf(probes)[0]
  if np.array_equal(got, np.concatenate([f.T for f in flats], 0)):
    return "linear"
  if np.array_equal(got, np.concatenate(flats, 1)):
    return "conv1d"
  raise ValueError(
    f"{link.hf[0]}: not an [out, in] or [in, out] matrix of {list(link.ours)}; PEFT export "
    "cannot place its adapters"
  )


def _base_model_name(config, given: str) -> str | None:
  """--base_model, else the `_name_or_path` of the HF checkpoint `init_from` was imported
  from (its tokenizer/config.json), when it records one."""
  if given:
    return given
  source = os.path.join(config.init_from or "", "tokenizer", "config.json")
  if config.init_from and os.path.exists(source):
    with open(source) as f:
      return json.load(f).get("_name_or_path") or None
  return None


def export_peft(workdir: str, output: str, base_model: str = "") -> dict:
  """Writes `output`/adapter_config.json + adapter_model.safetensors (PEFT LoRA) from a LoRA
  run, for the HF architecture that represents its model (eval.hf_io.choose_arch); returns a
  summary. Fused HF projections get the block adapters of the module docstring."""
  config = read_config(workdir)  # the architecture is chosen before the weights are loaded
  if not config.model.lora.rank:
    raise ValueError(
      f"--format=peft: --workdir={workdir} is not a LoRA run (model.lora.rank=0); export it "
      "with --format=hf"
    )
  plain = copy.deepcopy(config)
  plain.model.lora = base.get_config().model.lora  # the base model, as the HF checkpoint holds it
  tok_dir = _tokenizer_dir(config)
  source = (
    read_hf_config(tok_dir)
    if tok_dir and os.path.exists(os.path.join(tok_dir, "config.json"))
    else {}
  )
  vocab_size = make_tokenizer(config.data.tokenizer).vocab_size
  try:
    arch = choose_arch(plain, vocab_size, (source.get("architectures") or [""])[0])
  except ValueError as e:
    raise ValueError(f"--format=peft: {e}") from e
  config, model, params, _ = load_for_inference(workdir)
  lo = model.cfg.lora
  adapters = _flatten(unstack_layers(lora.split(params)[0]))
  adapted = {
    k[: -len("/lora_a")]: (
      np.asarray(jax.device_get(v), np.float32),
      np.asarray(jax.device_get(adapters[k[: -len("lora_a")] + "lora_b"]), np.float32),
    )
    for k, v in adapters.items()
    if k.endswith("/lora_a")
  }
  shapes = {k: tuple(v.shape) for k, v in _flatten(float_shapes(config, model, True)).items()}
  r = lo.rank
  tensors, ranks, orientations, placed, modules = {}, {}, {}, set(), []
  for link in arch.links(model.cfg):
    if not link.ours[0].endswith("/kernel"):
      continue
    module = arch.prefix + link.hf[0].removesuffix(".weight")
    modules.append(module)
    parts = [p.removesuffix("/kernel") for p in link.ours]
    hit = [j for j, p in enumerate(parts) if p in adapted]
    if not hit:
      continue
    part_shapes = [shapes[p] for p in link.ours]
    n_in = int(np.prod(adapted[parts[hit[0]]][0].shape[:-1]))
    orientations[module] = _orientation(link, part_shapes, n_in)
    outs = [int(np.prod(s)) // n_in for s in part_shapes]
    starts = np.cumsum([0, *outs])
    a_RI = np.zeros((len(hit) * r, n_in), np.float32)
    b_OR = np.zeros((starts[-1], len(hit) * r), np.float32)
    for block, j in enumerate(hit):
      a, b = adapted[parts[j]]
      a_RI[block * r : (block + 1) * r] = a.reshape(n_in, r).T
      b_OR[starts[j] : starts[j + 1], block * r : (block + 1) * r] = b.reshape(r, -1).T
      placed.add(parts[j])
    tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a_RI
    tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b_OR
    ranks[module] = len(hit)
  missing = sorted(set(adapted) - placed)
  if missing:
    raise ValueError(
      f"--format=peft: {arch.name} has no linear module for the adapted layers {missing} "
      f"(model.lora.targets={lo.targets!r})"
    )
  if len(set(orientations.values())) > 1:
    raise ValueError(
      f"--format=peft: {arch.name} mixes [out, in] and Conv1D [in, out] adapted modules "
      f"({orientations}); PEFT's fan_in_fan_out is one flag for all"
    )
  alpha = int(lo.alpha) if float(lo.alpha).is_integer() else lo.alpha
  fused = {m: k for m, k in ranks.items() if k > 1}
  adapter_config = {
    "peft_type": "LORA",
    "task_type": PEFT_TASK_TYPES[arch.name],
    "base_model_name_or_path": _base_model_name(config, base_model),
    "r": r,
    "lora_alpha": alpha,
    "target_modules": sorted(_names(dict.fromkeys(ranks, True), modules, regex=False)),
    "rank_pattern": _names({m: k * r for m, k in fused.items()}, list(ranks), regex=True),
    "alpha_pattern": _names({m: k * alpha for m, k in fused.items()}, list(ranks), regex=True),
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": "conv1d" in orientations.values(),
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "inference_mode": True,
  }
  os.makedirs(output, exist_ok=True)
  save_file(tensors, os.path.join(output, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(output, "adapter_config.json"), "w") as f:
    json.dump(adapter_config, f, indent=2)
  return {
    "architecture": arch.name,
    "modules": len(ranks),
    "layers": len(placed),
    "fused": fused,
    "rank": r,
    "alpha": lo.alpha,
    "tensors": len(tensors),
    "parameters": sum(x.size for x in tensors.values()),
    "bytes": sum(x.nbytes for x in tensors.values()),
    "config": adapter_config,
  }
