"""The console shows a command's own lines and the warnings; libraries' INFO records go to
<workdir>/log.txt only, unless absl's --verbosity (or --alsologtostderr) asks for them."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings

import pytest
from absl import logging as absl_logging
from absl.testing import flagsaver

from train import console

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def root_logger_kept(unraisablehook: bool = True):
  """Puts the root logger's handlers and level back afterwards, and sys.unraisablehook unless
  told not to."""
  root = logging.getLogger()
  handlers, level, hook = list(root.handlers), root.level, sys.unraisablehook
  try:
    yield
  finally:
    if unraisablehook:
      sys.unraisablehook = hook
    for handler in list(root.handlers):
      root.removeHandler(handler)
      if handler not in handlers:
        handler.close()
    for handler in handlers:
      root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture(autouse=True)
def restore_root_logger():
  with root_logger_kept():
    yield


def emit(level: int, message: str, pathname: str) -> None:
  """A log record as if logged from `pathname`, through the root logger."""
  logger = logging.getLogger("some.library")
  logger.handle(logger.makeRecord(logger.name, level, pathname, 1, message, (), None))


LIBRARY = "/site-packages/orbax/checkpoint/checkpoint_manager.py"


def lines(path) -> str:
  return open(path).read() if os.path.exists(path) else ""


def test_library_info_goes_to_the_log_file_only(tmp_path, capsys):
  logging.getLogger().setLevel(logging.INFO)
  with flagsaver.flagsaver(verbosity=0, alsologtostderr=False, logtostderr=False):
    path = console.setup(str(tmp_path))
    emit(logging.INFO, "Saving checkpoint", LIBRARY)
    emit(logging.WARNING, "disk nearly full", LIBRARY)
    emit(logging.WARNING, "Metadata file does not exist: /x/_CHECKPOINT_METADATA", LIBRARY)
    emit(logging.INFO, "resuming from step 5", os.path.join(ROOT, "train", "trainer.py"))
    absl_logging.info("absl's own info")
  assert path == str(tmp_path / "log.txt")
  err = capsys.readouterr().err
  assert "Saving checkpoint" not in err and "absl's own info" not in err
  assert "disk nearly full" in err and "resuming from step 5" in err
  assert "_CHECKPOINT_METADATA" not in err  # a harmless library warning
  log = lines(path)
  for message in ("Saving checkpoint", "full", "_CHECKPOINT_METADATA", "step 5", "absl's own"):
    assert message in log
  assert log.splitlines()[0].startswith("I")  # absl's format: I<date> <time> <thread> file:line]


@pytest.mark.parametrize("flag", ["verbosity", "alsologtostderr"])
def test_raised_verbosity_shows_library_info(flag, tmp_path, capsys):
  logging.getLogger().setLevel(logging.INFO)
  with flagsaver.flagsaver(**{flag: 1 if flag == "verbosity" else True}):
    path = console.setup(str(tmp_path))
    emit(logging.INFO, "Saving checkpoint", LIBRARY)
  assert "Saving checkpoint" in capsys.readouterr().err
  assert "Saving checkpoint" in lines(path)


def test_logtostderr_writes_no_file(tmp_path, capsys):
  logging.getLogger().setLevel(logging.INFO)
  with flagsaver.flagsaver(logtostderr=True):
    assert console.setup(str(tmp_path)) is None
    emit(logging.INFO, "Saving checkpoint", LIBRARY)
  assert "Saving checkpoint" in capsys.readouterr().err
  assert not (tmp_path / "log.txt").exists()


def test_no_file_until_something_is_logged(tmp_path):
  workdir = tmp_path / "run"
  console.configure(str(workdir / "log.txt"), verbose=False)
  assert not workdir.exists()  # a command refused before it logs leaves no workdir
  emit(logging.INFO, "Saving checkpoint", LIBRARY)
  assert "Saving checkpoint" in lines(workdir / "log.txt")


def test_setup_twice_keeps_one_console_handler(tmp_path, capsys):
  logging.getLogger().setLevel(logging.INFO)
  for _ in range(2):
    console.configure(str(tmp_path / "log.txt"), verbose=False)
  emit(logging.WARNING, "once", LIBRARY)
  assert capsys.readouterr().err.count("once") == 1
  assert lines(tmp_path / "log.txt").count("once") == 1


class RaisesWhenCollected:
  """Its deletion raises `message`: Python reports it through sys.unraisablehook, as it does
  for TensorStore's callbacks onto orbax's closed event loop after a failed save."""

  def __init__(self, message: str):
    self.message = message

  def __del__(self):
    raise RuntimeError(self.message)


class FullDisk:
  def write(self, _):
    raise OSError(errno.ENOSPC, "No space left on device")

  def flush(self):
    pass


def test_a_failed_save_leaves_the_console_to_its_one_line(tmp_path, capsys):
  """orbax's error records (a traceback per background thread) and the closed-event-loop
  errors after them go to the log file only; other libraries' errors and other unraisable
  errors still show; a log file on the full disk drops records without a traceback."""
  logging.getLogger().setLevel(logging.INFO)
  with flagsaver.flagsaver(verbosity=0, alsologtostderr=False, logtostderr=False):
    path = console.setup(str(tmp_path))
    emit(logging.ERROR, "Save Finalize thread failed", LIBRARY)
    emit(logging.ERROR, "a tensorstore error", "/site-packages/tensorstore/x.py")
    try:  # an error raised in orbax's code, logged by asyncio (an abandoned write's task)
      exec(compile("raise ValueError('RESOURCE_EXHAUSTED')", f"/sp{LIBRARY}", "exec"))
    except ValueError:
      logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=True)
    error = ValueError("DATA_LOSS")  # a TensorStore future's error, with no Python frames
    logging.getLogger("asyncio").error(
      "Future exception was never retrieved", exc_info=(ValueError, error, None)
    )
    RaisesWhenCollected("Event loop is closed")
    RaisesWhenCollected("a bug in a destructor")
    with warnings.catch_warnings(record=True) as caught:
      for name in ("async_serialize_from_host.<locals>.write_fragment", "mine"):
        warnings.warn(f"coroutine '{name}' was never awaited", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["coroutine 'mine' was never awaited"]
  err = capsys.readouterr().err
  assert "Save Finalize" not in err and "Event loop is closed" not in err
  assert "never retrieved" not in err and "RESOURCE_EXHAUSTED" not in err and "DATA_LOSS" not in err
  assert "a tensorstore error" in err and "a bug in a destructor" in err
  log = lines(path)
  assert "Save Finalize" in log and "Event loop is closed" in log and "never retrieved" in log
  handlers = logging.getLogger().handlers
  (log_file,) = [h for h in handlers if getattr(h, "fourfold", 0) and hasattr(h, "baseFilename")]
  log_file.stream = FullDisk()
  emit(logging.WARNING, "after the disk filled", LIBRARY)
  err = capsys.readouterr().err
  assert "after the disk filled" in err and "Traceback" not in err and "Logging error" not in err
