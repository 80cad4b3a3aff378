"""Evaluate trained checkpoints on their own task or on multiple-choice benchmarks; print a
table and write it beside the checkpoints.

python -m eval.main --workdir=runs/bert_cls [--tasks=classify] [--eval_name=jsonl:other.jsonl]
python -m eval.main --workdir=runs/t5_reverse --beam_size=4 --eval_decode=0  (0: no decoding)
python -m eval.main --workdir=runs/ar,runs/mdlm --tasks=hellaswag,arc_easy,mc:runs/mc/eval.jsonl \
    [--num_fewshot=5 --limit=500 --mc_samples=16 --mmlu_dir=data/mmlu --plot_dir=runs/compare]

Each workdir's `eval_results.json` ({task: {metric: value}}, merged with what it held) and
`eval_results.md` (the same as a markdown table) are written; benchmark tasks also get a bar
chart each, `<plot_dir>/eval_<task>.png` (default: the first workdir), across the workdirs,
and with several workdirs `<plot_dir>/eval_compare.md` holds the table of all of them.
docs/benchmark_tasks.md is the guide.
"""

import sys

import jax
from absl import app, flags

from eval import benchmarks
from eval.evaluate import evaluate_benchmarks, evaluate_workdir, report, split_tasks
from train import console

flags.DEFINE_list(
  "workdir", None, "training workdirs (config.json + checkpoints/), comma-separated", required=True
)
flags.DEFINE_list(
  "tasks",
  [],
  "tasks to evaluate: the workdir's own task (task.name), and benchmarks "
  f"{', '.join(benchmarks.KNOWN)}; empty: the workdir's own task",
)
flags.DEFINE_string("eval_name", "", "evaluate on this source instead (data.eval_name syntax)")
flags.DEFINE_integer("eval_steps", 0, "batches to evaluate; 0: the whole split")
flags.DEFINE_integer("batch_size", 0, "evaluation batch size; 0: the run's (benchmarks: 16)")
flags.DEFINE_integer("beam_size", 0, "seq2seq: beam search width; 0: the run's task.beam_size")
flags.DEFINE_integer(
  "eval_decode", -1, "seq2seq: examples decoded for exact match / ROUGE / BLEU; -1: the run's"
)
flags.DEFINE_integer("num_fewshot", 0, "benchmarks: solved examples before each item")
flags.DEFINE_integer(
  "fewshot_seed", benchmarks.FEWSHOT_SEED, "benchmarks: seed of the shots (the harness's)"
)
flags.DEFINE_integer("limit", 0, "benchmarks: the first N items of each task; 0: all")
flags.DEFINE_integer("mc_samples", 16, "benchmarks, diffusion: Monte Carlo draws per choice")
flags.DEFINE_integer("seed", 0, "benchmarks, diffusion: seed of the draws")
flags.DEFINE_string("data_dir", "", "benchmarks: TFDS data dir (hellaswag, ai2_arc)")
flags.DEFINE_string("mmlu_dir", "", "benchmarks: folder of MMLU's test.jsonl and dev.jsonl")
flags.DEFINE_string("plot_dir", "", "benchmarks: where charts go; empty: the first workdir")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir[0])
  try:
    own_tasks, bench_tasks = split_tasks(FLAGS.tasks)
    options = benchmarks.Options(data_dir=FLAGS.data_dir, mmlu_dir=FLAGS.mmlu_dir)
    prepared = [
      benchmarks.prepare(name, options, FLAGS.num_fewshot, FLAGS.fewshot_seed, FLAGS.limit)
      for name in bench_tasks
    ]
  except ValueError as e:
    sys.exit(f"eval.main: {e}")
  results = {}
  for workdir in FLAGS.workdir:
    got = {}
    if own_tasks or not bench_tasks:
      own = (FLAGS.eval_name, FLAGS.eval_steps, FLAGS.batch_size, FLAGS.beam_size)
      got.update(evaluate_workdir(workdir, own_tasks, *own, FLAGS.eval_decode))
    if prepared:
      try:
        got.update(
          evaluate_benchmarks(workdir, prepared, FLAGS.batch_size, FLAGS.mc_samples, FLAGS.seed)
        )
      except ValueError as e:
        sys.exit(f"eval.main: {workdir}: {e}")
    results[workdir] = got
  if jax.process_index() == 0:
    report(results, prepared, FLAGS.plot_dir or FLAGS.workdir[0])


if __name__ == "__main__":
  app.run(main)
