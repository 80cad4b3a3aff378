"""Test-wide environment, set before any test imports JAX's backends.

JAX runs on the CPU in the tests even where libtpu is installed (for the ahead-of-time
TPU compiles): no TPU metadata-server queries, and several test processes may load
libtpu at once (pytest-xdist workers, the multi-device subprocesses).

Compiled programs are cached on disk for the session (JAX's persistent compilation cache,
in a fresh temporary folder, inherited by the subprocesses the tests start): the many
tests that train the same tiny model again (resume, kill, init_from, sharded against one
device) load its train step instead of compiling it again. Compiles are deterministic, so
a cached program computes exactly what a fresh compile would.

XLA's CPU backend compiles with LLVM's optimizations lowered (`FAST_COMPILE`, appended to
`XLA_FLAGS` and inherited by the subprocesses): the tests' programs are tiny and compiled
far more often than they run long, and this takes about a quarter off the suite (16 min 53 s
to 12 min 56 s at issue 20's merge). Fast-math stays off; what changes is code generation,
which can move float32 sums by an ulp or so (batched against one-by-one scoring once moved
by 1.2e-7 relative), within the tolerances the tests use.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="fourfold-tests-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The slowest files (minutes of training and compiling), run first: with `-n 2 --dist
# loadfile` (the README's command) the two workers then finish together instead of one
# waiting on a long file picked up last. Order only; every test still runs.
SLOWEST_FIRST = (
  "tests/sharding/test_meshes.py",
  "tests/train/test_trainer.py",
  "tests/launch/test_aot.py",
  "tests/train/test_encdec_train.py",
  "tests/eval/test_packed.py",
  "tests/train/test_finetune.py",
  "tests/train/test_post_training.py",
  "tests/eval/test_lora_export.py",
  "tests/train/test_lora_train.py",
  "tests/eval/test_constrain.py",
  "tests/eval/test_harness.py",
  "tests/eval/test_benchmarks.py",
  "tests/eval/test_loglik.py",
)


def pytest_collection_modifyitems(items):
  def rank(item) -> int:
    path = item.nodeid.split("::")[0]
    return SLOWEST_FIRST.index(path) if path in SLOWEST_FIRST else len(SLOWEST_FIRST)

  items.sort(key=rank)  # stable: the order within and after them is kept


@pytest.fixture(scope="session")
def mdlm_run(tmp_path_factory):
  """(workdir, TFDS data dir, last metrics): configs/mdlm.py:size=tiny trained briefly on the default corpus,
  shared by the diffusion training and sampling tests (one training, not one per module)."""
  from tests.tiny_models import tiny_mdlm
  from train import trainer

  tfds_dir = tmp_path_factory.mktemp("tfds")  # pystdlib builds here in about a second
  workdir = tmp_path_factory.mktemp("mdlm")
  return workdir, str(tfds_dir), trainer.run(tiny_mdlm(str(tfds_dir)), str(workdir))


@pytest.fixture(scope="session")
def mdlm_workdir(mdlm_run):
  return mdlm_run[0]


STEPS = 24  # per run of TINY_ABLATION
BITNET_TRAIN = dict(  # TINY_ABLATION's bitnet158 run: the two-stage schedule
  schedule="two_stage",
  learning_rate=1e-2,
  min_learning_rate=1e-3,
  warmup_steps=3,
  cooldown_start=0.5,
  cooldown_learning_rate=3e-3,
  weight_decay=0.1,
)
TINY_ABLATION = f'''"""A tiny ablation for the sweep tests: gpt size=tiny, full precision against bitnet158
(with the two-stage schedule)."""

from configs import gpt

GRID = ["quant=none", "quant=bitnet158"]


def get_config(arg):
  c = gpt.get_config("size=tiny")
  c.model.quant = arg.split("=")[1]
  c.data.tfds_data_dir = TFDS_DIR  # the embedded pystdlib corpus, built here
  c.data.seq_len = 32
  c.data.shuffle_window = 16
  c.train.update(
    dict(
      steps={STEPS},
      batch_size=4,
      learning_rate=1e-2,
      min_learning_rate=1e-3,
      warmup_steps=0,
      schedule="constant",
      log_every=1,
      eval_every={STEPS},
      eval_steps=1,
      checkpoint_every={STEPS},
      num_samples=0,
      peak_tflops=1.0,
    )
  )
  if c.model.quant == "bitnet158":
    c.train.update({BITNET_TRAIN!r})
  return c


def summarize(results, outdir):
  return "\\n".join(
    f"SUMMARY {{arg}} params={{r['params']}} eval_loss={{r['metrics']['eval/loss']:.4f}}"
    for arg, r in sorted(results.items())
  )
'''


def run_sweep(module: str, workdir: str, *flags: str):
  """python -m launch.sweep, from the repository root."""
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "launch.sweep", f"--config={module}", f"--workdir={workdir}"]
  return subprocess.run([*cmd, *flags], cwd=repo, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory):
  """(ablation module, sweep workdir, completed process): TINY_ABLATION swept once, shared by
  the sweep tests, the two-stage training test and the packed-export tests (one pair of
  trainings, not one per module)."""
  root = tmp_path_factory.mktemp("sweep")
  module = root / "tiny_ablation.py"
  module.write_text(TINY_ABLATION.replace("TFDS_DIR", repr(str(root / "tfds"))))
  workdir = root / "runs"
  return module, workdir, run_sweep(str(module), str(workdir))
