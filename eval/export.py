"""Export a trained checkpoint: `--format=packed` writes BitNet weights at 2 (or 1.6) bits.

python -m eval.export --workdir=runs/bitnet --format=packed --output=runs/bitnet/model.packed.npz [--base3]
python -m eval.sample --packed=runs/bitnet/model.packed.npz --prompt="ROMEO:" --temperature=0

The file format is described in eval/packed.py. The command prints the sizes it measured:
the quantized weights packed against the same weights in float32 and bfloat16, and the
whole file against all weights in float32.
"""

from absl import app, flags

from eval.packed import write_packed

flags.DEFINE_string("workdir", None, "a training workdir (config.json + checkpoints/)")
flags.DEFINE_enum("format", "packed", ["packed"], "packed: the project's own packed checkpoint")
flags.DEFINE_string("output", None, "the file to write")
flags.DEFINE_bool(
  "base3", False, "packed: five ternary weights per byte (1.6 bits) instead of four"
)
FLAGS = flags.FLAGS


def mib(n: int) -> str:
  return f"{n / 2**20:.3f} MiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  sizes = write_packed(FLAGS.workdir, FLAGS.output, FLAGS.base3)
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
