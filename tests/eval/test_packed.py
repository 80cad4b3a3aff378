"""Packed BitNet checkpoints (eval/packed.py, eval/export.py, eval.sample --packed): the
packed model's forward pass is the training-mode quantized one bit for bit, the files are
as small as promised, and the CLIs and their errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval.packed import is_quantized, load_packed, pack_params, unpack_params, write_packed
from modeling.transformer import Transformer
from tests.tiny_models import random_params, tiny
from train.trainer import load_for_inference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKINGS = [("bitnet158", False), ("bitnet158", True), ("bitnet1", False)]  # kind, base3


@functools.cache
def forward(cfg):
  """Jitted logits of a fixed batch (two rows, the second two packed documents)."""
  tok = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  seg = jnp.array([[1] * 12, [1] * 5 + [2] * 7])
  pos = jnp.array([list(range(12)), list(range(5)) + list(range(7))])
  return jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tok, pos, seg)[0])


def flat(tree):
  return flax.traverse_util.flatten_dict(tree)


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "scanned"])
@pytest.mark.parametrize("kind", ["bitnet158", "bitnet1"])
def test_unpacked_model_equals_training_forward_exactly(kind, scan):
  cfg = tiny("llama", quant=kind, scan_layers=scan)
  params = random_params(cfg)
  if scan:  # layers of very different magnitudes: one scale for the stack would not do
    params = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[1].multiply(3.0) if path[0].key == "blocks" else x, params
    )
  expected = np.asarray(forward(cfg)(params))
  deployed = forward(dataclasses.replace(cfg, quant_deployed=True))
  for base3 in [b for k, b in PACKINGS if k == kind]:
    arrays = pack_params(params, kind, scan, base3)
    quantized = [k for k in flat(params) if is_quantized(k)]
    assert len(quantized) == (7 if scan else 14)  # q, k, v, out, up, gate, down per layer
    for path in quantized:
      name = "/".join(path)
      assert name not in arrays
      w = np.asarray(flat(params)[path])
      codes, scale = arrays[f"{name}::codes"], arrays[f"{name}::scale"]
      layers = w.shape[0] if scan else 1
      per_layer = w.size // layers
      per_byte = 8 if kind == "bitnet1" else 5 if base3 else 4
      assert codes.dtype == np.uint8 and codes.shape == (layers, math.ceil(per_layer / per_byte))
      assert scale.dtype == np.float32 and scale.shape == (layers,)
      np.testing.assert_array_equal(arrays[f"{name}::shape"], w.shape)
      slices = w.reshape(layers, -1)
      np.testing.assert_allclose(scale, np.abs(slices).mean(axis=1), rtol=1e-5)  # per layer
    unpacked = unpack_params(arrays, kind, base3)
    assert jax.tree.structure(unpacked) == jax.tree.structure(params)
    for path, value in flat(params).items():
      if not is_quantized(path):
        np.testing.assert_array_equal(flat(unpacked)[path], value)
    np.testing.assert_array_equal(np.asarray(deployed(unpacked)), expected)


# ---- a trained tiny bitnet158 run (tests/conftest.py:sweep_run) ---------------------------


@pytest.fixture(scope="module")
def workdir(sweep_run):
  _, sweep_workdir, proc = sweep_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(sweep_workdir / "quant=bitnet158")


@pytest.mark.parametrize("base3, max_bits", [(False, 2.1), (True, 1.7)], ids=["2bit", "base3"])
def test_write_packed_sizes_and_load_packed_round_trip(workdir, tmp_path, base3, max_bits):
  out = str(tmp_path / "model.npz")
  sizes = write_packed(workdir, out, base3)
  config, model, params, _ = load_for_inference(workdir)
  quantized = {k: v for k, v in flat(params).items() if is_quantized(k)}
  assert sizes["quantized_weights"] == sum(v.size for v in quantized.values())
  assert sizes["all_weights"] == sum(x.size for x in jax.tree.leaves(params))
  assert 8 * sizes["quantized_packed_bytes"] / sizes["quantized_weights"] <= max_bits
  assert sizes["file_bytes"] == os.path.getsize(out) < sizes["all_float32_bytes"]
  assert sizes["quantized_float32_bytes"] == 4 * sizes["quantized_weights"]
  with np.load(out) as f:  # the codes and scales, as written
    written = sum(f[k].nbytes for k in f.files if k.endswith(("::codes", "::scale")))
  assert sizes["quantized_packed_bytes"] == written

  p_config, p_model, p_params, tokenizer = load_packed(out)
  assert p_model.cfg == dataclasses.replace(model.cfg, quant_deployed=True)
  for section in ("model", "data", "task", "train"):
    assert p_config[section].to_dict() == config[section].to_dict()
  assert tokenizer.vocab_size <= model.cfg.vocab_size
  for path, value in flat(params).items():
    if not is_quantized(path):
      np.testing.assert_array_equal(flat(p_params)[path], value)
  np.testing.assert_array_equal(
    np.asarray(forward(p_model.cfg)(p_params)), np.asarray(forward(model.cfg)(params))
  )


def test_bitnet1_packs_at_one_bit_and_refuses_base3(workdir, tmp_path):
  """A bitnet1 run has the same parameter tree as a bitnet158 one: the trained run with
  model.quant=bitnet1 in its config stands for one."""
  binary = tmp_path / "bitnet1"
  shutil.copytree(workdir, binary)
  saved = json.loads((binary / "config.json").read_text())
  saved["model"]["quant"] = "bitnet1"
  (binary / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match="--base3 packs ternary weights; this run is bitnet1"):
    write_packed(str(binary), str(tmp_path / "x.npz"), base3=True)
  assert not (tmp_path / "x.npz").exists()
  sizes = write_packed(str(binary), str(tmp_path / "b.npz"))
  assert 8 * sizes["quantized_packed_bytes"] / sizes["quantized_weights"] <= 1.1
  _, model, params, _ = load_packed(str(tmp_path / "b.npz"))
  assert model.cfg.quant == "bitnet1" and model.cfg.quant_deployed
  for path, value in flat(params).items():  # binary kernels: +-scale only
    if is_quantized(path):
      assert np.unique(np.abs(np.asarray(value))).size == 1, path


def test_packing_a_full_precision_run_is_refused(sweep_run, tmp_path):
  _, sweep_workdir, _ = sweep_run
  fp = str(sweep_workdir / "quant=none")  # the sweep's full-precision run
  with pytest.raises(ValueError, match=r"model\.quant='none'; --format=packed needs a bitnet158"):
    write_packed(fp, str(tmp_path / "x.npz"))
  assert not (tmp_path / "x.npz").exists()


def test_load_packed_refuses_other_files(tmp_path):
  np.savez(tmp_path / "weights.npz", kernel=np.zeros((2, 2), np.float32))
  with pytest.raises(ValueError, match=r"not a fourfold packed file \(no config\)"):
    load_packed(str(tmp_path / "weights.npz"))
  with pytest.raises(ValueError, match="no such file"):
    load_packed(str(tmp_path / "missing.npz"))


# ---- the command lines --------------------------------------------------------------------


def python_m(module, *flags):
  cmd = [sys.executable, "-m", module, *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "model.packed.npz")
  return out, python_m("eval.export", f"--workdir={workdir}", "--format=packed", f"--output={out}")


def test_export_cli_prints_its_sizes(exported):
  out, r = exported
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0].startswith(f"wrote {out}: ") and lines[0].endswith(" MiB")
  bits = float(re.search(r"\(([\d.]+) bits per weight, scales included\)", lines[1]).group(1))
  assert lines[1].startswith("quantized weights: 98,304 of ") and 2.0 <= bits <= 2.1
  assert "vs float32 " in lines[1] and " and bfloat16 " in lines[1]
  assert lines[2].startswith("whole model: file ") and "all weights in float32" in lines[2]
  assert os.path.exists(out)


def sample_text(r):
  assert r.returncode == 0, r.stderr[-3000:]
  header, text = r.stdout.split("---- sample 1/1 ", 1)[1].split("\n", 1)
  return text


def test_sample_from_packed_equals_sample_from_workdir(workdir, exported):
  out, _ = exported
  flags = ["--prompt=abc", "--num_tokens=16", "--temperature=0"]
  packed = sample_text(python_m("eval.sample", f"--packed={out}", *flags))
  trained = sample_text(python_m("eval.sample", f"--workdir={workdir}", *flags))
  assert packed.startswith("abc") and len(packed) > len("abc")
  assert packed == trained


@pytest.mark.parametrize("both", [True, False], ids=["both", "neither"])
def test_sample_needs_exactly_one_of_workdir_and_packed(workdir, exported, both):
  flags = [f"--workdir={workdir}", f"--packed={exported[0]}"] if both else []
  r = python_m("eval.sample", "--prompt=abc", *flags)
  assert r.returncode != 0 and "---- sample" not in r.stdout
  assert "give one of --workdir or --packed" in r.stderr
