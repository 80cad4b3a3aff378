"""Orbax checkpoints of `{state, data iterator}`, and the resume order.

Resume order: the latest checkpoint in the workdir, else `config.init_from`,
else a fresh init. A checkpoint whose shapes differ from the model is refused
before anything is restored or written.

Storage faults: a checkpoint whose files cannot be read (truncated, corrupted) is named in a
warning (its step and the file), left in place, and the next older one restored; a save
that fails (a full disk) raises `CheckpointSaveError`, one line naming the step's path, the
cause and the last good step, whether the save failed at once or in the background.
"""

from __future__ import annotations

import json
import os
import re

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.experimental.v1 import partial

UNRESTORABLE = ".unrestorable"  # suffix of a broken step's folder once a run saves its step again


def is_url(path) -> bool:
  """Whether `path` names a bucket (gs://...) rather than a local path."""
  return "://" in str(path)


def absolute(path) -> epath.Path:
  """`path` as an `epath.Path`: a local one made absolute (os.path.abspath), a URL as given."""
  return epath.Path(path) if is_url(path) else epath.Path(os.path.abspath(path))


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the message is one line for the user."""


class UnreadableCheckpointError(RuntimeError):
  """A checkpoint's files cannot be read; the message names the step and the file."""


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat if hasattr(leaf, "shape")
  }


def check_same_shapes(saved, expected, where: str) -> None:
  """Raises ValueError naming the first parameter whose shape differs."""
  saved_shapes, expected_shapes = _shapes(saved), _shapes(expected)
  if saved_shapes.keys() != expected_shapes.keys():
    missing = sorted(expected_shapes.keys() - saved_shapes.keys())[:3]
    extra = sorted(saved_shapes.keys() - expected_shapes.keys())[:3]
    raise ValueError(
      f"checkpoint {where} holds a different model: missing {missing}, unexpected {extra}. "
      "Use a new --workdir, or a config matching the checkpoint."
    )
  for key, shape in expected_shapes.items():
    if saved_shapes[key] != shape:
      raise ValueError(
        f"checkpoint {where} holds a different model: {key} has shape {saved_shapes[key]}, "
        f"the config gives {shape}. Use a new --workdir, or a config matching the checkpoint."
      )


