"""Sharded training on 8 simulated CPU devices equals one device; checkpoints cross
meshes; two processes on loopback equal one.

The 8-device side runs in subprocesses (`tests/sharding/runner.py`), because the
device count is fixed when JAX starts. One subprocess runs all the single-process
8-device jobs, shared by the tests of this module.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.sharding import runner
from train import trainer

RTOL = 1e-4
MESHES = {
  "data8": {"mesh.data": 8},
  "fsdp8": {},  # the default mesh: FSDP over all 8 devices (configs/base.py)
  "tensor8": {"mesh.data": 1, "mesh.tensor": 8},
  "2x2x2": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
}
# The diffusion comparison also keeps a params EMA: its eval/loss is the EMA's, sharded too.
DIFFUSION = {"model.family": "diffusion", "task.eval_t_samples": 2, "train.ema_decay": 0.5}
# T5 span corruption on the tiny Llama's shapes: 4 steps, no evaluation (compiles are the cost).
ENCDEC = {"model.family": "encdec", "model.position": "relative"}
ENCDEC_TRAIN = {"train.steps": 4, "train.eval_every": 0}
# QLoRA: adapters over an NF4 base whose code blocks split over fsdp
QLORA = {
  "model.lora.rank": 4,
  "model.lora.base_quant": "nf4",
  "model.lora.targets": "attn/(query|value)$|mlp/up$",
  "train.steps": 4,
  "train.eval_every": 0,
  "train.learning_rate": 1e-2,
}

# MoE (modeling/moe.py): layer 0 dense, layer 1 8 experts (top-2 of 2 groups, one kept, a shared
# expert), bias update and balance loss on; on expert=4 x data=2 each device holds 2 experts.
MOE = {
  "model.moe.num_experts": 8,
  "model.moe.top_k": 2,
  "model.moe.n_group": 2,
  "model.moe.topk_group": 1,
  "model.moe.num_shared_experts": 1,
  "model.moe.expert_d_ff": 32,
  "model.moe.first_dense_layers": 1,
  "model.moe.bias_update_rate": 0.01,
  "model.moe.balance_loss": 0.001,
}
EXPERT4 = {"mesh.data": 2, "mesh.expert": 4}


def launch(jobs: list[dict], devices: int, extra_env: dict | None = None) -> subprocess.Popen:
  env = {**runner.device_env(devices), **(extra_env or {})}
  return subprocess.Popen(
    [sys.executable, "-m", "tests.sharding.runner", json.dumps(jobs)],
    cwd=runner.REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def results(proc: subprocess.Popen, timeout: int = 600) -> list[dict]:
  out, _ = proc.communicate(timeout=timeout)
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, out[-4000:]
  return json.loads(lines[-1][len("RESULT ") :])


def steps(losses: dict) -> dict[int, float]:
  return {int(k): v for k, v in losses.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return runner.write_corpus(str(tmp_path_factory.mktemp("corpus") / "docs.txt"))


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
  """The one-device reference: 6 steps, checkpoints at 3 and 6, eval at the end."""
  workdir = str(tmp_path_factory.mktemp("single"))
  cfg = runner.tiny_config(
    corpus, {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 6}
  )
  last = trainer.run(cfg, workdir)
  return {"workdir": workdir, "losses": runner.losses(workdir), "last": last}


@pytest.fixture(scope="module")
def single_moe(corpus, tmp_path_factory):
  """The one-device MoE reference: 6 steps, eval at the end."""
  workdir = str(tmp_path_factory.mktemp("single_moe"))
  train = {"train.steps": 6, "train.checkpoint_every": 6, "train.eval_every": 6}
  last = trainer.run(runner.tiny_config(corpus, {**train, **MOE}), workdir)
  return {"workdir": workdir, "losses": runner.losses(workdir), "last": last}


@pytest.fixture(scope="module")
def eight(corpus, single, tmp_path_factory):
  """All single-process 8-device jobs in one subprocess (one JAX start-up)."""
  root = tmp_path_factory.mktemp("eight")
  # The 1-device checkpoint at step 3, to be resumed on data=8.
  from_single = root / "from_single"
  shutil.copytree(single["workdir"], from_single)
  shutil.rmtree(from_single / "checkpoints" / "6")
  os.remove(from_single / "metrics.jsonl")
  train = {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 6}
  jobs = [
    {"kind": "train", "corpus": corpus, "workdir": str(root / name), "overrides": {**mesh, **train}}
    for name, mesh in MESHES.items()
  ]
  jobs.append(
    {
      "kind": "train",
      "corpus": corpus,
      "workdir": str(from_single),
      "overrides": {**MESHES["data8"], **train},
    }
  )
  jobs.append({"kind": "memory", "corpus": corpus, "overrides": MESHES["fsdp8"]})
  jobs.append(
    {
      "kind": "train",
      "corpus": corpus,
      "workdir": str(root / "diffusion_2x2x2"),
      "overrides": {**MESHES["2x2x2"], **train, **DIFFUSION},
    }
  )
  jobs.append(
    {
      "kind": "train",
      "corpus": corpus,
      "workdir": str(root / "encdec_2x2x2"),
      "overrides": {**MESHES["2x2x2"], **ENCDEC_TRAIN, **ENCDEC},
    }
  )
  jobs.append(
    {
      "kind": "train",
      "corpus": corpus,
      "workdir": str(root / "qlora_fsdp8"),
      "overrides": {**MESHES["fsdp8"], **QLORA},
    }
  )
  moe = {**EXPERT4, **train, **MOE}
  jobs += [
    {"kind": "train", "corpus": corpus, "workdir": str(root / "moe_e4d2"), "overrides": moe},
    {"kind": "specs", "corpus": corpus, "overrides": moe},
    {"kind": "moe_dispatch", "mesh": [2, 4, 1, 1], "cf": 1.0},
    {"kind": "moe_dispatch", "mesh": [1, 2, 2, 2], "cf": 0.75},
  ]
  out = results(launch(jobs, devices=8))
  names = [*MESHES, "from_single", "memory", "diffusion_2x2x2", "encdec_2x2x2", "qlora_fsdp8"]
  names += ["moe_e4d2", "moe_specs", "dispatch_e4d2", "dispatch_e2f2t2"]
  return {"root": root, **dict(zip(names, out, strict=True))}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_losses_equal_single_device(mesh, single, eight):
  ref, got = steps(single["losses"]), steps(eight[mesh]["losses"])
  assert sorted(got) == sorted(ref) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  assert ref[6] < ref[1]  # it trains: equality of a constant would prove nothing
  np.testing.assert_allclose(
    eight[mesh]["last"]["eval/loss"], single["last"]["eval/loss"], rtol=RTOL
  )


def test_sharded_diffusion_equals_single_device(corpus, eight, tmp_path):
  """The diffusion objective's times and masks (drawn in the step, antithetic across the
  global batch) are the same on a 2x2x2 mesh as on one device; so is the params EMA that
  the evaluation uses."""
  cfg = runner.tiny_config(corpus, {"train.steps": 6, "train.eval_every": 6, **DIFFUSION})
  last = trainer.run(cfg, str(tmp_path))
  ref, got = steps(runner.losses(str(tmp_path))), steps(eight["diffusion_2x2x2"]["losses"])
  assert sorted(got) == sorted(ref) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  assert ref[6] < ref[1]
  got_last = eight["diffusion_2x2x2"]["last"]
  np.testing.assert_allclose(got_last["eval/loss"], last["eval/loss"], rtol=RTOL)
  assert "eval/loss_draw_std" in got_last


def test_sharded_encdec_equals_single_device(corpus, eight, tmp_path):
  """The encoder-decoder (cross-attention, relative position buckets, span-corrupted rows
  from the pipeline) on a 2x2x2 mesh logs the losses of one device."""
  trainer.run(runner.tiny_config(corpus, {**ENCDEC_TRAIN, **ENCDEC}), str(tmp_path))
  ref, got = steps(runner.losses(str(tmp_path))), steps(eight["encdec_2x2x2"]["losses"])
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  assert ref[4] < ref[1]
  # The loss is over the targets: 16 rows of the 8 target tokens 32 encoder tokens give.
  assert eight["encdec_2x2x2"]["last"]["train/tokens"] == 16 * 8


def test_sharded_qlora_equals_single_device(corpus, eight, tmp_path):
  """LoRA over an NF4 base with the code blocks split over fsdp=8 logs the losses of one
  device."""
  trainer.run(runner.tiny_config(corpus, QLORA), str(tmp_path))
  ref, got = steps(runner.losses(str(tmp_path))), steps(eight["qlora_fsdp8"]["losses"])
  assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  assert ref[4] < ref[1]


def test_moe_on_expert4_data2_equals_single_device(single_moe, eight):
  """MoE with the experts split over expert=4 (data-parallel elsewhere) logs the losses of one
  device, with the balancing bias moving every step."""
  ref, got = steps(single_moe["losses"]), steps(eight["moe_e4d2"]["losses"])
  assert sorted(got) == sorted(ref) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  assert ref[6] < ref[1]
  last, got_last = single_moe["last"], eight["moe_e4d2"]["last"]
  for key in ("eval/loss", "train/moe/bias_max", "train/moe/load_max_over_mean_0"):
    np.testing.assert_allclose(got_last[key], last[key], rtol=RTOL)
  assert last["train/moe/bias_max"] > 0  # the bias moved
  # the routed experts' weights carry `expert` on their first axis, the rest do not
  specs = eight["moe_specs"]
  experts = [k for k in specs if "expert_gate" in k or "expert_up" in k or "expert_down" in k]
  assert len(experts) == 3
  assert all(specs[k][0] == "expert" for k in experts), specs
  assert not any("expert" in str(v) for k, v in specs.items() if k not in experts), specs


@pytest.mark.parametrize("name", ["dispatch_e4d2", "dispatch_e2f2t2"])
def test_expert_parallel_dispatch(name, eight):
  """The all-to-all dispatch (modeling/moe.py `expert_parallel`) on expert=4 x data=2 and on
  expert=2 x fsdp=2 x tensor=2: dropless, outputs and gradients equal one device's ragged path;
  with a capacity, it drops exactly each device's overflow to each expert shard."""
  got = eight[name]
  dropless, capped = got["dropless"], got["capacity"]
  assert dropless["all_to_all"] >= 3 and capped["all_to_all"] >= 3  # rows, ids, results
  assert dropless["max_diff"] <= 1e-5 * dropless["max_ref"], dropless
  assert dropless["grad_diff"] <= 1e-7, dropless
  assert dropless["dropped"] == 0
  assert capped["expected_dropped"] > 0
  assert capped["dropped"] == capped["expected_dropped"], capped


