"""The unigram baseline of a config's evaluation data: how often the training data's most
frequent ordinary token is right, over the validation tokens a model is scored on.

  python -m bench.unigram_baseline --config=configs/bert.py:size=tiny

For MLM every ordinary token is equally likely to be masked, so this is the accuracy of
always predicting that one token; it is the floor `eval/mlm_accuracy` should clear.
"""

from __future__ import annotations

import collections

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from modeling.vocab import NUM_SPECIAL
from train import console, families
from train.data import eval_batches, make_tokenizer, train_iterator

FLAGS = flags.FLAGS


def count_tokens(batches) -> collections.Counter:
  """Ordinary tokens (not special, not padding) of the batches."""
  counts: collections.Counter = collections.Counter()
  for batch in batches:
    ordinary = (batch["segment_ids"] > 0) & (batch["tokens"] >= NUM_SPECIAL)
    counts.update(batch["tokens"][ordinary].tolist())
  return counts


def unigram_baseline(config, train_batches: int = 200) -> tuple[int, float, float]:
  """(most frequent training token, its share of training tokens, its share of eval tokens)."""
  tokenizer = make_tokenizer(config.data.tokenizer)
  frame = families.resolve(config).task.frame(tokenizer.specials)
  batch_size = config.train.batch_size
  it = train_iterator(config.data, tokenizer, batch_size=batch_size, seed=config.seed, frame=frame)
  train = count_tokens(next(it) for _ in range(train_batches))
  evals = count_tokens(
    eval_batches(
      config.data,
      tokenizer,
      batch_size=config.train.eval_batch_size or batch_size,
      max_batches=config.train.eval_steps,
      frame=frame,
    )
  )
  top = train.most_common(1)[0][0]
  return top, train[top] / sum(train.values()), evals[top] / max(sum(evals.values()), 1)


def main(argv) -> None:
  del argv
  console.setup(None)
  top, train_share, eval_share = unigram_baseline(FLAGS.config)
  token = make_tokenizer(FLAGS.config.data.tokenizer).decode(np.asarray([top]))
  print(f"most frequent training token {token!r}: {train_share:.4f} of training tokens")
  print(f"unigram_baseline={eval_share:.4f}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "a preset: configs/<name>.py[:args]")
  flags.mark_flags_as_required(["config"])
  app.run(main)
