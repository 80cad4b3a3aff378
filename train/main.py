"""Train a model: `python -m train.main --config=configs/<preset>.py --workdir=runs/x`."""

from absl import app, flags
from ml_collections import config_flags

from train import console, trainer
from train.checkpoint import CheckpointSaveError

config_flags.DEFINE_config_file("config", "configs/gpt.py", "preset config file", lock_config=True)
flags.DEFINE_string(
  "workdir", None, "checkpoints, metrics.jsonl, tensorboard/, samples", required=True
)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(FLAGS.workdir)
  try:
    trainer.run(FLAGS.config, FLAGS.workdir)
  except CheckpointSaveError as e:  # one line, no traceback: the log file has the details
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
