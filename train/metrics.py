"""Metric writers (metrics.jsonl + TensorBoard), the progress line, MFU, the loss plot."""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath


class MetricsWriter:
  """Appends `{"step": s, key: value, ...}` lines and TensorBoard scalars; process 0 only."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._text = None  # in a bucket: the object's text, rewritten whole at each write
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes gs:// itself (google-cloud-storage)

      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    if "://" not in str(self.path):
      with self.path.open("a") as f:
        f.write(line)
    else:  # an object cannot be appended to; one write, so a kill leaves the old or the new
      if self._text is None:
        self._text = self.path.read_text() if self.path.exists() else ""
      self._text += line
      self.path.write_text(self._text)
    for k, v in record.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, seconds: float = 1.0) -> float:
  """FLOP/s of a square matmul on the default device, the best of repeated timings."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best, spent = math.inf, 0.0
  while spent < seconds:
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    dt = time.perf_counter() - t0
    best, spent = min(best, dt), spent + dt
  return 2 * n**3 / best


PROGRESS_KEYS = (
  "train/loss",
  "eval/loss",
  "eval/bits_per_byte",
  "eval/mlm_accuracy",
  "eval/accuracy",
  "eval/f1",
  "eval/spearman",
  "eval/exact_match",
  "eval/rougeL",
  "eval/bleu",
  "train/rewards/margin",
  "eval/rewards/margin",
  "eval/rewards/accuracy",
)


class Progress:
  """One line per report: step, loss, tokens/s, ETA."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self.t0, self.step0 = time.perf_counter(), start_step

  def line(self, step: int, metrics: dict[str, float]) -> str:
    elapsed = time.perf_counter() - self.t0
    done = max(step - self.step0, 1)
    eta = elapsed / done * (self.total - step)
    parts = [f"step {step}/{self.total}"]
    for key in PROGRESS_KEYS:
      if key in metrics:
        parts.append(f"{key} {metrics[key]:.4f}")
    if "perf/tokens_per_sec" in metrics:
      parts.append(f"{metrics['perf/tokens_per_sec']:,.0f} tok/s")
      parts.append(f"mfu {metrics['perf/mfu']:.2f}")
    parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    return " | ".join(parts)

  def report(self, step: int, metrics: dict[str, float]) -> None:
    if self.enabled:
      print(self.line(step, metrics), file=sys.stdout, flush=True)


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin")


def plot_loss(workdir: str) -> str | None:
  """Writes <workdir>/loss.png from metrics.jsonl; returns its path. A preference run (its
  metrics hold rewards) gets a second panel: the chosen and rejected rewards and their
  margin, train as lines, eval as markers."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rewards = any("train/rewards/margin" in r for r in records)
  fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(13 if rewards else 7, 4))
  axes = np.atleast_1d(axes)

  def curve(ax, key, **kw):
    by_step = {r["step"]: r[key] for r in records if key in r}  # a resumed run's later lines win
    if by_step:
      steps = np.array(sorted(by_step))
      marker = "o" if key.startswith("eval/") else None
      ax.plot(steps, [by_step[s] for s in steps], label=key, marker=marker, **kw)

  for key in ("train/loss", "eval/loss"):
    curve(axes[0], key)
  axes[0].set_ylabel("loss (nats/token; preference losses per pair)")
  if rewards:
    for key, color in zip(REWARD_KEYS, ("tab:green", "tab:red", "tab:blue"), strict=True):
      curve(axes[1], f"train/{key}", color=color, alpha=0.6)
      curve(axes[1], f"eval/{key}", color=color, linestyle="none")
    axes[1].axhline(0.0, color="gray", linewidth=0.8)
    axes[1].set_ylabel("reward: beta x log-ratio to the reference")
  for ax in axes:
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
  path = epath.Path(workdir) / "loss.png"
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
  plt.close(fig)
  return str(path)