class Checkpointer:
  """An async CheckpointManager under `<workdir>/checkpoints`, keeping the last N."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = str(absolute(workdir) / "checkpoints")
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
      },
    )
    self.unrestorable: set[int] = set()  # steps found broken by `restore_newest`
    self.pending: int | None = None  # the step of a save that may still be writing
    self.failed = False  # a save failed (and was reported)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_compatible(self, step: int, abstract_state) -> None:
    meta = self._read(step, lambda: self.manager.item_metadata(step)["state"])
    where = f"{self.directory}/{step}"
    if "opt_state" not in meta:
      raise ValueError(
        f"checkpoint {where} holds weights only (an import, eval.import_hf): train from it in "
        f"a new workdir, --config=configs/workdir.py:{epath.Path(self.directory).parent} "
        "--workdir=<new dir> (it starts from these weights through config.init_from)"
      )
    check_same_shapes(meta["params"], abstract_state.params, where)
    saved_ema, want_ema = _has_ema(meta), abstract_state.ema_params is not None
    if saved_ema != want_ema:
      raise ValueError(
        f"train.ema_decay: checkpoint {where} was saved {'with' if saved_ema else 'without'} "
        f"a params EMA and this config runs {'with' if want_ema else 'without'} one. Resume "
        "with the run's own train.ema_decay, or start a new workdir with --config.init_from."
      )

  def restore(self, step: int, abstract_state, data_iter: grain.DatasetIterator | None):
    """Restores state (into the shardings carried by `abstract_state`) and the iterator.
    Raises UnreadableCheckpointError when the step's files cannot be read."""
    self.check_compatible(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      self.check_data_state(step)
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._read(
      step, lambda: self.manager.restore(step, args=ocp.args.Composite(**items))
    )
    return restored["state"]

  def restore_newest(self, abstract_state, data_iter) -> tuple[int, object]:
    """(step, state) of the newest checkpoint that restores. A step whose files cannot be read
    is named in a warning, left in place, and the next older one tried; a checkpoint of
    another model is refused at once (ValueError), as by `restore`.

    On several processes, orbax's restore is a collective: a process must not leave it
    alone. They agree first on the newest step whose metadata and JSON files every process
    can read (`_precheck`, no collectives) and restore that one; if its array data then
    fails to read, the run stops, naming the step, for it to be moved aside by hand."""
    failures, multi = [], jax.process_count() > 1
    for step in sorted(self.manager.all_steps(), reverse=True):
      state, error = None, self._precheck(step) if multi else None
      if multi:
        readable = multihost_utils.process_allgather(np.int32(error is None))
        if error is None and not readable.all():
          bad = [int(i) for i in np.flatnonzero(readable == 0)]
          error = f"checkpoint step {step} cannot be restored on processes {bad}"
      if error is None:
        try:
          state = self.restore(step, abstract_state, data_iter)
        except UnreadableCheckpointError as e:
          if multi:
            raise UnreadableCheckpointError(
              f"{e}. The processes cannot skip a step together once its arrays are being "
              f"read: move {self.directory}/{step} aside (e.g. to {step}{UNRESTORABLE}) and "
              "rerun to resume from the step before it"
            ) from e
          error = str(e)
      if error is None:
        if failures:
          logging.warning(
            "resuming from step %d, the newest checkpoint that restores; the broken ones "
            "(%s) are left in place, and set aside as <step>%s when this run saves their step",
            step,
            ", ".join(str(s) for s, _ in failures),
            UNRESTORABLE,
          )
        return step, state
      logging.warning("%s", error)
      failures.append((step, error))
      self.unrestorable.add(step)
    raise ValueError(
      f"no checkpoint in {self.directory} can be restored: "
      + "; ".join(e for _, e in failures)
      + ". They are left in place: move them aside to start again from step 0 (or "
      "--config.init_from), or use a new --workdir."
    )

  def _precheck(self, step: int) -> str | None:
    """Why `step` cannot be restored, from what this process can read alone: the state's
    metadata and the step's JSON files (every process's iterator state); None if they read."""
    try:
      self._read(step, lambda: self.manager.item_metadata(step)["state"])
    except UnreadableCheckpointError as e:
      return str(e)
    bad = _bad_json(epath.Path(self.directory) / str(step))
    return f"checkpoint step {step} cannot be restored: {bad[0]}: {bad[1]}" if bad else None

  def _read(self, step: int, read):
    """`read()`, its failure (an orbax or TensorStore error) as UnreadableCheckpointError."""
    try:
      return read()
    except Exception as e:
      step_dir = f"{self.directory}/{step}"
      path, cause = _describe(e, step_dir)
      raise UnreadableCheckpointError(
        f"checkpoint step {step} cannot be restored: {path or step_dir}: {cause}"
      ) from e

  def check_data_state(self, step: int) -> None:
    """The iterator state is saved per process: the same process count must resume it."""
    data_dir = epath.Path(self.directory) / str(step) / "data"
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if data_dir.is_dir() and not (data_dir / mine).exists():
      saved = sorted(f.name for f in data_dir.iterdir() if f.name.startswith("process_"))
      raise ValueError(
        f"checkpoint {self.directory}/{step}: its data-iterator state was saved by other "
        f"processes ({', '.join(saved)}); this is {mine[:-5]}. Resume with the same number "
        "of processes, or start a new workdir with --config.init_from to keep the weights."
      )

  def save(
    self, step: int, state, data_iter: grain.DatasetIterator | None, force: bool = False
  ) -> bool:
    """Starts saving `step` in the background, after the previous save has finished. Raises
    CheckpointSaveError if this save, or the previous one, failed."""
    self.wait()
    if step in self.unrestorable:
      self._set_aside(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.pending = step
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:
      raise self._save_error(e) from e
    if not saved:
      self.pending = None
    return saved

  def _set_aside(self, step: int) -> None:
    """Renames a broken step's folder to `<step>.unrestorable`, so this run can save the step."""
    src = f"{self.directory}/{step}"
    if jax.process_index() == 0 and epath.Path(src).is_dir():
      epath.Path(src).rename(src + UNRESTORABLE)
      logging.warning("the unrestorable checkpoint %s is kept as %s", src, src + UNRESTORABLE)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self.manager.reload()
    self.unrestorable.discard(step)

  def wait(self) -> None:
    """Waits for the save in progress; raises CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(e) from e
    self.pending = None

  def _save_error(self, error: Exception) -> CheckpointSaveError:
    self.failed = True
    step, step_dir = self.pending, f"{self.directory}/{self.pending}"
    _, cause = _describe(error, step_dir)
    self.manager.reload()  # the steps on disk: a failed save has none
    good = [s for s in self.manager.all_steps() if s != step]
    good = [s for s in good if s not in self.unrestorable]
    last = (
      f"the last good checkpoint is step {max(good)} ({self.directory}/{max(good)}); "
      if good
      else "no checkpoint was saved before it; "
    )
    return CheckpointSaveError(
      f"checkpoint step {step} could not be saved to {step_dir}: {cause}; {last}free the space "
      f"(or fix the storage) and rerun the same command to resume from step {max(good or [0])}"
    )

  def close(self) -> None:
    """Waits for the last save and closes; after a reported failure, closes quietly."""
    try:
      if not self.failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception:
        if not self.failed:
          raise
        logging.info("closing the checkpoint manager after a failed save", exc_info=True)


_STATUS = re.compile(r"^([A-Z_]{4,}): (.*)$")  # an absl / TensorStore status message


def _describe(error: BaseException, step_dir: str) -> tuple[str | None, str]:
  """(the file at fault if known, the cause in one line) of an orbax or TensorStore error.

  The most specific message in the exception's chain wins: a status message (`DATA_LOSS:
  ...`) gives its code, the last file under `step_dir` it quotes, and its last clause; a
  JSON decoding error is traced to the file that does not parse."""
  chain, e = [], error
  while e is not None and len(chain) < 16:
    chain.append(e)
    e = e.__cause__ or e.__context__
  for e in chain:
    m = _STATUS.match(str(e).splitlines()[0] if str(e) else "")
    if m:
      code, text = m.groups()
      text = text.split(" [tensorstore_spec=")[0]
      quoted = [q for q in re.findall(r'"([^"]+)"', text) if q.startswith(step_dir)]
      cause = f"{code}: {re.split(r': ', text)[-1]}"
      key = re.search(r'Error (reading|writing) "([^"/][^"]*)"', text)
      if key:
        cause += f' ({key.group(1)} "{key.group(2)}")'
      return (quoted[-1].rstrip("/") if quoted else None), cause
  for e in chain:
    if isinstance(e, json.JSONDecodeError):
      return (_bad_json(step_dir) or (None,))[0], f"invalid JSON ({e.msg})"
  e = chain[-1]
  return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _bad_json(step_dir: epath.Path) -> tuple[str, str] | None:
  """(path, why) of the first metadata file under `step_dir` that does not parse as JSON:
  array data (`d/`, `ocdbt.*/`, manifests) and text markers are skipped, and so is any file
  that does not start as JSON does (a JSON file cut short still starts with `{`)."""
  for root, dirs, files in epath.Path(step_dir).walk():
    dirs[:] = sorted(d for d in dirs if d != "d" and not d.startswith("ocdbt."))
    for name in sorted(files):
      path = root / name
      if name.startswith("manifest") or name.endswith(".txt") or path.stat().length > 2**26:
        continue
      text = path.read_bytes()
      if text[:1] not in (b"", b"{", b"["):
        continue
      try:
        json.loads(text)
      except json.JSONDecodeError as e:
        return str(path), f"invalid JSON ({e.msg})"
      except (ValueError, UnicodeDecodeError) as e:
        return str(path), f"invalid JSON ({e})"
  return None


class ParamsWriter:
  """Writes weights only (an import: no optimizer state, no data iterator) where the trainer
  keeps step `step`'s state, so `restore_params` and `init_from` read them, a few arrays at a
  time: each `add` is an orbax partial save, so the full set never has to be in memory at
  once; `finish` makes the checkpoint whole."""

  def __init__(self, workdir: str, step: int = 0):
    self.path = str(absolute(workdir) / "checkpoints" / str(step))

  def add(self, params: dict) -> None:
    """Saves these params (a nested dict, disjoint from what was added before)."""
    partial.save(self.path, {"params": params})

  def finish(self) -> str:
    partial.finalize(self.path)
    return f"{self.path}/state"


def _step_dir(path: str) -> str:
  """The latest step dir under a workdir or checkpoints dir, or `path` itself."""
  path = absolute(path)
  for candidate in (path / "checkpoints", path):
    if candidate.is_dir():
      steps = ocp.utils.checkpoint_steps(candidate)
      if steps:
        return str(candidate / str(max(steps)))
  if not (path / "state").is_dir():
    raise ValueError(
      f"init_from={str(path)!r}: no checkpoint found (expected <dir>/checkpoints/<step>/state)"
    )
  return str(path)


def _has_ema(saved_state) -> bool:
  """Whether a saved state (its metadata tree) kept a params EMA."""
  return bool(saved_state.get("ema_params"))


def _saved_weights(state_dir: str) -> tuple[str, dict]:
  """(key, metadata tree) of the weights another run evaluated: its params EMA if it kept
  one, else its params."""
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(state_dir).item_metadata.tree
  key = "ema_params" if _has_ema(tree) else "params"
  return key, tree[key]


def _restore_subset(state_dir: str, key: str, abstract_params):
  """Just these weights (`key` of the saved state), straight into their shardings: the
  saved mesh does not matter."""
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(
      state_dir,
      args=ocp.args.PyTreeRestore(
        item={key: abstract_params},
        restore_args={key: ocp.checkpoint_utils.construct_restore_args(abstract_params)},
        partial_restore=True,
      ),
    )
  return restored[key]


def restore_params(path: str, abstract_params):
  """Params from another run's checkpoint (a workdir, its checkpoints dir, or a step dir);
  the model must be the same."""
  step_dir = _step_dir(path)
  state_dir = f"{step_dir}/state"
  key, saved = _saved_weights(state_dir)
  check_same_shapes(saved, abstract_params, step_dir)
  return _restore_subset(state_dir, key, abstract_params)


def restore_matching_params(path: str, fresh_params) -> tuple[dict, list[str], list[str]]:
  """Starts from a checkpoint with a different head: (params, kept fresh, not used).

  Every parameter whose name is in the checkpoint is loaded (its shape must match, or grow
  along one axis: a vocabulary with new rows, such as a chat template's tokens, keeps the
  saved rows first and the new ones fresh); the others (a new head) keep their fresh values;
  checkpoint parameters this model lacks (the old head) are left unused.
  """
  step_dir = _step_dir(path)
  state_dir = f"{step_dir}/state"
  key, saved_tree = _saved_weights(state_dir)
  saved = {
    jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
  }
  flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  shared = {n: x for n, (_, x) in zip(names, flat, strict=True) if n in saved}
  if not shared:
    raise ValueError(f"init_from={path!r}: no parameter of this model is in {step_dir}")
  grown = {}  # name -> the axis along which the model has more rows (new vocabulary ids)
  for name, x in shared.items():
    old, new = tuple(saved[name].shape), tuple(x.shape)
    axes = [i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b]
    if len(old) == len(new) and len(axes) == 1 and old[axes[0]] < new[axes[0]]:
      grown[name] = axes[0]
    elif old != new:
      raise ValueError(
        f"init_from={path!r}: {name} has shape {old} in {step_dir}, "
        f"the config gives {new}. Use a config with the pretrained model's sizes."
      )
  # A tree of only the shared params (nested dicts, as saved), restored into their shardings
  # (a grown param: at its saved shape, replicated, then written over its first rows).
  subset: dict = {}
  for (path_keys, x), name in zip(flat, names, strict=True):
    if name in shared:
      node = subset
      for k in path_keys[:-1]:
        node = node.setdefault(k.key, {})
      node[path_keys[-1].key] = (
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        if name not in grown
        else jax.ShapeDtypeStruct(
          tuple(saved[name].shape),
          x.dtype,
          sharding=jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()),
        )
      )
  loaded = {
    jax.tree_util.keystr(p): x
    for p, x in jax.tree_util.tree_flatten_with_path(_restore_subset(state_dir, key, subset))[0]
  }
  for (_, x), name in zip(flat, names, strict=True):
    if name in grown:
      rows = loaded[name].shape[grown[name]]
      logging.info(
        "init_from: %s grows from %d to %d along axis %d; the new entries start fresh",
        name,
        rows,
        x.shape[grown[name]],
        grown[name],
      )
      index = tuple(slice(0, rows) if i == grown[name] else slice(None) for i in range(x.ndim))
      loaded[name] = jax.jit(lambda f, o, i=index: f.at[i].set(o), out_shardings=x.sharding)(
        x, loaded[name]
      )
  params = jax.tree_util.tree_unflatten(
    treedef, [loaded.get(n, x) for n, (_, x) in zip(names, flat, strict=True)]
  )
  kept_fresh = [n for n in names if n not in shared]
  unused = sorted(set(saved) - set(names))
  return params, kept_fresh, unused
