"""Writes a synthetic instruction-following set for supervised fine-tuning: a mixture of small
instructions on random letters, each with one right answer, so exact match measures whether a
model follows them.

  python -m train.data.make_instruct_task --out_dir=runs/instruct --train=4000 --eval=200

Writes `train.jsonl` and `eval.jsonl` under `--out_dir`, one conversation a line, as
`train.data.chat.read_conversations` reads it:

  {"messages": [{"role": "user", "content": "reverse: kqzt"},
                {"role": "assistant", "content": "tzqk"}]}

The instructions (TASKS, drawn uniformly from `--tasks`), on `--min_letters` to `--max_letters`
lowercase letters: `reverse` the letters, `sort` them, `count` them (a decimal), `upper` them.
Short enough for a tiny byte-level model to learn in a few hundred steps. Prompts are distinct,
so no eval prompt appears in train.
"""

from __future__ import annotations

import json
import os
import random
import string

from absl import app, flags

TASKS = {
  "reverse": lambda s: s[::-1],
  "sort": lambda s: "".join(sorted(s)),
  "count": lambda s: str(len(s)),
  "upper": str.upper,
}

FLAGS = flags.FLAGS
# allow_override: make_preference_task defines the same four, and a test loads both.
flags.DEFINE_string(
  "out_dir", None, "directory to write train.jsonl and eval.jsonl", allow_override=True
)
flags.DEFINE_integer("train", 4000, "training conversations", allow_override=True)
flags.DEFINE_integer(
  "eval", 200, "eval conversations (prompts never in train)", allow_override=True
)
flags.DEFINE_list("tasks", list(TASKS), f"instructions mixed, from {list(TASKS)}")
flags.DEFINE_integer("min_letters", 3, "fewest letters")
flags.DEFINE_integer("max_letters", 8, "most letters")
flags.DEFINE_integer("seed", 0, "random seed", allow_override=True)


def answer(prompt: str) -> str:
  """The reference answer to a prompt `<task>: <letters>`."""
  task, sep, letters = prompt.partition(": ")
  if not sep or task not in TASKS:
    raise ValueError(f"{prompt!r}: expected '<task>: <letters>' with a task from {list(TASKS)}")
  return TASKS[task](letters)


def conversation(prompt: str) -> dict:
  """The JSONL record of one prompt and its answer."""
  return {
    "messages": [
      {"role": "user", "content": prompt},
      {"role": "assistant", "content": answer(prompt)},
    ]
  }


def make_splits(n_train: int, n_eval: int, tasks: list[str], min_len: int, max_len: int, seed: int):
  """(train, eval) records with `n_train + n_eval` distinct prompts between them."""
  unknown = sorted(set(tasks) - set(TASKS))
  if not tasks or unknown:
    raise ValueError(f"--tasks={tasks}: allowed {list(TASKS)}")
  if not 1 <= min_len <= max_len:
    raise ValueError(f"--min_letters={min_len}, --max_letters={max_len}: need 1 <= min <= max")
  possible = len(tasks) * sum(26**n for n in range(min_len, max_len + 1))
  if n_train + n_eval > possible // 2:
    raise ValueError(f"--train + --eval = {n_train + n_eval}: at most {possible // 2} prompts fit")
  rng, seen, prompts = random.Random(seed), set(), []
  while len(prompts) < n_train + n_eval:
    letters = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(min_len, max_len)))
    prompt = f"{rng.choice(tasks)}: {letters}"
    if prompt not in seen:
      seen.add(prompt)
      prompts.append(prompt)
  train, held_out = prompts[:n_train], prompts[n_train:]
  assert not set(train) & set(held_out)
  return [conversation(p) for p in train], [conversation(p) for p in held_out]


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w") as out:
    out.writelines(json.dumps(r) + "\n" for r in records)


def main(argv) -> None:
  del argv
  f = FLAGS
  if not f.out_dir:
    raise app.UsageError("--out_dir is required")
  train, held_out = make_splits(f.train, f.eval, f.tasks, f.min_letters, f.max_letters, f.seed)
  os.makedirs(f.out_dir, exist_ok=True)
  for name, records in (("train", train), ("eval", held_out)):
    write_jsonl(os.path.join(f.out_dir, f"{name}.jsonl"), records)
  print(f"wrote {len(train)} train and {len(held_out)} eval conversations to {f.out_dir}")


if __name__ == "__main__":
  app.run(main)
