"""Diffusion sampler speed and sample quality against the AR model trained beside it.

python -m bench.diffusion_sampling --diffusion_workdir=runs/cmp_mdlm --ar_workdir=runs/cmp_ar

Three tables, all from one run on this machine (compile time excluded: every variant
runs once untimed first):
  1. speed: the ancestral sampler with and without the denoiser cache at 2x and 8x as
     many steps as tokens (sequences per second, network calls per sequence), and the AR
     model with its KV cache generating the same number of tokens;
  2. generative perplexity: unconditional diffusion samples (temperature 1, no top-p) at
     several step counts, scored by the AR model (exp of its mean NLL per token over
     tokens 2..L), with the samples' unigram entropy in bits (degenerate, repetitive
     samples score a low perplexity but a low entropy too); the AR model's own samples and
     the validation text give the reference rows.
Sequences are `--length` tokens, one document each, with no prompt (AR: one newline token).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from modeling import decoding, diffusion
from modeling.vocab import MASK_ID
from train import console, objectives
from train.data import eval_batches
from train.trainer import load_for_inference

flags.DEFINE_string("diffusion_workdir", None, "a diffusion run's workdir", required=True)
flags.DEFINE_string("ar_workdir", None, "the AR run's workdir, same data", required=True)
flags.DEFINE_integer("length", 128, "tokens per sequence (at most both models' context)")
flags.DEFINE_integer("num_samples", 16, "sequences per generative-perplexity row")
flags.DEFINE_integer("speed_samples", 4, "sequences timed per speed row (one at a time)")
flags.DEFINE_list("steps", ["16", "32", "64", "128", "256", "1024"], "step counts to score")
flags.DEFINE_integer("seed", 0, "sampling seed")
FLAGS = flags.FLAGS


@functools.partial(jax.jit, static_argnames="model")
def _apply(model, params, tokens_BL, pos_BL):
  return model.apply({"params": params}, tokens_BL, pos_BL, jnp.ones_like(pos_BL))


def ar_nll(model, params, tokens_BL: np.ndarray) -> np.ndarray:
  """[B] mean NLL (nats) per token of tokens 2..L under the AR model."""
  b, n = tokens_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  logits_BLV, _ = _apply(model, params, tokens_BL, pos_BL)
  nll_BL = objectives.token_nll(logits_BLV[:, :-1], jnp.asarray(tokens_BL[:, 1:]))
  return np.asarray(nll_BL.mean(-1))


def unigram_entropy_bits(tokens: np.ndarray) -> float:
  _, counts = np.unique(tokens, return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def timed(fn, repeats: int):
  """(seconds per call, last result) after one untimed call (compilation)."""
  fn(0)
  start = time.perf_counter()
  for i in range(repeats):
    out = fn(i + 1)
  return (time.perf_counter() - start) / repeats, out


def main(argv):
  del argv
  console.setup(None)
  dcfg, dmodel, dparams, tokenizer = load_for_inference(FLAGS.diffusion_workdir)
  acfg, amodel, aparams, _ = load_for_inference(FLAGS.ar_workdir)
  n = FLAGS.length
  if n > min(dmodel.cfg.max_len, amodel.cfg.max_len):
    raise app.UsageError(f"--length={n}: longer than a model's context")
  schedule = diffusion.make_schedule(dcfg.task.schedule, dcfg.task.schedule_exponent)
  rng = jax.random.PRNGKey(FLAGS.seed)
  print(f"diffusion {FLAGS.diffusion_workdir} vs AR {FLAGS.ar_workdir}; {n} tokens", flush=True)

  # ---- 1. speed, one sequence at a time
  masks_1L = np.full((1, n), MASK_ID, np.int32)
  print(
    "\n| sampler | steps | network calls / seq | seq/s | tokens/s |\n| --- | --- | --- | --- | --- |"
  )
  for mult in (2, 8):
    for cache in (False, True):

      def run(i, steps=mult * n, cache=cache):
        key = jax.random.fold_in(rng, i)
        return diffusion.ancestral_sample(
          dmodel, dparams, masks_1L, key, schedule, steps, use_cache=cache
        )

      sec, (_, calls) = timed(run, FLAGS.speed_samples)
      name = "ancestral, cached" if cache else "ancestral, no cache"
      print(
        f"| {name} | {mult * n} ({mult}x) | {calls} | {1 / sec:.2f} | {n / sec:.0f} |", flush=True
      )
  prompt_11 = tokenizer.encode("\n")[None]

  def ar_run(i):
    key = jax.random.fold_in(rng, i)
    return decoding.generate(amodel, aparams, prompt_11, n - 1, key, temperature=1.0, eos_id=-1)

  sec, _ = timed(ar_run, FLAGS.speed_samples)
  print(f"| AR, KV cache | {n} tokens | {n} | {1 / sec:.2f} | {n / sec:.0f} |", flush=True)

  # ---- 2. generative perplexity under the AR model
  b = FLAGS.num_samples
  print(
    "\n| source | steps | network calls | gen. perplexity (AR) | unigram entropy (bits) |"
    "\n| --- | --- | --- | --- | --- |"
  )
  masks_BL = np.full((b, n), MASK_ID, np.int32)
  for steps in map(int, FLAGS.steps):
    key = jax.random.fold_in(rng, 1000 + steps)
    samples, calls = diffusion.ancestral_sample(dmodel, dparams, masks_BL, key, schedule, steps)
    ppl = math.exp(float(ar_nll(amodel, aparams, samples).mean()))
    ent = unigram_entropy_bits(samples)
    print(f"| diffusion, ancestral | {steps} | {calls} | {ppl:.2f} | {ent:.2f} |", flush=True)
  prompt_B1 = np.repeat(prompt_11, b, axis=0)
  ar_samples = decoding.generate(
    amodel, aparams, prompt_B1, n - 1, jax.random.fold_in(rng, 7), temperature=1.0, eos_id=-1
  )
  ar_samples = np.concatenate([prompt_B1, ar_samples], axis=1)
  ppl = math.exp(float(ar_nll(amodel, aparams, ar_samples).mean()))
  print(
    f"| AR samples, temperature 1 | - | {n} | {ppl:.2f} | {unigram_entropy_bits(ar_samples):.2f} |"
  )
  acfg.data.seq_len = n
  val = next(iter(eval_batches(acfg.data, tokenizer, batch_size=b, max_batches=1)))["tokens"]
  ppl = math.exp(float(ar_nll(amodel, aparams, val).mean()))
  print(f"| validation text | - | - | {ppl:.2f} | {unigram_entropy_bits(val):.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
