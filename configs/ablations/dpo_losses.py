"""Preference losses against each other at equal budget: DPO, cDPO, IPO, ORPO and SimPO on
one preference set from one SFT'd base (docs/post_training.md).

python -m train.data.make_preference_task --out_dir=runs/prefs
python -m launch.sweep --config=configs/ablations/dpo_losses.py --workdir=runs/dpo_losses

The base is `runs/quickstart` (the README's first command: the XS GPT pretrained on the
Python standard library); the pairs are stdlib lines whose single-quoted literals the
rejected side turns into double quotes, rendered with the `completion` template. Each run:
300 steps of 16 pairs, context 256, beta 0.1 (ORPO: its lambda; SimPO: beta 2, gamma 1 as
in its paper's ranges). `summarize` writes the table of held-out rewards/accuracy,
rewards/margin and the chosen / rejected rewards.
"""

from __future__ import annotations

import os

from etils import epath

from configs import base, gpt

LOSSES = ("dpo", "cdpo", "ipo", "orpo", "simpo")
GRID = [f"loss={loss}" for loss in LOSSES]
BASE = "runs/quickstart"
PAIRS = "runs/prefs"


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"loss": "dpo"})
  c = gpt.get_config("task=dpo")
  c.task.loss = base.choose("loss", args["loss"], {loss: loss for loss in LOSSES})
  c.task.template = "completion"
  if c.task.loss == "cdpo":
    c.task.label_smoothing = 0.1
  if c.task.loss == "simpo":
    c.task.beta, c.task.simpo_gamma = 2.0, 1.0
  c.init_from = BASE
  c.data.name = f"jsonl:{os.path.join(PAIRS, 'train.jsonl')}"
  c.data.eval_name = f"jsonl:{os.path.join(PAIRS, 'eval.jsonl')}"
  c.train.update(dict(batch_size=16, steps=300, eval_every=50, eval_steps=0))
  return c


def summarize(results: dict[str, dict], outdir: str) -> str:
  """results: grid arg -> {"params": n, "metrics": last metrics}; writes results.md."""
  keys = ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")
  rows = ["| loss | " + " | ".join(f"eval/{k}" for k in keys) + " |"]
  rows.append("| --- |" + " --- |" * len(keys))
  for arg, r in results.items():
    m = r["metrics"]
    rows.append(
      f"| {arg} | " + " | ".join(f"{m.get(f'eval/{k}', float('nan')):.3f}" for k in keys) + " |"
    )
  table = "\n".join(rows)
  (epath.Path(outdir) / "results.md").write_text(table + "\n")  # local, or gs://
  return table
