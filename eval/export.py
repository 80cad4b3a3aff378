"""Export a checkpoint: a Hugging Face model folder, GGUF for llama.cpp, or (BitNet) the
project's packed format; a LoRA run merged into its base, or its adapters for PEFT.

python -m eval.export --workdir=runs/x --format=hf --output=runs/x/hf  (docs/huggingface.md)

python -m eval.export --workdir=runs/lora --merge_lora --format=hf --output=runs/lora/hf
python -m eval.export --workdir=runs/lora --merge_lora --format=workdir --output=runs/lora_merged
python -m eval.export --workdir=runs/lora --format=peft --output=runs/lora/peft

python -m eval.export --workdir=runs/bitnet --format=packed --output=runs/bitnet/model.packed.npz [--base3]
python -m eval.sample --packed=runs/bitnet/model.packed.npz --prompt="ROMEO:" --temperature=0
python -m eval.export --workdir=runs/bitnet --format=gguf --output=runs/bitnet/model.gguf [--gguf_type=TQ1_0]
python -m eval.export --workdir=runs/llama --format=gguf --output=runs/llama/model.gguf --gguf_type=Q8_0

The formats are described in eval/packed.py and eval/gguf_export.py. The command prints the
sizes it measured: packed, the quantized weights against the same weights in float32 and
bfloat16; GGUF, the bits per matrix weight read back from the file with `gguf`'s reader.
GGUF writes BitNet runs as llama.cpp's bitnet architecture (TQ2_0, TQ1_0, or their ternary
values in F32 / F16 / Q8_0 / Q4_0) and float decoders as its llama or gpt2 architecture
(F32, F16, Q8_0, Q4_0); docs/deploy.md.
"""

import os
import shutil
import tempfile

import numpy as np
from absl import app, flags

from eval.gguf_export import GGUF_TYPES, read_tensors, write_gguf
from eval.hf_io import export_hf
from eval.lora_export import check_request, export_peft, write_merged_workdir
from eval.packed import write_packed
from train import console

flags.DEFINE_string("workdir", None, "a training workdir (config.json + checkpoints/)")
flags.DEFINE_enum(
  "format",
  "packed",
  ["packed", "gguf", "hf", "peft", "workdir"],
  "packed: the project's own format (BitNet); gguf: llama.cpp (decoders); hf: a Hugging Face "
  "model folder (config.json, model.safetensors, tokenizer); peft: a LoRA run's adapters "
  "(adapter_config.json, adapter_model.safetensors); workdir (with --merge_lora): the merged "
  "model as a fourfold workdir",
)
flags.DEFINE_bool(
  "merge_lora",
  False,
  "a LoRA run: fold the adapters into the base (W + alpha/r A B) and export the result",
)
flags.DEFINE_string(
  "base_model",
  "",
  "peft: base_model_name_or_path (default: the init_from import's _name_or_path, if recorded)",
)
flags.DEFINE_enum(
  "gguf_type",
  "",
  ["", *GGUF_TYPES],
  "gguf: the matrices' tensor type; empty: TQ2_0 for BitNet, F16 for a float model",
)
flags.DEFINE_string("output", None, "the file to write (hf, peft, workdir: the folder)")
flags.DEFINE_bool(
  "base3", False, "packed: five ternary weights per byte (1.6 bits) instead of four"
)
FLAGS = flags.FLAGS


