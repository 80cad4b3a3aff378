"""launch/colab_tpu.ipynb runs top to bottom in a local Jupyter kernel on this CPU.

As papermill does, a cell inserted after the `parameters` cell points the notebook at this
checkout (no clone, no install), the `tiny` Llama preset on a small text file, 3 steps and a
temporary runs folder. Every cell runs; the Colab-only parts (the TPU check, TensorBoard,
Google Drive) must say they were skipped. The kernel and the two subprocesses it starts
(training, sampling) inherit the tests' environment: JAX on the CPU, the session's
compilation cache.
"""

import json
import os
import random
import sys

from tests.launch.test_launch_scripts import NOTEBOOK, REPO

STEPS = 3


def corpus(path) -> str:
  rng = random.Random(0)
  words = "def class return import for while if else self value".split()
  path.write_text("\n".join(" ".join(rng.choices(words, k=10)) for _ in range(300)))
  return f"text:{path}"


def run_notebook(tmp_path):
  """The executed notebook, parameters overridden after the `parameters` cell."""
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  (at,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  flags = (
    f"--config.data.name={corpus(tmp_path / 'corpus.txt')} --config.data.shuffle_window=16 "
    "--config.train.batch_size=2 --config.train.log_every=1 --config.train.eval_every=0 "
    "--config.train.num_samples=0 --config.train.peak_tflops=1.0"  # no matmul measurement
  )
  params = dict(
    REPO_DIR=REPO,
    INSTALL=False,
    CONFIG="configs/llama.py:size=tiny",
    STEPS=STEPS,
    RUNS=str(tmp_path / "runs"),
    RUN_NAME="tiny",
    EXTRA_FLAGS=flags,
  )
  source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
  injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(at + 1, injected)
  # `!python` in the cells is this interpreter; the plot goes to the kernel's inline backend.
  env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  client = NotebookClient(nb, timeout=300, kernel_name="python3")
  client.execute(cwd=str(tmp_path), env=env)
  return {c.get("id"): c for c in nb.cells}


def stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_notebook_runs_top_to_bottom_with_a_tiny_config(tmp_path):
  cells = run_notebook(tmp_path)
  workdir = tmp_path / "runs" / "tiny"
  assert f"using the checkout in {REPO}" in stdout(cells["setup"])
  assert "INSTALL=False" in stdout(cells["setup"])
  assert "not on Colab: the TPU check is skipped" in stdout(cells["tpu-check"])
  # Training: the requested steps, each logged once with a finite loss.
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(0 < r["train/loss"] < 10 for r in rows)
  assert f"step {STEPS}/{STEPS}" in stdout(cells["train"])
  assert "TensorBoard is not started" in stdout(cells["tensorboard"])
  # The plot cell drew a figure and showed the metrics' last rows.
  plot = cells["plot"].outputs
  assert any("image/png" in o.get("data", {}) for o in plot), plot
  assert any("train/loss" in o.get("data", {}).get("text/plain", "") for o in plot)
  # Sampling printed three samples continuing the prompt.
  samples = stdout(cells["sample"])
  for i in range(1, 4):
    assert f"---- sample {i}/3" in samples, samples
  assert samples.count("\ndef ") == 3, samples
  assert f"Google Drive is not mounted; the run stays in {workdir}" in stdout(cells["drive"])
