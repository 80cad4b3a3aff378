"""Tiny models derived from the real presets, with random params drawn in NumPy.

A jitted random init takes seconds to compile on a CPU; drawing values for the
abstract param tree (`jax.eval_shape(model.init, ...)`) takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import gpt, llama
from modeling.transformer import Transformer, TransformerConfig
from train import families

VOCAB = 97
PRESETS = {"gpt": gpt, "llama": llama}


def tiny(preset: str = "gpt", seq_len: int = 16, **overrides) -> TransformerConfig:
  """The preset's `size=tiny` model, with a small vocabulary and context."""
  config = PRESETS[preset].get_config("size=tiny")
  config.data.seq_len = seq_len
  return dataclasses.replace(
    families.resolve(config).transformer_config(config, vocab_size=VOCAB), **overrides
  )


def abstract_init(cfg: TransformerConfig):
  """The boxed param tree `init` returns, as shapes: no compile."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)["params"]


def draw_params(abstract, seed: int = 0):
  """Random values for an abstract param tree: norm scales near 1; biases, kernels and
  tables large enough that every path matters."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    x = rng.standard_normal(leaf.shape)
    x = 1 + 0.1 * x if name == "scale" else x * (0.5 if name.endswith("embedding") else 0.1)
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract))


@functools.cache
def random_params(cfg: TransformerConfig, seed: int = 0):
  """Plain params of the model's own tree."""
  return draw_params(abstract_init(cfg), seed)


def short_run(config, steps: int, **train):
  """`config` set for a test-sized run: batch 8, constant learning rate, a metric line per
  step, evaluation (2 batches) and a checkpoint halfway and at the end; `train` overrides."""
  config.train.update(
    dict(
      steps=steps,
      batch_size=8,
      warmup_steps=0,
      schedule="constant",
      log_every=1,
      eval_every=steps // 2,
      eval_steps=2,
      checkpoint_every=steps // 2,
      num_samples=0,
      peak_tflops=1.0,
    )
  )
  config.train.update(train)
  return config
