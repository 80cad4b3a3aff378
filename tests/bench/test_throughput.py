"""bench.throughput: its FLOP count and its last line, on the tiny preset."""

import glob
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bench.throughput import benchmark, variant_of
from configs import gpt
from modeling.flops import flops_per_token, matmul_params
from train import families
from train.profiling import traced_steps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flops_per_token_is_6n_plus_attention():
  c = gpt.get_config("size=S")
  cfg = families.resolve(c).transformer_config(c, 264)
  n = 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 264  # per-layer attention + MLP, then the head
  assert matmul_params(cfg) == n
  assert flops_per_token(cfg, 256) == 6 * n + 12 * 6 * 384 * 256


def test_benchmark_reports_consistent_figures():
  c = gpt.get_config("size=tiny")
  c.data.seq_len, c.train.batch_size = 32, 4
  r = benchmark(c, steps=2, warmup=0, peak_n=256)
  flops = flops_per_token(families.resolve(c).transformer_config(c, 264), 32)
  assert np.isclose(r["model_gflops_per_step"], flops * 4 * 32 / 1e9)
  assert np.isclose(r["tokens_per_sec"], 4 * 32 / r["step_s"])
  assert np.isclose(r["mfu"], r["tokens_per_sec"] * flops / (r["peak_gflops"] * 1e9))
  assert 0 < r["mfu"] < 1.5 and r["params"] > 100_000
  # three steps at the start of the warmup on random ordinary tokens: a uniform guess's loss
  vocab = families.resolve(c).transformer_config(c, 264).vocab_size
  assert r["loss"] == pytest.approx(math.log(vocab), abs=0.05), r["loss"]


def test_cli_last_line(tmp_path):
  """Its last line; with --profile, a trace of the timed steps (bench and trainer share
  train/profiling.py, tested on a trainer run in tests/train/test_faults.py)."""
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "bench.throughput",
      "--config=configs/gpt.py:size=tiny",
      "--config.data.seq_len=32",
      "--config.train.batch_size=4",
      "--steps=2",
      "--peak_n=256",
      f"--profile={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  last = out.strip().splitlines()[-1]
  m = re.fullmatch(r"tokens_per_sec=(\d+) mfu=([\d.]+) peak_gflops=([\d.]+)", last)
  assert m and float(m.group(1)) > 0 and float(m.group(3)) > 0, last
  (trace,) = glob.glob(str(tmp_path / "plugins/profile/*/*.xplane.pb"))
  assert sorted(traced_steps(trace)) == [1, 2]


def test_encdec_flops_match_xla_and_the_benchmark_batch():
  """T5's FLOPs per source token (decoder on the span-corruption targets) agree with XLA's
  count of the compiled train step, and bench.throughput times an encoder-decoder batch."""
  import jax

  from configs import t5
  from launch.aot import _lower

  c = t5.get_config("size=S")
  c.data.seq_len, c.train.batch_size = 128, 4
  lowered, _, model = _lower(c, jax.devices()[:1])
  xla = lowered.cost_analysis()["flops"]  # XLA's count before optimization: 0.2% off, no compile
  target = families.resolve(c).target_len(c)
  assert target == 29 and families.resolve(c).batch_lengths(c)["targets"] == 29
  formula = flops_per_token(model.cfg, 128, target) * 4 * 128
  assert abs(formula / xla - 1) < 0.05, (formula, xla)
  # the same formula with as many targets as sources would overcount by far
  assert flops_per_token(model.cfg, 128) > 1.4 * flops_per_token(model.cfg, 128, target)
  tiny = t5.get_config("size=tiny")
  tiny.data.seq_len, tiny.train.batch_size = 32, 4
  r = benchmark(tiny, steps=2, warmup=0, peak_n=256)
  assert (
    families.resolve(tiny).target_len(tiny) == 8
  )  # 32 inputs <- 34-token chunks: 5 noise tokens in 2 spans, + EOS
  flops = flops_per_token(families.resolve(tiny).transformer_config(tiny, 264), 32, 8)
  assert np.isclose(r["model_gflops_per_step"], flops * 4 * 32 / 1e9)
  vocab = families.resolve(tiny).transformer_config(tiny, 264).vocab_size  # + 100 sentinels
  assert r["loss"] == pytest.approx(math.log(vocab), abs=0.1), r["loss"]


def test_compare_variant_keeps_derived_keys_following():
  """--compare=model.d_model=96 on gpt tiny gives d_ff 4 x 96; the config itself is untouched."""
  c = gpt.get_config("size=tiny")
  v = variant_of(c, ["model.d_model=96", "model.scan_layers=true"])
  assert (v.model.d_model, v.model.d_ff, v.model.scan_layers) == (96, 384, True)
  assert (c.model.d_model, c.model.d_ff, c.model.scan_layers) == (64, 256, False)
