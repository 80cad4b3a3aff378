"""What a command prints: its own lines and the log records that matter; the rest to a file.

Every `python -m` command calls `setup(workdir)` first thing in its `main`. Then

  console (stderr)  warnings and errors from anything, and fourfold's own log lines
                    (resuming, a dataset prepared, a cluster detected); the commands'
                    progress lines, evaluations, samples and results are `print`s
  <workdir>/log.txt every log record at absl's `--verbosity` (INFO by default), libraries'
                    included: orbax saving checkpoints, JAX choosing backends, TFDS

absl's flags keep their meaning: `--verbosity=1` (or `--alsologtostderr`) also prints every
record on the console, `--logtostderr` prints every record there and writes no file.
Commands without a workdir write `<temp dir>/fourfold/<command>.log.txt`. Uncaught
exceptions print their traceback as always.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from absl import flags
from absl import logging as absl_logging

LOG_NAME = "log.txt"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
_OWN = tuple(os.path.join(_ROOT, d) + os.sep for d in ("train", "eval", "bench", "launch"))


def setup(workdir: str | None) -> str | None:
  """Routes logging for a command from absl's parsed flags; returns the log file's path."""
  f = {name: flags.FLAGS[name].value for name in ("logtostderr", "alsologtostderr", "verbosity")}
  if f["logtostderr"]:
    return configure(None, verbose=True)
  if workdir:
    path = os.path.join(workdir, LOG_NAME)
  else:
    program = os.path.basename(sys.argv[0]).removesuffix(".py")
    path = os.path.join(tempfile.gettempdir(), "fourfold", f"{program}.{LOG_NAME}")
  return configure(path, verbose=f["verbosity"] >= 1 or f["alsologtostderr"])


def configure(path: str | None, verbose: bool, stream=None) -> str | None:
  """Replaces the root logger's handlers: every record to `path` (appended; None: no file),
  and to `stream` (default stderr) the ones `shown_on_console` passes, or all if `verbose`."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    if handler is absl_logging.get_absl_handler() or getattr(handler, "fourfold", False):
      root.removeHandler(handler)
      if isinstance(handler, logging.FileHandler):
        handler.close()
  formatter = absl_logging.PythonFormatter()
  console = logging.StreamHandler(stream or sys.stderr)
  if not verbose:
    console.addFilter(shown_on_console)
  handlers = [console]
  if path:
    handlers.append(_LazyFile(path, encoding="utf-8", delay=True))
  for handler in handlers:
    handler.fourfold = True
    handler.setFormatter(formatter)
    root.addHandler(handler)
  return path


# Library warnings that are not news to the reader: they go to the log file only.
HARMLESS_WARNINGS = (
  "Metadata file does not exist",  # orbax, reading a checkpoint's state item on its own
  "Variant folder",  # TFDS, looking at a dataset folder it is about to prepare
)


class _LazyFile(logging.FileHandler):
  """Makes its folder and file at the first record: a command refused before anything is
  logged leaves no workdir behind."""

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()


def shown_on_console(record: logging.LogRecord) -> bool:
  """Warnings and errors from anywhere (but HARMLESS_WARNINGS); fourfold's own records."""
  if os.path.abspath(record.pathname).startswith(_OWN):
    return True
  if record.levelno == logging.WARNING:
    return not str(record.msg).startswith(HARMLESS_WARNINGS)
  return record.levelno > logging.WARNING
