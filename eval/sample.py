"""Sample from a trained checkpoint: one CLI for autoregressive and diffusion models.

python -m eval.sample --workdir=runs/x --prompt="def " --num_tokens=200 --temperature=0.8 [--top_k=40] [--top_p=0.95]
python -m eval.sample --packed=runs/bitnet/model.packed.npz --prompt="ROMEO:" --temperature=0
python -m eval.sample --workdir=runs/mdlm --prompt="ROMEO:" --num_tokens=100 --steps=200 [--sampler=llada --block_length=32] [--suffix=...]
python -m eval.sample --workdir=runs/t5_reverse --prompt="reverse: hello" --num_tokens=32 --beam_size=4
python -m eval.sample --workdir=runs/sft --chat --prompt="reverse: hello" --temperature=0
python -m eval.sample --workdir=runs/x --prompt="Date: " --regex="[0-9]{4}-[0-9]{2}-[0-9]{2}" --num_samples=5 --output=dates.jsonl
python -m eval.sample --workdir=runs/x --prompt="Answer: " --choices=yes,no --temperature=0
python -m eval.sample --workdir=runs/x --prompt="User: " --json_schema=user.schema.json

Each family reads the flags its sampler knows (train/families.py); setting another is an
error, not silently ignored.
"""

import json
import time
from contextlib import nullcontext

import jax
from absl import app, flags, logging

from eval import constrain
from eval.packed import load_packed
from modeling import diffusion
from train import console, families
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a training workdir (config.json + checkpoints/)")
flags.DEFINE_string("packed", None, "instead of --workdir: a packed file from eval.export")
flags.DEFINE_string(
  "prompt", "\n", "text the samples continue (read as a document's start); encdec: the input"
)
flags.DEFINE_integer("num_tokens", 200, "new tokens per sample (AR: stops early at EOS)")
flags.DEFINE_float("temperature", 0.8, "0 is greedy")
flags.DEFINE_integer("top_k", 0, "AR: keep the k most likely tokens; 0 keeps all")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling: keep the smallest set with this much mass")
flags.DEFINE_integer("num_samples", 1, "samples to draw")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("steps", 0, "diffusion: denoising steps; 0: one per generated token")
flags.DEFINE_enum("sampler", "ancestral", diffusion.SAMPLERS, "diffusion sampler")
flags.DEFINE_integer(
  "block_length", 0, "diffusion, llada: semi-autoregressive block length; 0: one block"
)
flags.DEFINE_enum(
  "grid", "uniform", diffusion.GRIDS, "diffusion, ancestral: time grid (uniform in t or alpha)"
)
flags.DEFINE_bool("cache", True, "diffusion, ancestral: skip the network when no token changed")
flags.DEFINE_string("suffix", "", "diffusion: text clamped after the generated span (infilling)")
flags.DEFINE_enum(
  "remasking", "low_confidence", diffusion.REMASKING, "diffusion, llada: what to remask"
)
flags.DEFINE_integer("beam_size", 1, "AR: beam search width; 1: sample (or greedy at 0)")
flags.DEFINE_float("length_penalty", 0.6, "AR, beam search: GNMT length penalty alpha")
flags.DEFINE_bool(
  "chat", False, "decoder: --prompt is a user turn in the run's task.template; print the answer"
)
flags.DEFINE_string("regex", None, "AR: the generated text must match this regex (whole)")
flags.DEFINE_string("json_schema", None, "AR: the generated text must be JSON of this schema file")
flags.DEFINE_list("choices", None, "AR: the generated text must be one of these (comma-separated)")
flags.DEFINE_float(
  "max_constraint_mib", constrain.MAX_TABLE_MIB, "limit on a constraint's device tables (MiB)"
)
flags.DEFINE_string("output", None, "also write one JSON object per sample (prompt, text) here")
FLAGS = flags.FLAGS
SAMPLER_FLAGS = families.SAMPLE_OPTIONS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir)
  if bool(FLAGS.workdir) == bool(FLAGS.packed):
    raise app.UsageError("give one of --workdir or --packed")
  if FLAGS.packed:
    config, model, params, tokenizer = load_packed(FLAGS.packed)
  else:
    config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  fam = families.resolve(config).family
  if fam.sampler is None:
    raise app.UsageError(
      f"--workdir={FLAGS.workdir or FLAGS.packed}: a model.family={config.model.family!r} model does not "
      "generate text; evaluate it with python -m eval.main"
    )
  for name in families.CONSTRAINT_OPTIONS:
    if name not in fam.sample_options and FLAGS[name].present:
      raise app.UsageError(
        f"--{name}: constrained decoding follows an automaton left to right, one token at a "
        f"time; model.family={config.model.family!r} samplers do not generate left to right"
      )
  for name in SAMPLER_FLAGS:
    if name not in fam.sample_options and FLAGS[name].present:
      raise app.UsageError(
        f"--{name}: model.family={config.model.family!r} samplers read only "
        f"{['--' + o for o in fam.sample_options]}"
      )
  options = {name: FLAGS[name].value for name in fam.sample_options}
  spec = {name: options.pop(name) for name in families.CONSTRAINT_OPTIONS if name in options}
  try:
    constraint = constrain.build(
      tokenizer, model.cfg.vocab_size, max_mib=FLAGS.max_constraint_mib, **spec
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if constraint is not None:
    print(f"{constraint.source}: {constraint.num_states} states", flush=True)
  rng = jax.random.PRNGKey(FLAGS.seed)
  with open(FLAGS.output, "w", encoding="utf-8") if FLAGS.output else nullcontext() as out:
    for i in range(FLAGS.num_samples):
      start = time.perf_counter()
      sampled = fam.sampler(
        config,
        model,
        params,
        tokenizer,
        FLAGS.prompt,
        FLAGS.num_tokens,
        jax.random.fold_in(rng, i),
        constraint=constraint,
        **options,
      )
      seconds = time.perf_counter() - start
      print(
        f"---- sample {i + 1}/{FLAGS.num_samples} ({sampled.calls} network calls, "
        f"{seconds:.2f} s)\n{sampled.before}{sampled.text}{sampled.after}",
        flush=True,
      )
      if sampled.accepted is False:
        logging.warning(
          f"sample {i + 1}: --num_tokens={FLAGS.num_tokens} ran out before "
          f"{constraint.source} was satisfied; the text is cut short"
        )
      if out is not None:
        out.write(json.dumps({"prompt": FLAGS.prompt, "text": sampled.text}) + "\n")
        out.flush()


if __name__ == "__main__":
  app.run(main)
