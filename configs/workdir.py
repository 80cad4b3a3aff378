"""A workdir's own config, to fine-tune from its weights: `--config=configs/workdir.py:<dir>`.

The model keys (and data.tokenizer) are the workdir's, as its config.json holds them after
training or `eval.import_hf`; `init_from` points at the workdir, so a new run starts from its
latest weights; every other key can be overridden as usual (`--config.task.name=...`,
`--config.data.name=...`). Keys added to configs/base.py since the workdir was written keep
their defaults.
"""

import json
import os

from etils import epath

from configs import base


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/workdir.py needs the workdir: --config=configs/workdir.py:<dir>")
  workdir = epath.Path(arg).expanduser()  # a local path or a bucket (gs://...)
  path = workdir / "config.json"
  if not path.exists():
    raise ValueError(f"configs/workdir.py:{arg}: no {path}; is it a fourfold workdir?")
  saved = json.loads(path.read_text())
  c = base.from_saved(saved)
  c.init_from = str(workdir) if "://" in arg else os.path.abspath(workdir)
  return c