def mib(n: int) -> str:
  return f"{n / 2**20:.3f} MiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir)
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  check_request(FLAGS.workdir, FLAGS.format, FLAGS.merge_lora)
  if FLAGS.format == "peft":
    out = export_peft(FLAGS.workdir, FLAGS.output, FLAGS.base_model)
    fused = f"; fused modules with block adapters: {out['fused']}" if out["fused"] else ""
    print(
      f"wrote {FLAGS.output}: PEFT LoRA for {out['architecture']} "
      f"(base_model_name_or_path={out['config']['base_model_name_or_path']!r}), "
      f"{out['layers']} adapted layers in {out['modules']} modules, rank {out['rank']}, alpha "
      f"{out['alpha']}{fused}; {out['parameters']:,} parameters in {out['tensors']} tensors "
      f"({mib(out['bytes'])} float32)"
    )
    return
  if not FLAGS.merge_lora:
    export(FLAGS.workdir)
    return
  if FLAGS.format == "workdir":
    report_merge(write_merged_workdir(FLAGS.workdir, FLAGS.output))
    print(f"wrote {FLAGS.output}: a fourfold workdir (model.lora.rank=0, params only)")
    return
  # the merged workdir is written beside --output and removed once the export is done
  parent = os.path.dirname(os.path.abspath(FLAGS.output))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".merged-", dir=parent)
  try:
    merged = os.path.join(staging, "workdir")
    report_merge(write_merged_workdir(FLAGS.workdir, merged, unscanned=FLAGS.format == "hf"))
    export(merged)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def report_merge(s: dict) -> None:
  base = s["base_quant"] if s["base_quant"] != "none" else s["base_dtype"]
  blocks = sorted({p.split("/")[0] for p in s["adapted"]})
  kinds = sorted({p.split("/", 1)[-1] for p in s["adapted"]})
  print(
    f"merged LoRA rank {s['rank']}, alpha {s['alpha']} (scale {s['alpha'] / s['rank']:g}) into "
    f"{len(s['adapted'])} matrices: {', '.join(kinds)} of {', '.join(blocks)}"
  )
  print(
    f"adapters {s['adapter_parameters']:,} parameters ({mib(s['adapter_bytes'])}) + base "
    f"stored {base} ({mib(s['base_bytes'])}) -> merged {s['parameters']:,} float32 parameters "
    f"({mib(s['merged_bytes'])})"
  )


def export(workdir: str) -> None:
  """Writes --output from a workdir without adapters in --format (hf, gguf or packed)."""
  if FLAGS.format == "hf":
    out = export_hf(workdir, FLAGS.output)
    print(
      f"wrote {FLAGS.output}: {out['architecture']}, {out['parameters']:,} parameters in "
      f"{out['tensors']} tensors (float32 safetensors), config.json and the tokenizer"
    )
    return
  if FLAGS.format == "gguf":
    out = write_gguf(workdir, FLAGS.output, FLAGS.gguf_type)
    tensors = read_tensors(FLAGS.output)
    kinds = {}
    for kind, shape, size in tensors.values():
      if len(shape) == 2:
        n, b = kinds.get(kind, (0, 0))
        kinds[kind] = (n + int(np.prod(shape)), b + size)
    print(
      f"wrote {FLAGS.output}: {mib(os.path.getsize(FLAGS.output))}, {len(tensors)} tensors, "
      f"{out['parameters']:,} parameters"
    )
    for kind, (n, size) in sorted(kinds.items()):
      print(
        f"read back: {kind} matrices, {n:,} weights in {mib(size)}: "
        f"{8 * size / n:.4f} bits per weight"
      )
    return
  sizes = write_packed(workdir, FLAGS.output, FLAGS.base3)
  n = sizes["quantized_weights"]
  print(f"wrote {FLAGS.output}: {mib(sizes['file_bytes'])}")
  print(
    f"quantized weights: {n:,} of {sizes['all_weights']:,}; packed "
    f"{mib(sizes['quantized_packed_bytes'])} "
    f"({8 * sizes['quantized_packed_bytes'] / n:.3f} bits per weight, scales included) vs "
    f"float32 {mib(sizes['quantized_float32_bytes'])} "
    f"({sizes['quantized_float32_bytes'] / sizes['quantized_packed_bytes']:.1f}x) and bfloat16 "
    f"{mib(sizes['quantized_bfloat16_bytes'])}"
  )
  print(
    f"whole model: file {mib(sizes['file_bytes'])} vs all weights in float32 "
    f"{mib(sizes['all_float32_bytes'])} (embeddings, norms and the head stay float32)"
  )


if __name__ == "__main__":
  app.run(main)
