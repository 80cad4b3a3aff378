"""Evaluate a trained checkpoint on its task's evaluation split and print a table.

python -m eval.main --workdir=runs/bert_cls [--tasks=classify] [--eval_name=jsonl:other.jsonl]
python -m eval.main --workdir=runs/t5_reverse --beam_size=4 --eval_decode=0  (0: no decoding)
"""

import json
import os

import jax
from absl import app, flags

from eval.evaluate import evaluate_workdir
from train import console

flags.DEFINE_string(
  "workdir", None, "a training workdir (config.json + checkpoints/)", required=True
)
flags.DEFINE_list("tasks", [], "tasks to evaluate; empty: the workdir's own task (task.name)")
flags.DEFINE_string("eval_name", "", "evaluate on this source instead (data.eval_name syntax)")
flags.DEFINE_integer("eval_steps", 0, "batches to evaluate; 0: the whole split")
flags.DEFINE_integer("batch_size", 0, "evaluation batch size; 0: the run's")
flags.DEFINE_integer("beam_size", 0, "seq2seq: beam search width; 0: the run's task.beam_size")
flags.DEFINE_integer(
  "eval_decode", -1, "seq2seq: examples decoded for exact match / ROUGE / BLEU; -1: the run's"
)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir)
  results = evaluate_workdir(
    FLAGS.workdir,
    FLAGS.tasks,
    FLAGS.eval_name,
    FLAGS.eval_steps,
    FLAGS.batch_size,
    FLAGS.beam_size,
    FLAGS.eval_decode,
  )
  if jax.process_index() == 0:
    width = max(len(k) for metrics in results.values() for k in metrics)
    print(f"{'task':<10} {'metric':<{width}} value")
    for task, metrics in results.items():
      for key, value in metrics.items():
        print(f"{task:<10} {key:<{width}} {value:.4f}")
    path = os.path.join(FLAGS.workdir, "eval_results.json")
    with open(path, "w") as f:
      json.dump(results, f, indent=2)
    print(f"written to {path}")


if __name__ == "__main__":
  app.run(main)
