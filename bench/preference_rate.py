"""How often a model's greedy answers have the property a preference set prefers: the
measurement behind "DPO moved the samples", before and after.

  python -m bench.preference_rate --workdir=runs/pre --workdir=runs/dpo \
      --data=prefs/eval.jsonl --template=completion

For every pair of the JSONL (`train.data.make_preference_task` writes them), the prompt is
rendered with `--template` up to the answer, the model answers greedily (up to
`--max_tokens` or its end of turn), and the answer's first `--lines` lines are checked with
`make_preference_task.prefers_single_quotes` (its first string literal in single quotes:
True, in double quotes: False, none: None). Prints, per workdir, the rate of True among the answers that have a literal, and
how often the answer is the chosen or the rejected text exactly.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from modeling import decoding
from train import console
from train.data import chat
from train.data.make_preference_task import property_rate
from train.trainer import load_for_inference

flags.DEFINE_multi_string("workdir", None, "training workdirs to compare (repeat the flag)")
flags.DEFINE_string("data", None, "preference JSONL: prompt, chosen, rejected")
flags.DEFINE_string("template", "completion", f"the chat template: {', '.join(chat.TEMPLATES)}")
flags.DEFINE_integer("max_tokens", 64, "the longest answer decoded")
flags.DEFINE_integer("limit", 0, "pairs read (0: all)")
flags.DEFINE_integer("lines", 1, "lines of each answer checked for the property (0: all of it)")
FLAGS = flags.FLAGS


def greedy_answers(workdir: str, pairs, template: str, max_tokens: int, lines: int) -> list[str]:
  """The model's greedy answer to each pair's prompt, up to its end of turn, cut to its first
  `lines` lines (0: all)."""
  config, model, params, tokenizer = load_for_inference(workdir)
  ids = chat.token_ids(template, tokenizer)
  stops = chat.answer_stops(template, tokenizer, ids)
  prompts = [chat.prompt_and_answer(chosen, template, tokenizer, ids)[0] for chosen, _ in pairs]

  def progress(done, groups):
    if done == groups or done % 10 == 0:
      print(f"{workdir}: {done}/{groups} prompt lengths decoded", flush=True)

  out = decoding.greedy_answers(
    model, params, prompts, [max_tokens] * len(prompts), stops, progress
  )
  texts = [tokenizer.decode(a) for a in out]
  return ["\n".join(t.split("\n")[:lines]) if lines else t for t in texts]


def main(argv):
  del argv
  console.setup(None)
  pairs, counts = chat.read_preferences(FLAGS.data)
  pairs = pairs[: FLAGS.limit or None]
  print(f"{FLAGS.data}: {len(pairs)} pairs ({counts.skipped or 'none'} skipped)")
  for workdir in FLAGS.workdir:
    answers = greedy_answers(workdir, pairs, FLAGS.template, FLAGS.max_tokens, FLAGS.lines)
    rate, counted = property_rate(answers)
    chosen = np.mean([a == c[-1]["content"] for a, (c, _) in zip(answers, pairs, strict=True)])
    rejected = np.mean([a == r[-1]["content"] for a, (_, r) in zip(answers, pairs, strict=True)])
    print(
      f"{workdir}: preferred property in {rate:.3f} of {counted} answers with a literal; "
      f"exactly the chosen answer {chosen:.3f}, the rejected one {rejected:.3f}"
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "data"])
  app.run(main)
