"""Sample from a trained checkpoint.

python -m eval.sample --workdir=runs/x --prompt="def " --num_tokens=200 --temperature=0.8 [--top_k=40] [--top_p=0.95]
"""

import jax
from absl import app, flags

from eval import decoding
from modeling import registry
from train.trainer import load_for_inference

flags.DEFINE_string(
  "workdir", None, "a training workdir (config.json + checkpoints/)", required=True
)
flags.DEFINE_string("prompt", "\n", "text the samples continue; read as the start of a document")
flags.DEFINE_integer("num_tokens", 200, "new tokens per sample (stops early at EOS)")
flags.DEFINE_float("temperature", 0.8, "0 is greedy")
flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens; 0 keeps all")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling: keep the smallest set with this much mass")
flags.DEFINE_integer("num_samples", 1, "samples to draw")
flags.DEFINE_integer("seed", 0, "sampling seed")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  if not registry.family(config).autoregressive:
    raise app.UsageError(
      f"--workdir={FLAGS.workdir}: a model.family={config.model.family!r} model does not "
      "generate text token by token; evaluate it with python -m eval.main"
    )
  rng = jax.random.PRNGKey(FLAGS.seed)
  for i in range(FLAGS.num_samples):
    text = decoding.complete(
      model,
      params,
      tokenizer,
      FLAGS.prompt,
      FLAGS.num_tokens,
      jax.random.fold_in(rng, i),
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
    )
    print(f"---- sample {i}\n{text}", flush=True)


if __name__ == "__main__":
  app.run(main)
