"""A workdir's own config, to fine-tune from its weights: `--config=configs/workdir.py:<dir>`.

The model keys (and data.tokenizer) are the workdir's, as its config.json holds them after
training or `eval.import_hf`; `init_from` points at the workdir, so a new run starts from its
latest weights; every other key can be overridden as usual (`--config.task.name=...`,
`--config.data.name=...`). Keys added to configs/base.py since the workdir was written keep
their defaults.
"""

import json
import os

from configs import base


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/workdir.py needs the workdir: --config=configs/workdir.py:<dir>")
  path = os.path.join(os.path.expanduser(arg), "config.json")
  if not os.path.exists(path):
    raise ValueError(f"configs/workdir.py:{arg}: no {path}; is it a fourfold workdir?")
  with open(path) as f:
    saved = json.load(f)
  c = base.from_saved(saved)
  c.init_from = os.path.abspath(os.path.expanduser(arg))
  return c
