"""A diffusion model's loss at each mask ratio: where its NELBO comes from.

python -m eval.mask_curve --workdir=runs/cmp_mdlm [--ratios=0.05,0.5,0.95] [--eval_steps=8]

At ratio r every validation row has ceil(r * n) of its n tokens masked (a uniformly random
subset) and the table gives the denoiser's cross-entropy per masked token. For a
time-independent model the NELBO per token is the mean of this curve over r ~ U(0, 1), so
the default grid (20 midpoints) also prints that mean, an estimate of `eval/loss`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from absl import app, flags

from modeling import diffusion, registry
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


def mask_curve(config, model, params, tokenizer, ratios, eval_steps=0, batch_size=0, seed=0):
  """[(ratio, nats per masked token, masked tokens)] over the validation split."""
  if config.model.family != "diffusion":
    raise ValueError(
      f"--workdir holds a model.family={config.model.family!r} model; the mask curve is for "
      "'diffusion'"
    )
  if config.model.time_conditioning and config.task.schedule != "loglinear":
    raise ValueError(
      f"task.schedule={config.task.schedule!r}: a time-conditioned model's curve needs the "
      "loglinear schedule (time = mask ratio)"
    )
  bad = [r for r in ratios if not 0.0 < r <= 1.0]
  if bad:
    raise ValueError(f"--ratios: {bad} outside (0, 1]")
  fam, task = registry.family(config), registry.task(config)
  rows = batch_size or config.train.eval_batch_size or config.train.batch_size
  batches = task.eval_data(config, tokenizer, fam, batch_size=rows, max_batches=eval_steps)

  @functools.partial(jax.jit, static_argnames="ratio")
  def at(batch, rng, ratio):
    def logits_fn(z_BL, t_B):
      pos_BL, seg_BL = batch["positions"], batch["segment_ids"]
      return diffusion.denoise(model, params, z_BL, pos_BL, seg_BL, t_B)

    return diffusion.masked_nll_at(logits_fn, rng, batch["tokens"], batch["segment_ids"], ratio)

  sums, counts = np.zeros(len(ratios)), np.zeros(len(ratios))
  for b, batch in enumerate(batches):
    batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    for i, r in enumerate(ratios):
      s, c = at(batch, jax.random.fold_in(jax.random.key(seed), b * len(ratios) + i), r)
      sums[i] += float(s)
      counts[i] += float(c)
    print(f"\rbatch {b + 1}", end="", flush=True)
  print()
  if not counts.any():
    raise ValueError(f"{config.data.name}: the validation split has no tokens")
  return [(r, s / c, int(c)) for r, s, c in zip(ratios, sums, counts, strict=True)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
