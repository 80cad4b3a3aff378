"""A diffusion model's loss at each mask ratio: where its NELBO comes from.

python -m eval.mask_curve --workdir=runs/cmp_mdlm [--ratios=0.05,0.5,0.95] [--eval_steps=8]

At ratio r every validation row has ceil(r * n) of its n tokens masked (a uniformly random
subset) and the table gives the denoiser's cross-entropy per masked token. For a
time-independent model the NELBO per token is the mean of this curve over r ~ U(0, 1), so
the default grid (20 midpoints) also prints that mean, an estimate of `eval/loss`.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from eval.evaluate import mask_curve
from train import console
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a diffusion training workdir", required=True)
flags.DEFINE_list(
  "ratios",
  [f"{(i + 0.5) / 20:.3f}" for i in range(20)],
  "mask ratios in (0, 1]; default: the 20 midpoints of [0, 1]",
)
flags.DEFINE_integer("eval_steps", 0, "validation batches; 0: the whole split")
flags.DEFINE_integer("batch_size", 0, "rows per batch; 0: the run's train.eval_batch_size")
flags.DEFINE_integer("seed", 0, "seed of the masks")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir)
  config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  ratios = [float(r) for r in FLAGS.ratios]
  curve = mask_curve(
    config, model, params, tokenizer, ratios, FLAGS.eval_steps, FLAGS.batch_size, FLAGS.seed
  )
  print("ratio  nats/masked token  masked tokens")
  for r, nll, n in curve:
    print(f"{r:5.3f}  {nll:17.4f}  {n:13d}")
  print(f"mean over the ratios: {np.mean([nll for _, nll, _ in curve]):.4f}")


if __name__ == "__main__":
  app.run(main)
