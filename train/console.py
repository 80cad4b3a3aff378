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
exceptions print their traceback as always. A failed checkpoint save is one line on the
console: orbax's error records (a traceback per background thread) and what its abandoned
async work raises after a failure (unraisable errors in orbax's coroutines, "Event loop is
closed" from TensorStore's callbacks) go to the log file, its never-awaited writes' warnings
at exit are dropped, and a log file that cannot be written (its disk is full) drops records
quietly. A workdir in a bucket (gs://...) gets its log.txt written whole when the command
exits (objects cannot be appended to); until then the records are in a local copy under
`<temp dir>/fourfold/bucket/` (where a killed command's records stay).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
import traceback
import warnings
import weakref

from absl import flags
from absl import logging as absl_logging
from etils import epath

LOG_NAME = "log.txt"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
_OWN = tuple(os.path.join(_ROOT, d) + os.sep for d in ("train", "eval", "bench", "launch"))


def setup(workdir: str | None) -> str | None:
  """Routes logging for a command from absl's parsed flags; returns the log file's path."""
  f = {name: flags.FLAGS[name].value for name in ("logtostderr", "alsologtostderr", "verbosity")}
  sys.unraisablehook = _unraisable
  warnings.filterwarnings(  # at exit, after a failed save: orbax's abandoned array writes
    "ignore", r"coroutine 'async_serialize_from_host\.", RuntimeWarning
  )
  if f["logtostderr"]:
    return configure(None, verbose=True)
  if workdir:
    path = str(epath.Path(workdir) / LOG_NAME)
  else:
    program = os.path.basename(sys.argv[0]).removesuffix(".py")
    path = os.path.join(tempfile.gettempdir(), "fourfold", f"{program}.{LOG_NAME}")
  return configure(path, verbose=f["verbosity"] >= 1 or f["alsologtostderr"])


def _unraisable(info) -> None:
  """After a failed save or restore, orbax's abandoned coroutines and TensorStore's callbacks
  onto orbax's closed event loop raise where nobody can catch them (the failure itself is
  reported): those go to the log file; others print as always."""
  frames = traceback.extract_tb(info.exc_traceback)
  closed_loop = str(info.exc_value) == "Event loop is closed"
  if closed_loop or any(_ORBAX in f.filename for f in frames):
    path, line = (frames[-1].filename, frames[-1].lineno) if frames else ("?", 0)
    exc_info = (info.exc_type, info.exc_value, info.exc_traceback)
    root = logging.getLogger()  # a record from where it was raised (asyncio), not from here
    root.handle(root.makeRecord("asyncio", logging.INFO, path, line, "ignored", (), exc_info))
    return
  sys.__unraisablehook__(info)


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
    file = _BucketLog(path) if "://" in path else _LazyFile(path, encoding="utf-8", delay=True)
    handlers.append(file)
  for handler in handlers:
    handler.fourfold = True
    handler.setFormatter(formatter)
    root.addHandler(handler)
  return path


# orbax logs each failure of a background save with its traceback, in several threads; the
# failure then comes back as an exception, which the trainer reports in one line
# (checkpoint.CheckpointSaveError): orbax's errors go to the log file only.
_ORBAX = os.sep + os.path.join("orbax", "checkpoint") + os.sep

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

  def handleError(self, record):
    """A log file that cannot be written (its disk is full) drops the record quietly: the
    console still shows what matters, without a traceback per record."""
    if not isinstance(sys.exc_info()[1], OSError):
      super().handleError(record)


class _BucketLog(_LazyFile):
  """A log file in a bucket, whose objects cannot be appended to: this command's records go to
  a local copy, added to the bucket's log at exit (before the storage client closes its
  session, so from an atexit hook of its own) or when the handler is replaced. The storage
  client logs from its own thread while it writes: those records are dropped, not waited for
  (the handler's lock is held)."""

  def __init__(self, url: str):
    self.url, self._busy, self._earlier = epath.Path(url), False, None
    local = os.path.join(tempfile.gettempdir(), "fourfold", "bucket", url.replace("://", "/", 1))
    super().__init__(local, mode="w", encoding="utf-8", delay=True)
    # gcsfs closes its session in a weakref.finalize; atexit runs the last registered first:
    # the finalizers' exit hook is registered (by this first finalize), then the upload
    weakref.finalize(self, lambda: None)
    atexit.register(self._at_exit)
    self._exited = False

  def handle(self, record):
    return False if self._busy else super().handle(record)

  def upload(self) -> None:
    """Writes the bucket's log as it was before this command, then this command's records."""
    if self.stream is None:
      return
    self.acquire()
    self._busy = True
    try:
      self.flush()
      if self._earlier is None:
        self._earlier = self.url.read_bytes() if self.url.exists() else b""
      self.url.write_bytes(self._earlier + epath.Path(self.baseFilename).read_bytes())
    except Exception as e:  # at exit: say so, keep the local copy
      print(f"log file {self.url} not written ({e}); it is in {self.baseFilename}", file=sys.stderr)
    finally:
      self._busy = False
      self.release()

  def _at_exit(self) -> None:
    self.upload()
    self._exited = True  # logging's own shutdown comes after the storage client closed

  def close(self):
    if not self._exited:
      self.upload()
    atexit.unregister(self._at_exit)
    super().close()


def _from_orbax(record: logging.LogRecord) -> bool:
  """Logged by orbax, or about an error raised in orbax's code, or asyncio's "Task / Future
  exception was never retrieved" (fourfold runs no asyncio of its own: these are orbax's and
  TensorStore's abandoned writes after a failed save, whose failure is reported)."""
  tb = record.exc_info[2] if record.exc_info else None
  unretrieved = record.name == "asyncio" and "exception was never retrieved" in str(record.msg)
  return (
    unretrieved
    or _ORBAX in record.pathname
    or any(_ORBAX in f.filename for f in traceback.extract_tb(tb))
  )


def shown_on_console(record: logging.LogRecord) -> bool:
  """Warnings and errors from anywhere (but HARMLESS_WARNINGS); fourfold's own records."""
  if os.path.abspath(record.pathname).startswith(_OWN):
    return True
  if record.levelno >= logging.ERROR and _from_orbax(record):
    return False
  if record.levelno == logging.WARNING:
    return not str(record.msg).startswith(HARMLESS_WARNINGS)
  return record.levelno > logging.WARNING
