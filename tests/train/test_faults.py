"""Storage faults (a checkpoint that cannot be read, a save on a full disk) and profiles, on
one shared tiny run: 8 steps, checkpoints at 4 and 8, a profile of steps 2-6."""

import glob
import hashlib
import io
import logging
import os
import shutil

import jax
import pytest
import tensorflow_datasets as tfds
from orbax.checkpoint._src.serialization import serialization

from configs import gpt
from tests.train.test_trainer import losses, tiny
from train import console, trainer
from train.checkpoint import CheckpointSaveError
from train.profiling import STEP_EVENT, traced_steps

PROFILED = [2, 3, 4, 5, 6]


def run(config, workdir, stream=None) -> str:
  """Trains with the commands' console routing; returns what the console showed."""
  stream = stream or io.StringIO()
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  console.configure(os.path.join(workdir, "log.txt"), verbose=False, stream=stream)
  try:
    with tfds.testing.mock_data(num_examples=8):
      trainer.run(config, str(workdir))
  finally:
    for handler in list(root.handlers):
      root.removeHandler(handler)
      if handler not in handlers:
        handler.close()
    for handler in handlers:
      root.addHandler(handler)
    root.setLevel(level)
  return stream.getvalue()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("saved") / "run"
  run(tiny(gpt, steps=8, profile_start=PROFILED[0], profile_steps=len(PROFILED)), workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  return workdir


def copy_of(saved_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(saved_run, workdir, ignore=shutil.ignore_patterns("tensorboard"))
  return workdir


def file_digests(folder) -> dict[str, str]:
  return {
    os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
    for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    if os.path.isfile(p)
  }


@pytest.mark.parametrize(
  "broken",
  ["state/_sharding", "state/ocdbt.process_0/d/*"],
  ids=["sharding_json", "array_data"],
)
def test_unreadable_checkpoint_is_named_kept_and_the_previous_one_resumes(
  broken, saved_run, tmp_path
):
  """The newest checkpoint truncated (the issue's `_sharding: Invalid JSON`, or the largest
  array-data file): a warning names the step and the file, the run resumes from step 4 with
  the losses of the run that saved it, and the broken step is kept, set aside, when the run
  saves step 8 again."""
  workdir = copy_of(saved_run, tmp_path)
  path = max(glob.glob(str(workdir / "checkpoints/8" / broken)), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  broken_files = file_digests(workdir / "checkpoints/8")
  shown = run(tiny(gpt, steps=8), workdir)
  named = path if broken.endswith("_sharding") else str(workdir / "checkpoints/8/state")  # OCDBT
  assert f"checkpoint step 8 cannot be restored: {named}" in shown, shown
  assert "resuming from step 4" in shown, shown
  saved, resumed = losses(saved_run), losses(workdir)
  assert [resumed[s] for s in range(5, 9)] == [saved[s] for s in range(5, 9)]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8", "8.unrestorable"]
  assert file_digests(workdir / "checkpoints/8.unrestorable") == broken_files
  assert file_digests(workdir / "checkpoints/4") == file_digests(saved_run / "checkpoints/4")


def test_no_restorable_checkpoint_is_refused_untouched(saved_run, tmp_path):
  workdir = copy_of(saved_run, tmp_path)
  for step in ("4", "8"):
    path = workdir / "checkpoints" / step / "state" / "_sharding"
    path.write_bytes(path.read_bytes()[:100])
  before = file_digests(workdir / "checkpoints")
  with pytest.raises(ValueError, match="no checkpoint in .* can be restored: checkpoint step 8"):
    run(tiny(gpt, steps=8), workdir)
  assert file_digests(workdir / "checkpoints") == before


def no_space_at_step(step: int):
  """orbax's array writer, failing as TensorStore does when a write hits ENOSPC (the text of
  the error a save into a full 2 MB tmpfs raised, docs/results/storage_faults.md) while it
  writes `step`'s checkpoint; other steps are written for real."""
  write = serialization.async_serialize_from_host

  async def maybe_full(rslices_on_host, tensorstore_spec, *args, **kwargs):
    kvstore = tensorstore_spec["kvstore"]
    base = kvstore.get("base", {}).get("path", "")
    if f"/checkpoints/{step}.orbax-checkpoint-tmp/" in base:
      raise ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "{kvstore.get("path", "")}0" in OCDBT database at '
        f'local file "{base}": Failed writing: "{base}d/0123": Failed to write 296221 bytes '
        "to file 18: No space left on device [os_error_code='28']"
      )
    return await write(rslices_on_host, tensorstore_spec, *args, **kwargs)

  return maybe_full


def test_save_on_a_full_disk_stops_in_one_line_and_the_rerun_resumes(
  saved_run, tmp_path, monkeypatch
):
  """From step 8, the save of step 12 fails in the background; it surfaces at the next save
  (16) as one line naming step 12's path, the cause and the last good step, 8, whose files
  are untouched; the rerun resumes from 8 with the same losses."""
  workdir = copy_of(saved_run, tmp_path)
  good = file_digests(workdir / "checkpoints/8")
  monkeypatch.setattr(serialization, "async_serialize_from_host", no_space_at_step(12))
  shown = io.StringIO()
  with pytest.raises(CheckpointSaveError) as failure:
    run(tiny(gpt, steps=16), workdir, shown)
  message = str(failure.value)
  assert "\n" not in message
  assert message.startswith(
    f"checkpoint step 12 could not be saved to {workdir}/checkpoints/12: RESOURCE_EXHAUSTED: "
    "No space left on device [os_error_code='28']"
  ), message
  assert f"the last good checkpoint is step 8 ({workdir}/checkpoints/8)" in message, message
  shown = shown.getvalue()  # orbax's records (a traceback per thread) went to the log file
  assert "RESOURCE_EXHAUSTED" not in shown and "Traceback" not in shown, shown
  assert "RESOURCE_EXHAUSTED" in open(workdir / "log.txt").read()
  assert sorted(s for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == ["4", "8"]
  assert file_digests(workdir / "checkpoints/8") == good
  failed = losses(workdir)
  monkeypatch.undo()  # the space is free again
  run(tiny(gpt, steps=16), workdir)
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, 17))
  assert [resumed[s] for s in range(9, 17)] == [failed[s] for s in range(9, 17)]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16", "8"]


def test_profile_holds_the_train_steps_of_its_window(saved_run):
  """The trace sits where TensorBoard's profile plugin reads it, and its XSpace holds a step
  marker for each profiled step, each around one dispatch of the jitted train step."""
  (pb,) = glob.glob(str(saved_run / "tensorboard/plugins/profile/*/*.xplane.pb"))
  steps = traced_steps(pb)
  assert sorted(steps) == PROFILED and all(ms > 0 for ms in steps.values()), steps
  markers, dispatches = [], []
  for plane in jax.profiler.ProfileData.from_file(pb).planes:
    for line in plane.lines:
      for e in line.events:
        if e.name == STEP_EVENT:
          markers.append((e.start_ns, e.end_ns))
        elif e.name == "PjitFunction(train_step)":
          dispatches.append(e.start_ns)
  inside = [sum(a <= t <= b for t in set(dispatches)) for a, b in sorted(markers)]
  assert len(markers) == len(PROFILED) and all(n >= 1 for n in inside), (markers, dispatches)
