"""Storage faults (a checkpoint that cannot be read, a save on a full disk) and profiles, on
one shared tiny run: 6 steps, checkpoints at 3 and 6, a profile of steps 2-6."""

import glob
import hashlib
import io
import os
import shutil

import jax
import pytest
import tensorflow_datasets as tfds
from orbax.checkpoint._src.serialization import serialization

from configs import gpt
from tests.train.test_console import root_logger_kept
from tests.train.test_trainer import losses, tiny
from train import console, families, sharding, trainer
from train.checkpoint import Checkpointer, CheckpointSaveError
from train.data import make_tokenizer
from train.optim import make_optimizer
from train.profiling import STEP_EVENT, traced_steps
from train.step import saved_part

PROFILED = [2, 3, 4, 5, 6]
SAVED = tiny(gpt, steps=6, checkpoint_every=3, profile_start=2, profile_steps=5)


def run(config, workdir, stream=None) -> str:
  """Trains with the commands' console routing; returns what the console showed."""
  stream = stream or io.StringIO()
  # The console's unraisable hook stays: orbax's reads abandoned on a broken checkpoint are
  # collected later, during other tests, and belong in the run's log, not in pytest's warnings.
  with root_logger_kept(unraisablehook=False):
    console.configure(os.path.join(workdir, "log.txt"), verbose=False, stream=stream)
    with tfds.testing.mock_data(num_examples=8):
      trainer.run(config, str(workdir))
  return stream.getvalue()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("saved") / "run"
  run(SAVED, workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
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


def truncate(path) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.fixture(scope="module")
def abstract():
  """The saved part of the tiny run's abstract state (shapes and shardings, no compile)."""
  model, _ = families.resolve(SAVED).build(SAVED, make_tokenizer(SAVED.data.tokenizer))
  mesh, rules = sharding.make_mesh(SAVED.mesh), sharding.rules(SAVED)
  tx = make_optimizer(SAVED.train)
  return saved_part(trainer.abstract_state(SAVED, model, tx, mesh, rules)[0])


def restored(workdir, step: int, abstract):
  ckpt = Checkpointer(str(workdir))
  try:
    return jax.device_get(ckpt.restore(step, abstract, None))
  finally:
    ckpt.close()


def assert_same_arrays(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and (x == y).all()


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


def test_broken_checkpoint_then_a_full_disk_lose_nothing(
  saved_run, abstract, tmp_path, monkeypatch
):
  """One run through both faults. The newest checkpoint (6) has a truncated `_sharding` (the
  issue's `Invalid JSON`): a warning names the step and the file, the run resumes from step 3
  with the losses of the run that saved it, and keeps the broken step (set aside as
  6.unrestorable when it saves step 6 again, bit for bit the state the first run saved).
  Then the save of step 8 hits a full disk in the background; it surfaces at the next save
  (10) as one line naming step 8's path, the cause and the last good step, 6, with nothing
  else on the console; step 6 is what a rerun restores."""
  workdir = copy_of(saved_run, tmp_path)
  broken = workdir / "checkpoints/6/state/_sharding"
  truncate(broken)
  broken_files = file_digests(workdir / "checkpoints/6")
  monkeypatch.setattr(serialization, "async_serialize_from_host", no_space_at_step(8))
  shown = io.StringIO()
  with pytest.raises(CheckpointSaveError) as failure:
    run(tiny(gpt, steps=10, checkpoint_every=2), workdir, shown)
  monkeypatch.undo()
  shown = shown.getvalue()
  warning = f"checkpoint step 6 cannot be restored: {broken}: FAILED_PRECONDITION: Invalid JSON"
  assert warning in shown and "resuming from step 3" in shown, shown
  saved, resumed = losses(saved_run), losses(workdir)
  assert [resumed[s] for s in (4, 5, 6)] == [saved[s] for s in (4, 5, 6)]
  assert file_digests(workdir / "checkpoints/6.unrestorable") == broken_files
  assert_same_arrays(restored(workdir, 6, abstract), restored(saved_run, 6, abstract))
  # the full disk: one line; orbax's records (a traceback per thread) in the log file only
  message = str(failure.value)
  assert "\n" not in message
  assert message.startswith(
    f"checkpoint step 8 could not be saved to {workdir}/checkpoints/8: RESOURCE_EXHAUSTED: "
    "No space left on device [os_error_code='28']"
  ), message
  assert f"the last good checkpoint is step 6 ({workdir}/checkpoints/6)" in message, message
  assert "RESOURCE_EXHAUSTED" not in shown and "Traceback" not in shown, shown
  assert "RESOURCE_EXHAUSTED" in open(workdir / "log.txt").read()
  assert max(losses(workdir)) == 10
  kept = sorted(s for s in os.listdir(workdir / "checkpoints") if "tmp" not in s)
  assert kept == ["3", "4", "6", "6.unrestorable"], kept
  ckpt = Checkpointer(str(workdir))  # what the rerun (the space free again) resumes from
  assert ckpt.restore_newest(abstract, None)[0] == 6
  ckpt.close()


@pytest.mark.parametrize(
  "broken, named, cause",
  [
    ("state/_METADATA", "state/_METADATA", "invalid JSON ("),
    ("state/ocdbt.process_0/d/*", "state", "OUT_OF_RANGE: Requested byte range"),
  ],
  ids=["metadata_json", "array_data"],
)
def test_truncated_file_is_named_and_the_previous_step_restored(
  broken, named, cause, saved_run, abstract, tmp_path, caplog
):
  """A truncated file of step 6 (JSON metadata, the largest array-data file): the warning
  names the step and the file (for array data, its OCDBT database and the array whose bytes
  are missing); step 3 restores, as the run saved it."""
  workdir = copy_of(saved_run, tmp_path)
  truncate(max(glob.glob(str(workdir / "checkpoints/6" / broken)), key=os.path.getsize))
  ckpt = Checkpointer(str(workdir))
  step, state = ckpt.restore_newest(abstract, None)
  ckpt.close()
  assert step == 3
  assert_same_arrays(jax.device_get(state), restored(saved_run, 3, abstract))
  warning = caplog.records[0].getMessage()
  prefix = f"checkpoint step 6 cannot be restored: {workdir}/checkpoints/6/{named}: {cause}"
  assert warning.startswith(prefix), warning
  assert (
    broken.startswith("state/_")
    or '(reading "opt_state.' in warning
    or '(reading "params.' in warning
  )


def test_no_restorable_checkpoint_is_refused_untouched(saved_run, tmp_path):
  workdir = copy_of(saved_run, tmp_path)
  for step in ("3", "6"):
    path = workdir / "checkpoints" / step / "state" / "_sharding"
    path.write_bytes(path.read_bytes()[:100])
  before = file_digests(workdir / "checkpoints")
  with pytest.raises(ValueError, match="no checkpoint in .* can be restored: checkpoint step 6"):
    run(tiny(gpt, steps=8), workdir)
  assert file_digests(workdir / "checkpoints") == before


def test_profile_holds_the_train_steps_of_its_window(saved_run):
  """The trace sits where TensorBoard's profile plugin reads it, and its XSpace holds a step
  marker for each profiled step, each around a dispatch of the jitted train step."""
  (pb,) = glob.glob(str(saved_run / "tensorboard/plugins/profile/*/*.xplane.pb"))
  steps = traced_steps(pb)
  assert sorted(steps) == PROFILED and all(ms > 0 for ms in steps.values()), steps
  markers, dispatches = [], set()
  for plane in jax.profiler.ProfileData.from_file(pb).planes:
    for line in plane.lines:
      for e in line.events:
        if e.name == STEP_EVENT:
          markers.append((e.start_ns, e.end_ns))
        elif e.name == "PjitFunction(train_step)":
          dispatches.add(e.start_ns)
  inside = [sum(a <= t <= b for t in dispatches) for a, b in sorted(markers)]
  assert len(markers) == len(PROFILED) and all(n >= 1 for n in inside), (markers, dispatches)
