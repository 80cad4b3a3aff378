"""JAX profiler traces of a window of train steps, for TensorBoard's profile plugin and XProf.

`StepProfiler(logdir, first, count)` traces steps `first .. first + count - 1` into
`<logdir>/plugins/profile/<date_time>/<host>.xplane.pb` (`jax.profiler.start_trace`), each
step inside a `jax.profiler.StepTraceAnnotation("train", step_num=step)`, the marker the
profile plugin's step views (overview, step-time graph) group device work by. The trace
starts once the earlier steps' work is done and stops once the last traced step's outputs
are ready, so it holds exactly the window's device work. A logdir in a bucket (gs://...) gets
the trace written locally first and then copied up whole.
`traced_steps(path)` reads a trace back: the step numbers it holds, and the times.
"""

from __future__ import annotations

import tempfile

import jax
from etils import epath

STEP_EVENT = "train"  # the StepTraceAnnotation name around each traced step


class StepProfiler:
  """Traces `count` steps from step `first` (count 0: nothing): `begin(n, state)` before
  step n, `end(n, outputs)` after it, and `stop()` in a `finally`."""

  def __init__(self, logdir: str, first: int, count: int):
    self.logdir, self.first, self.last = logdir, first, first + count - 1
    self.active = False
    self.path: str | None = None  # the trace's folder, once written
    # the profiler writes local files: a bucket's trace goes to a local folder, then up
    self._local = tempfile.mkdtemp(prefix="fourfold_profile_") if "://" in logdir else logdir
    self._annotation = None

  def begin(self, step: int, state) -> None:
    if step == self.first and self.last >= self.first:
      jax.block_until_ready(state)  # earlier steps' device work stays out of the trace
      jax.profiler.start_trace(self._local)
      self.active = True
    if self.active:
      self._annotation = jax.profiler.StepTraceAnnotation(STEP_EVENT, step_num=step)
      self._annotation.__enter__()

  def end(self, step: int, outputs) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
    if self.active and step == self.last:
      jax.block_until_ready(outputs)  # the last step's device work is inside the trace
      self.stop()

  def stop(self) -> None:
    """Ends the trace if one is running (the run ended or failed inside the window)."""
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    runs = sorted((epath.Path(self._local) / "plugins" / "profile").glob("*"))
    self.path = str(runs[-1]) if runs else None
    if self.path and self._local != self.logdir:
      target = epath.Path(self.logdir) / "plugins" / "profile" / runs[-1].name
      for root, _, files in runs[-1].walk():
        for name in files:
          dst = target / (root / name).relative_to(runs[-1])
          dst.parent.mkdir(parents=True, exist_ok=True)
          dst.write_bytes((root / name).read_bytes())
      self.path = str(target)


def traced_steps(path: str) -> dict[int, float]:
  """{step: its wall time in ms} of the StepTraceAnnotations in a trace (an `.xplane.pb`, or
  a folder holding one), read with `jax.profiler.ProfileData`."""
  if epath.Path(path).is_dir():
    found = sorted(
      root / name
      for root, _, files in epath.Path(path).walk()
      for name in files
      if name.endswith(".xplane.pb")
    )
    if not found:
      raise ValueError(f"{path}: no .xplane.pb trace in it")
    path = found[-1]
  steps = {}
  data = jax.profiler.ProfileData.from_serialized_xspace(epath.Path(path).read_bytes())
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == STEP_EVENT:
          stats = dict(event.stats)
          if "step_num" in stats:
            steps[int(stats["step_num"])] = event.duration_ns / 1e6
  return steps
