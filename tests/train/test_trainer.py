"""The training loop end to end on tiny presets: metrics, checkpoints, resume, failures."""

import contextlib
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import matplotlib.colors
import matplotlib.image
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from etils import epath

from configs import gpt, llama
from tests.gcs_standin import fake_gcs
from tests.tiny_models import tiny_config
from train import trainer
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny(preset, **train):
  c = tiny_config(preset, name="tiny_shakespeare", seq_len=32, shuffle_window=16)
  c.train.update(
    dict(
      steps=8,
      batch_size=4,
      learning_rate=3e-3,
      min_learning_rate=3e-4,
      warmup_steps=0,
      schedule="constant",
      log_every=1,
      eval_every=0,
      checkpoint_every=4,
      num_samples=0,
      peak_tflops=1.0,
    )
  )
  c.train.update(train)
  return c


def curve_pixels(image, color: str):
  """[H, W] mask of the pixels drawn in matplotlib's `color` (a line or a marker)."""
  rgb = np.asarray(matplotlib.colors.to_rgb(color))
  return np.abs(image[..., :3] - rgb).sum(-1) < 0.1


def tensorboard_scalars(logdir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the event files in `logdir` (TFRecords of Event protos)."""
  from tensorboardX.proto import event_pb2

  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data, i = open(path, "rb").read(), 0
    while i < len(data):  # length (8 bytes), its CRC (4), the record, its CRC (4)
      (n,) = struct.unpack("<Q", data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 16 + n
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def losses(workdir):
  by_step = {}
  for r in read_metrics(workdir):
    if "train/loss" in r:
      by_step[r["step"]] = r["train/loss"]  # a resumed run's later line wins
  return by_step


@pytest.mark.parametrize("preset", [gpt, llama], ids=["gpt", "llama"])
def test_tiny_preset_trains_on_tfds_mock(preset, tmp_path):
  config = tiny(
    preset,
    steps=12,
    learning_rate=1e-2,
    eval_every=12,
    eval_steps=2,
    num_samples=1,
    sample_tokens=8,
  )
  config.model.scan_layers = preset is llama  # both layer layouts train and checkpoint
  with tfds.testing.mock_data(num_examples=8):
    last = trainer.run(config, str(tmp_path))
  by_step = losses(tmp_path)
  assert sorted(by_step) == list(range(1, 13))
  assert by_step[12] < by_step[1] - 0.5, by_step
  assert np.isfinite(last["eval/loss"]) and last["eval/loss"] < by_step[1]
  assert last["eval/perplexity"] == pytest.approx(np.exp(last["eval/loss"]), rel=1e-6)
  assert "eval/bits_per_byte" in last and "perf/mfu" in last and "perf/tokens_per_sec" in last
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]
  # loss.png: the figure at 100 dpi, with the train curve across the axes and the eval point
  image = matplotlib.image.imread(tmp_path / "loss.png")
  assert 300 < image.shape[0] < 450 and 500 < image.shape[1] < 700, image.shape
  train_px, eval_px = curve_pixels(image, "C0"), curve_pixels(image, "C1")
  assert np.ptp(np.nonzero(train_px)[1]) > 0.6 * image.shape[1] and 20 < eval_px.sum() < 400
  # TensorBoard has every train/loss line of metrics.jsonl
  tb_loss = tensorboard_scalars(tmp_path / "tensorboard")["train/loss"]
  assert sorted(tb_loss) == sorted(by_step)
  np.testing.assert_allclose([tb_loss[s] for s in by_step], list(by_step.values()), rtol=1e-6)


def test_resume_equals_uninterrupted(tmp_path):
  """Stopping at a checkpoint and resuming logs the same losses as one straight run."""
  with tfds.testing.mock_data(num_examples=8):
    trainer.run(tiny(gpt, steps=8), str(tmp_path / "straight"))
    trainer.run(tiny(gpt, steps=4), str(tmp_path / "resumed"))
    trainer.run(tiny(gpt, steps=8), str(tmp_path / "resumed"))
  straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(resumed) == list(range(1, 9))
  for step in range(1, 9):
    assert resumed[step] == straight[step], (step, resumed, straight)


def test_grad_accum_matches_full_batch(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    trainer.run(tiny(gpt, steps=3, checkpoint_every=0), str(tmp_path / "full"))
    trainer.run(tiny(gpt, steps=3, checkpoint_every=0, grad_accum=2), str(tmp_path / "accum"))
  full, accum = losses(tmp_path / "full"), losses(tmp_path / "accum")
  np.testing.assert_allclose([accum[s] for s in (1, 2, 3)], [full[s] for s in (1, 2, 3)], rtol=2e-5)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path):
  config = tiny(
    gpt, steps=20, learning_rate=1e12, min_learning_rate=0.0, checkpoint_every=1, grad_clip=0.0
  )
  with (
    tfds.testing.mock_data(num_examples=8),
    pytest.raises(trainer.NonFiniteLossError, match="train/loss"),
  ):
    trainer.run(config, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert saved, "the checkpoints before the failure are kept"
  bad_step = max(losses(tmp_path)) + 1 if losses(tmp_path) else 1
  assert max(saved) < bad_step


def test_checkpoint_of_another_shape_is_refused_untouched(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    trainer.run(tiny(gpt, steps=4), str(tmp_path))
    before = {
      p: os.path.getmtime(os.path.join(dp, p))
      for dp, _, fs in os.walk(tmp_path / "checkpoints")
      for p in fs
    }
    other = tiny(gpt, steps=8)
    other.model.d_model = 32
    with pytest.raises(ValueError, match="different model"):
      trainer.run(other, str(tmp_path))
  after = {
    p: os.path.getmtime(os.path.join(dp, p))
    for dp, _, fs in os.walk(tmp_path / "checkpoints")
    for p in fs
  }
  assert before == after
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_init_from_loads_params(tmp_path):
  """A run from `init_from` starts at the params the other run ended with: with a learning
  rate of 0 its evaluation is the other run's final evaluation, bit for bit."""
  with tfds.testing.mock_data(num_examples=8):
    pre = trainer.run(
      tiny(gpt, steps=4, learning_rate=1e-2, eval_every=4, eval_steps=2), str(tmp_path / "pre")
    )
    ft = trainer.run(_with_init(tmp_path), str(tmp_path / "ft"))
  assert losses(tmp_path / "ft")[1] < losses(tmp_path / "pre")[1]
  assert ft["eval/loss"] == pre["eval/loss"]


def _with_init(tmp_path):
  c = tiny(gpt, steps=1, learning_rate=0.0, min_learning_rate=0.0, eval_every=1, eval_steps=2)
  c.init_from = str(tmp_path / "pre")
  return c


def _corpus(tmp_path):
  """A small local text corpus: a few standard-library modules' source."""
  import difflib
  import json as json_module
  import textwrap

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for mod in (difflib, json_module.decoder, textwrap):
    (corpus / f"{mod.__name__}.txt").write_bytes(open(mod.__file__, "rb").read())
  return f"text:{corpus}/*.txt"


def _train_cmd(workdir, data_name, steps):
  return [
    sys.executable,
    "-m",
    "train.main",
    "--config=configs/gpt.py:size=tiny",
    f"--workdir={workdir}",
    f"--config.data.name={data_name}",
    "--config.data.seq_len=32",
    "--config.data.shuffle_window=16",
    "--config.train.batch_size=4",
    f"--config.train.steps={steps}",
    "--config.train.warmup_steps=10",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
    "--config.train.checkpoint_every=5",
    "--config.train.num_samples=0",
    "--config.train.peak_tflops=1",
  ]


def _wait_for_step(workdir, step, proc, timeout=240, poll=0.05):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if max(losses(workdir), default=0) >= step:
      return
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(poll)
  raise TimeoutError(f"step {step} not reached")


KILL_STEPS = 150
RUN = dict(cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """(corpus, workdir) of one uninterrupted command-line run, shared by the kill tests."""
  tmp_path = tmp_path_factory.mktemp("straight")
  data = _corpus(tmp_path)
  subprocess.run(_train_cmd(tmp_path / "run", data, KILL_STEPS), check=True, timeout=300, **RUN)
  return data, tmp_path / "run"


@pytest.mark.parametrize(
  "sig,where",
  [(signal.SIGKILL, "bucket"), (signal.SIGTERM, "local")],
  ids=["sigkill-bucket", "sigterm"],
)
def test_killed_run_resumes_exactly(sig, where, straight_run, tmp_path):
  """A run killed mid-training and restarted logs the same losses as an uninterrupted one.
  The SIGKILLed run's workdir is a bucket (gs://, the local GCS stand-in of
  tests/gcs_standin.py: checkpoints through TensorStore's gcs driver, the rest through
  gcsfs), compared with the local uninterrupted run."""
  (data, straight), steps, run = straight_run, KILL_STEPS, RUN
  with contextlib.ExitStack() as stack:
    killed = tmp_path / "killed"
    if where == "bucket":
      stack.enter_context(fake_gcs("fourfold-test"))
      killed = "gs://fourfold-test/killed"
    proc = subprocess.Popen(_train_cmd(killed, data, steps), **run)
    _wait_for_step(killed, 12, proc, poll=0.5 if where == "bucket" else 0.05)  # 2 CPU cores
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    first = max(losses(killed))
    assert first < steps, "the kill landed after the run had finished"
    # the newest finished step (in a bucket, a step cut short by SIGKILL keeps its folder
    # without orbax's commit_success.txt)
    saved = max(ocp.utils.checkpoint_steps(epath.Path(killed) / "checkpoints"))
    if sig == signal.SIGTERM:
      assert proc.returncode == 0, out
      assert f"SIGTERM: saved a checkpoint at step {first}" in out
      assert saved == first, "SIGTERM saves the current step, so the rerun resumes at the next one"
    else:
      assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(_train_cmd(killed, data, steps), check=True, timeout=300, **run)
    lines = (epath.Path(killed) / "metrics.jsonl").read_text().splitlines()
    first_logged = min(int(json.loads(line)["step"]) for line in lines[first:])
    assert first_logged == saved + 1, resumed.stdout
    a, b = losses(straight), losses(killed)
  assert sorted(b) == list(range(1, steps + 1))
  assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]
