"""The tests' one set of tiny builders, derived from the real presets: run configs
(`tiny_config`, `short_run`, `tiny_mdlm`), frozen model configs (`tiny`), and random params
drawn in NumPy.

A jitted random init takes seconds to compile on a CPU; drawing values for the
abstract param tree (`jax.eval_shape(model.init, ...)`) takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import bert, bloom, gpt, llama, mdlm, palm, t5
from modeling.transformer import Transformer, TransformerConfig
from train import families

VOCAB = 97
PRESETS = {
  "gpt": gpt,
  "llama": llama,
  "bert": bert,
  "t5": t5,
  "mdlm": mdlm,
  "bloom": bloom,
  "palm": palm,
}
MDLM_STEPS = 40  # the steps of tiny_mdlm's run


def tiny_config(
  preset="gpt", options: str = "", dropout: float | None = None, **data
) -> ml_collections.ConfigDict:
  """configs/<preset>.py (a PRESETS name or the module) at `size=tiny`, plus the rest of its
  argument in `options` ("arch=bert,task=ner"); `dropout` and the `data` keys set when given."""
  module = PRESETS[preset] if isinstance(preset, str) else preset
  config = module.get_config(",".join(filter(None, ("size=tiny", options))))
  if dropout is not None:
    config.model.dropout = dropout
  for key, value in data.items():
    config.data[key] = value
  return config


def tiny(
  preset: str = "gpt",
  seq_len: int | None = 16,
  options: str = "",
  vocab: int = VOCAB,
  **overrides,
) -> TransformerConfig:
  """The frozen model config of `tiny_config(preset, options)` for a tokenizer of `vocab`
  ids and a context of `seq_len` (None: the preset's); `overrides` replace its fields."""
  data = {} if seq_len is None else {"seq_len": seq_len}
  config = tiny_config(preset, options, **data)
  return dataclasses.replace(
    families.resolve(config).transformer_config(config, vocab_size=vocab), **overrides
  )


def abstract_init(cfg: TransformerConfig, module: type = Transformer):
  """The boxed param tree `module(cfg).init` returns, as shapes: no compile."""
  tokens = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(module(cfg).init, jax.random.key(0), tokens, tokens, tokens)["params"]


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


def tiny_mdlm(tfds_dir: str, **train):
  """mdlm `size=tiny` on the default data (the embedded pystdlib corpus), built into
  `tfds_dir`; 2 time draws per evaluation batch; MDLM_STEPS steps (tests/conftest.py's
  `mdlm_run` trains it once for the session)."""
  c = tiny_config("mdlm", tfds_data_dir=tfds_dir, seq_len=32, shuffle_window=16)
  c.task.eval_t_samples = 2
  return short_run(c, MDLM_STEPS, **{"learning_rate": 3e-3, "min_learning_rate": 3e-4, **train})
