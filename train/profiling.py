"""JAX profiler traces of a window of train steps, for TensorBoard's profile plugin and XProf.

`StepProfiler(logdir, first, count)` traces steps `first .. first + count - 1` into
`<logdir>/plugins/profile/<date_time>/<host>.xplane.pb` (`jax.profiler.start_trace`), each
step inside a `jax.profiler.StepTraceAnnotation("train", step_num=step)`, the marker the
profile plugin's step views (overview, step-time graph) group device work by. The trace
starts once the earlier steps' work is done and stops once the last traced step's outputs
are ready, so it holds exactly the window's device work.
`traced_steps(path)` reads a trace back: the step numbers it holds, and the times.
"""

from __future__ import annotations

import glob
import os

import jax

STEP_EVENT = "train"  # the StepTraceAnnotation name around each traced step


class StepProfiler:
  """Traces `count` steps from step `first` (count 0: nothing): `begin(n, state)` before
  step n, `end(n, outputs)` after it, and `stop()` in a `finally`."""

  def __init__(self, logdir: str, first: int, count: int):
    self.logdir, self.first, self.last = logdir, first, first + count - 1
    self.active = False
    self.path: str | None = None  # the trace's folder, once written
    self._annotation = None

  def begin(self, step: int, state) -> None:
    if step == self.first and self.last >= self.first:
      jax.block_until_ready(state)  # earlier steps' device work stays out of the trace
      jax.profiler.start_trace(self.logdir)
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
    runs = sorted(glob.glob(os.path.join(self.logdir, "plugins", "profile", "*")))
    self.path = runs[-1] if runs else None


def traced_steps(path: str) -> dict[int, float]:
  """{step: its wall time in ms} of the StepTraceAnnotations in a trace (an `.xplane.pb`, or
  a folder holding one), read with `jax.profiler.ProfileData`."""
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True))
    if not found:
      raise ValueError(f"{path}: no .xplane.pb trace in it")
    path = found[-1]
  steps = {}
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == STEP_EVENT:
          stats = dict(event.stats)
          if "step_num" in stats:
            steps[int(stats["step_num"])] = event.duration_ns / 1e6
  return steps