def test_fsdp_holds_an_eighth_per_device(eight):
  mem = eight["memory"]
  assert mem["devices"] == 8
  # Every matrix splits over fsdp; only norm scales (a few hundred floats) are replicated.
  assert max(mem["per_device"]) <= mem["total"] / 8 * 1.02, mem
  assert sum(mem["per_device"]) < mem["total"] * 1.1, mem


def test_checkpoint_from_2x2x2_resumes_on_one_device(corpus, eight, tmp_path):
  """Saved sharded on a 2x2x2 mesh at step 3; steps 4-6 on one device match the 8-device run."""
  workdir = tmp_path / "resumed"
  shutil.copytree(eight["root"] / "2x2x2", workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")
  os.remove(workdir / "metrics.jsonl")
  cfg = runner.tiny_config(
    corpus, {"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 6}
  )
  trainer.run(cfg, str(workdir))
  resumed, full = runner.losses(str(workdir)), steps(eight["2x2x2"]["losses"])
  assert sorted(resumed) == [4, 5, 6]
  # Params alone (eval.sample, init_from) also load across meshes: the 2x2x2 run's step 6
  # on this one device equals the resumed run's step 6.
  _, _, sharded_params, _ = trainer.load_for_inference(str(eight["root"] / "2x2x2"))
  _, _, resumed_params, _ = trainer.load_for_inference(str(workdir))
  for a, b in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(resumed_params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(
    [resumed[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)], rtol=RTOL
  )


def test_checkpoint_from_one_device_resumes_on_data8(single, eight):
  resumed, full = steps(eight["from_single"]["losses"]), steps(single["losses"])
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose(
    [resumed[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)], rtol=RTOL
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two(corpus: str, workdir: str, steps: int, **train) -> list[subprocess.Popen]:
  """Two processes x 4 simulated devices, joined over loopback, data=8."""
  port = free_port()
  procs = []
  for pid in range(2):
    overrides = {
      **MESHES["data8"],
      "train.steps": steps,
      **{f"train.{k}": v for k, v in train.items()},
      "distributed.coordinator_address": f"127.0.0.1:{port}",
      "distributed.num_processes": 2,
      "distributed.process_id": pid,
    }
    job = {"kind": "train", "corpus": corpus, "workdir": workdir, "overrides": overrides}
    procs.append(launch([job], devices=4))
  return procs


def test_two_processes_equal_one(corpus, eight, tmp_path):
  """Two processes x 4 devices on loopback (data=8) log the losses of one process x 8,
  save one checkpoint together, and resume from it."""
  workdir = str(tmp_path / "two")
  outs = [results(p) for p in launch_two(corpus, workdir, 6, checkpoint_every=3, eval_every=6)]
  got, ref = steps(outs[0][0]["losses"]), steps(eight["data8"]["losses"])
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in ref], list(ref.values()), rtol=RTOL)
  np.testing.assert_allclose(
    outs[0][0]["last"]["eval/loss"], eight["data8"]["last"]["eval/loss"], rtol=RTOL
  )
  # Checkpoints hold both processes' data-iterator states; metrics come from process 0 only.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  data_dir = os.path.join(workdir, "checkpoints", "6", "data")
  data_files = sorted(f for f in os.listdir(data_dir) if f.startswith("process_"))
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len([line for line in f if '"train/loss"' in line]) == 6
  # Resume both processes from step 3: steps 4-6 repeat exactly.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  outs = [results(p) for p in launch_two(corpus, workdir, 6, checkpoint_every=3)]
  resumed = runner.losses(workdir)
  assert sorted(resumed) == [4, 5, 6]
  np.testing.assert_allclose(
    [resumed[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)], rtol=RTOL
  )


def test_sigterm_stops_both_processes_at_one_step(corpus, tmp_path):
  """A preemption notice to every process: they agree on a step, save it, and exit 0."""
  workdir = tmp_path / "preempted"
  procs = launch_two(corpus, str(workdir), 2000, checkpoint_every=1000)
  deadline = time.time() + 300
  while (
    not (workdir / "metrics.jsonl").exists() or (workdir / "metrics.jsonl").stat().st_size < 2000
  ):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.5)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  saved = os.listdir(workdir / "checkpoints")
  assert len(saved) == 1 and 0 < int(saved[0]) < 2000, saved
  assert f"SIGTERM: saved a checkpoint at step {saved[0]}" in outs[0]
  assert "SIGTERM: saved" not in outs[1]  # only process 0 prints
  data_files = sorted(os.listdir(workdir / "checkpoints" / saved[0] / "data"))
  assert "process_0-of-2.json" in data_files and "process_1-of-2.json" in data_files
