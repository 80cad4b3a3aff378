"""Import a Hugging Face checkpoint as a fourfold workdir.

python -m eval.import_hf --hf_dir=path/to/Llama-3.2-1B --workdir=runs/llama32_1b [--overwrite]

The folder holds config.json, model.safetensors (or a sharded index) and tokenizer.json or
tokenizer.model. The workdir is an ordinary one: eval.sample, eval.main, eval.score and
eval.export read it, and `train.main --config=configs/workdir.py:<workdir>` fine-tunes from
it (docs/huggingface.md). Architectures: eval/hf_arch.py's ARCHITECTURES.
"""

from absl import app, flags

from eval.hf_io import import_hf
from train import console

flags.DEFINE_string("hf_dir", None, "a Hugging Face model folder", required=True)
flags.DEFINE_string("workdir", None, "the workdir to create", required=True)
flags.DEFINE_bool("overwrite", False, "replace a non-empty --workdir")
flags.DEFINE_integer("fsdp", 1, "shard the params over this many devices as they are read")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(None)
  mesh = {"data": -1, "fsdp": FLAGS.fsdp, "tensor": 1}
  out = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.overwrite, mesh)
  unused = f"; not used: {out['unused']}" if out["unused"] else ""
  print(
    f"imported {out['architecture']}: {out['parameters']:,} parameters from "
    f"{out['tensors']} tensors into {FLAGS.workdir}{unused}",
    flush=True,
  )


if __name__ == "__main__":
  app.run(main)
