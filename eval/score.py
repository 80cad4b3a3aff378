"""The log-likelihood of a text file under a checkpoint, its token count and bits per byte.

python -m eval.score --workdir=runs/quickstart --text_file=corpus.txt [--stride=128] [--max_len=0]
python -m eval.score --workdir=runs/mdlm --text_file=corpus.txt --mc_samples=8 --seed=0

The last line is `loglikelihood=<nats> tokens=<tokens scored> bits_per_byte=<bits>`; the
lines before it say what was scored and how. Decoders: the exact log-likelihood of every
text token, the first given BOS (models that start documents with it) or EOS, in windows
of the context with a stride. Masked diffusion: the ELBO, a lower bound, estimated over
`--mc_samples` draws. Encoders and encoder-decoders are refused. eval/scoring.py says
exactly which tokens each window scores; docs/scoring.md is the guide.
"""

import sys
import time

from absl import app, flags

from eval import scoring
from train import console
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a training or imported workdir (config.json + checkpoints/)")
flags.DEFINE_string("text_file", None, "the UTF-8 text to score, read whole")
flags.DEFINE_integer(
  "max_len", 0, "window length in tokens; 0: the model's context (model.max_len or data.seq_len)"
)
flags.DEFINE_integer("batch_size", 8, "windows per network call")
flags.DEFINE_integer("stride", 0, "decoder: tokens between window ends; 0: half the window")
flags.DEFINE_integer(
  "mc_samples", scoring.MC_SAMPLES, "diffusion: Monte Carlo draws of the bound per window"
)
flags.DEFINE_integer("seed", 0, "diffusion: seed of the draws")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.text_file:
    raise app.UsageError("give --workdir and --text_file")
  console.setup(FLAGS.workdir)
  try:
    text = scoring.read_text(FLAGS.text_file)
    config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
    scoring.scorer_of(config)  # refuses the families it cannot score before any work
  except ValueError as e:
    sys.exit(f"eval.score: {e}")
  start = time.perf_counter()
  try:
    score = scoring.score_text(
      config,
      model,
      params,
      tokenizer,
      text,
      context=FLAGS.max_len,
      batch_size=FLAGS.batch_size,
      progress=scoring.progress_printer(),
      **{name: FLAGS[name].value for name in scoring.SCORE_OPTIONS if FLAGS[name].present},
    )
  except ValueError as e:
    sys.exit(f"eval.score: {e}")
  print(f"{FLAGS.text_file}: {config.model.family} model from {FLAGS.workdir}")
  for line in score.notes:
    print(line)
  print(f"scored in {time.perf_counter() - start:.1f} s")
  print(score.summary(), flush=True)


if __name__ == "__main__":
  app.run(main)
