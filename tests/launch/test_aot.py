"""`python -m launch.aot`: TPU programs compiled ahead of time on this CPU (libtpu)."""

import importlib.util
import subprocess
import sys

import pytest

from configs import llama
from launch import aot
from tests.sharding.runner import REPO

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[aot]'"
)


def tiny(**mesh):
  c = llama.get_config("size=tiny")
  c.train.batch_size = 16
  c.mesh.update(mesh)
  return c


def test_layer_by_layer_flops_equal_an_unscanned_compile():
  """XLA counts a scanned layer once; the 1-and-2-layer difference recovers every layer."""
  devices = aot.topology_devices("v5e:2x2")
  c = tiny(data=2, fsdp=2)
  c.model.num_layers, c.model.scan_layers = 3, True
  estimate = aot.xla_flops(c, devices)  # compiles 1 and 2 unscanned layers
  c.model.scan_layers = False
  compiled_unscanned, _, _ = aot._compile(c, devices)
  assert estimate == pytest.approx(compiled_unscanned.cost_analysis()["flops"], rel=1e-3)


def test_cli_reports_memory_flops_and_ends_with_hbm_line():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.aot",
      "--config=configs/llama.py:size=tiny",
      "--topology=v5e:2x4",
      "--config.mesh.data=2",
      "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith(
    "TPU v5 lite x 8, mesh {'data': 2, 'expert': 1, 'fsdp': 2, 'tensor': 2}"
  )
  assert "of 16 GiB HBM: fits" in lines[1]
  assert lines[2].startswith("XLA FLOPs per step:")
  assert lines[-1].startswith("hbm_per_chip_gib=") and 0 < float(lines[-1].split("=")[1]) < 1


def test_fsdp_shrinks_the_state_per_chip():
  devices = aot.topology_devices("v5e:2x4")
  replicated = aot.compile_train_step(tiny(data=8), devices, flops=False)
  sharded = aot.compile_train_step(tiny(data=1, fsdp=8), devices, flops=False)
  # TPU layouts pad small dimensions to (8, 128) tiles, so a tiny model's compiled
  # buffers shrink by less than the 8x its logical shards do.
  assert sharded["state_bytes"] < replicated["state_bytes"] / 3
  assert sharded["logical_state_bytes"] < replicated["logical_state_bytes"] / 7.5
  assert replicated["fits"] and sharded["fits"]


def test_single_chip_topology():
  assert len(aot.topology_devices("v5e:1x1")) == 1
  assert len(aot.topology_devices("v5e:2x4")) == 8


def test_program_too_big_for_the_chip_is_reported_not_raised():
  c = llama.get_config("size=M")
  c.train.batch_size, c.data.seq_len = 64, 1024
  r = aot.compile_train_step(c, aot.topology_devices("v5e:1x1"), flops=False)
  assert r["fits"] is False and r["hbm_bytes"] > 16 * aot.GIB
  assert "DOES NOT FIT" in aot.report(r)


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match=r"--topology='v5e:3x7'"):
    aot.topology_devices("v5e:3x7")
