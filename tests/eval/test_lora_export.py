"""LoRA runs exported (eval/lora_export.py, eval.export --merge_lora / --format=peft).

A LoRA workdir here is written directly: a base workdir of random weights and a LoRA run whose
params-only checkpoint holds random A and B (B far from zero), with init_from pointing at the
base, as a trained run's would. Checked: the merged model's logits (as a workdir, over a float
and an NF4 base, and after an HF export and import) against the unmerged LoRA model's; PEFT's
tensors rebuild the merged HF weights from the base's as W + (alpha / r) B A, for separate
projections (Llama) and the block adapters of fused ones (GPT-2's Conv1D c_attn, Phi-3's
qkv_proj and gate_up_proj); the refusals. The bases have scanned layers (the adapters are
unstacked on export), and the Llama-shaped runs share one model so that its init compiles once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from configs import workdir as workdir_preset
from eval.hf_io import export_hf, import_hf, unstack_layers
from eval.lora_export import (
  check_request,
  export_peft,
  float_shapes,
  read_config,
  write_merged_workdir,
)
from modeling import lora
from tests.tiny_models import draw_params, tiny_config
from train import families
from train.checkpoint import ParamsWriter
from train.data import make_tokenizer
from train.trainer import load_for_inference

RANK, ALPHA = 4, 16.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_workdir(config, workdir: str, params) -> str:
  """A workdir of `config` whose checkpoint holds `params` alone (as an import's does)."""
  os.makedirs(workdir)
  writer = ParamsWriter(workdir)
  writer.add(params)
  writer.finish()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return workdir


def shapes_of(config):
  model, _ = families.resolve(config).build(config, make_tokenizer(config.data.tokenizer))
  return float_shapes(config, model)


def lora_run(base_dir: str, workdir: str, targets: str, seed=1, **lora_keys) -> str:
  """A LoRA run over the workdir `base_dir`: random adapters, both A and B."""
  config = workdir_preset.get_config(base_dir)  # the base's config, init_from = base_dir
  config.model.lora.update(rank=RANK, alpha=ALPHA, targets=targets, **lora_keys)
  adapters, _ = lora.split(shapes_of(config))
  return write_workdir(config, workdir, draw_params(adapters, seed))


def random_base(tmp_path, preset: str, **model) -> str:
  config = tiny_config(preset, seq_len=32)
  config.model.update(scan_layers=True, **model)
  return write_workdir(config, str(tmp_path / "base"), draw_params(shapes_of(config)))


def export_hf_unscanned(workdir: str, output: str) -> str:
  """export_hf of a workdir with scanned layers, through a copy with one subtree per layer."""
  config = read_config(workdir)
  config.model.scan_layers = False
  params = unstack_layers(load_for_inference(workdir)[2])
  export_hf(write_workdir(config, output + ".unscanned", params), output)
  return output


def logits(workdir: str, ids: np.ndarray) -> np.ndarray:
  _, model, params, _ = load_for_inference(workdir)
  ids = jnp.asarray(ids)
  pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  forward = jax.jit(lambda p: model.apply({"params": p}, ids, pos, jnp.ones_like(ids))[0])
  return np.asarray(forward(params))


def tokens(seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(8, 264, (2, 32)).astype(np.int32)


def hf_tensors(folder) -> dict[str, np.ndarray]:
  path = os.path.join(str(folder), "model.safetensors")
  with safe_open(path, "numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}


LLAMA_TARGETS = "attn/(query|value)$|mlp/(gate|up|down)$"
TARGETS = {
  "llama": LLAMA_TARGETS,  # separate projections
  "phi3": LLAMA_TARGETS,  # fused: q and v in qkv_proj (k's rows zero), gate and up in gate_up_proj
  "gpt2": "attn/(query|value|out)$",  # Conv1D, fused c_attn; attn.c_proj adapted, mlp.c_proj not
}
EXPECTED = {  # architecture, target_modules, {fused module: adapted parts}
  "llama": ("LlamaForCausalLM", ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"], {}),
  "phi3": (
    "Phi3ForCausalLM",
    ["down_proj", "gate_up_proj", "qkv_proj"],
    {"qkv_proj": 2, "gate_up_proj": 2},
  ),
  "gpt2": (
    "GPT2LMHeadModel",
    ["c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"],
    {"c_attn": 2},
  ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """case -> {base, run, merged, summary, hf_base} (made on first use): a random base with
  scanned layers and its HF export, a LoRA run over it, and the run merged (unscanned).
  phi3 is the llama base with the tokenizer folder of a Phi-3 import (its config.json names
  the architecture, which export prefers), so the two share one compiled init."""
  made = {}

  def get(case):
    if case in made:
      return made[case]
    tmp = tmp_path_factory.mktemp(case)
    if case == "phi3":
      llama = get("llama")
      tok = str(tmp / "tokenizer")
      shutil.copytree(llama["hf_base"], tok)
      hf = json.loads(pathlib.Path(tok, "config.json").read_text())
      hf.update(architectures=["Phi3ForCausalLM"], model_type="phi3")
      pathlib.Path(tok, "config.json").write_text(json.dumps(hf))
      config = read_config(llama["base"])
      config.data.tokenizer = f"hf:{tok}"
      base = write_workdir(config, str(tmp / "base"), load_for_inference(llama["base"])[2])
    else:
      base = random_base(tmp, "gpt" if case == "gpt2" else "llama")
    run = lora_run(base, str(tmp / "lora"), TARGETS[case])
    summary = write_merged_workdir(run, str(tmp / "merged"), unscanned=True)
    hf_base = export_hf_unscanned(base, str(tmp / "hf_base"))
    made[case] = dict(
      base=base, run=run, merged=str(tmp / "merged"), summary=summary, hf_base=hf_base
    )
    return made[case]

  return get


def test_merged_model_gives_the_lora_models_logits(runs, tmp_path):
  """Merged into a workdir (scanned layers written one per layer), and that exported to HF
  and imported back: the LoRA model's logits."""
  llama = runs("llama")
  ids = tokens()
  want = logits(llama["run"], ids)
  assert np.abs(want - logits(llama["base"], ids)).max() > 0.1  # the adapters matter
  assert llama["summary"]["adapted"] == [
    f"block_{i}/{m}"
    for i in (0, 1)
    for m in ("attn/query", "attn/value", "mlp/down", "mlp/gate", "mlp/up")
  ]
  merged = json.loads(pathlib.Path(llama["merged"], "config.json").read_text())
  assert merged["model"]["lora"]["rank"] == 0 and merged["init_from"] == ""
  assert merged["model"]["scan_layers"] is False
  tolerance = 1e-5 * max(1.0, float(want.std()))
  diff = np.abs(logits(llama["merged"], ids) - want).max()
  assert diff <= tolerance, diff
  export_hf(llama["merged"], str(tmp_path / "hf"))
  import_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
  diff = np.abs(logits(str(tmp_path / "back"), ids) - want).max()
  assert diff <= tolerance, diff


def test_merged_over_an_nf4_base_gives_the_lora_models_logits(runs, tmp_path):
  """The NF4 base is dequantized (its kernels' shapes from the float model's init), then W +
  (alpha / r) A B: the LoRA model's logits, which saw the dequantized base too."""
  run = lora_run(runs("llama")["base"], str(tmp_path / "lora"), LLAMA_TARGETS, base_quant="nf4")
  summary = write_merged_workdir(run, str(tmp_path / "merged"))
  assert summary["base_quant"] == "nf4" and summary["base_bytes"] < summary["merged_bytes"]
  ids = tokens()
  want = logits(run, ids)
  diff = np.abs(logits(str(tmp_path / "merged"), ids) - want).max()
  assert diff <= 1e-5 * max(1.0, float(want.std())), diff


@pytest.mark.parametrize("case", ["llama", "phi3", "gpt2"])
def test_peft_adapters_rebuild_the_merged_weights_from_the_base(runs, case, tmp_path):
  """W + (lora_alpha / r) B A, with each module's rank_pattern / alpha_pattern and the
  fan_in_fan_out transpose, turns the base's HF weights into the merged model's."""
  made = runs(case)
  out = export_peft(made["run"], str(tmp_path / "peft"))
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  arch, targets, fused = EXPECTED[case]
  assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
  assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (RANK, ALPHA, 0.0)
  assert config["target_modules"] == targets and out["architecture"] == arch
  assert config["fan_in_fan_out"] == (case == "gpt2") and config["bias"] == "none"
  # the block form: rank k r and alpha k alpha, so alpha / r is unchanged
  assert config["rank_pattern"] == {m: k * RANK for m, k in fused.items()}
  assert config["alpha_pattern"] == {m: k * ALPHA for m, k in fused.items()}
  with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "numpy") as f:
    assert f.metadata() == {"format": "pt"}
    adapters = {k: f.get_tensor(k) for k in f.keys()}
  assert len(adapters) == out["tensors"] == 2 * out["modules"]

  export_hf(made["merged"], str(tmp_path / "hf_merged"))
  w0, w1 = hf_tensors(made["hf_base"]), hf_tensors(tmp_path / "hf_merged")
  prefix = "base_model.model."
  modules = {k[len(prefix) : -len(".lora_A.weight")] for k in adapters if ".lora_A." in k}
  assert modules <= {k.removesuffix(".weight") for k in w0}
  for name, w in w0.items():
    module = name.removesuffix(".weight")
    if module not in modules:
      np.testing.assert_array_equal(w1[name], w, err_msg=name)  # not adapted: unchanged
      continue
    a = adapters[f"{prefix}{module}.lora_A.weight"]
    b = adapters[f"{prefix}{module}.lora_B.weight"]
    short = module.rsplit(".", 1)[-1]
    r, alpha = config["rank_pattern"].get(short, RANK), config["alpha_pattern"].get(short, ALPHA)
    assert a.shape[0] == b.shape[1] == r, name
    out_in = w.T.shape if config["fan_in_fan_out"] else w.shape
    assert (b.shape[0], a.shape[1]) == out_in, name  # A [r, in], B [out, r]
    delta = alpha / r * (b.astype(np.float64) @ a)
    rebuilt = w + (delta.T if config["fan_in_fan_out"] else delta)
    assert np.abs(rebuilt - w1[name]).max() <= 1e-5, name
    assert np.abs(w1[name] - w).max() > 1e-2, name  # the adapters moved it
  if case == "phi3":  # k's block of qkv_proj: no adapter, so no change
    n_q = 16 * 4  # 16 heads of 4 (configs/llama.py size=tiny), then 8 kv heads of 4
    for i in (0, 1):
      name = f"model.layers.{i}.self_attn.qkv_proj.weight"
      np.testing.assert_array_equal(w1[name][n_q : n_q + 32], w0[name][n_q : n_q + 32])


def test_a_lora_run_is_refused_without_merge_lora_and_merge_lora_without_one(tmp_path):
  base = random_base(tmp_path, "llama")
  run = lora_run(base, str(tmp_path / "lora"), lora.Lora.targets)
  for fmt in ("hf", "packed", "gguf"):
    with pytest.raises(ValueError, match=f"LoRA run .*Pass --merge_lora .*--format={fmt}"):
      check_request(run, fmt, merge_lora=False)
  with pytest.raises(ValueError, match="--format=workdir .*pass --merge_lora"):
    check_request(base, "workdir", merge_lora=False)
  with pytest.raises(ValueError, match="--merge_lora: .* is not a LoRA run"):
    check_request(base, "hf", merge_lora=True)
  for fmt in ("packed", "gguf"):
    with pytest.raises(ValueError, match=f"--merge_lora --format={fmt}: .* not ternary"):
      check_request(run, fmt, merge_lora=True)
  with pytest.raises(ValueError, match="--format=peft writes the adapters alone"):
    check_request(run, "peft", merge_lora=True)
  check_request(run, "peft", merge_lora=False)
  check_request(run, "workdir", merge_lora=True)
  check_request(base, "hf", merge_lora=False)


def test_peft_export_refuses_a_model_no_architecture_represents(tmp_path):
  """fourfold's T5 preset scales its attention logits; HF's T5 does not."""
  config = tiny_config("t5", seq_len=32)
  base = write_workdir(config, str(tmp_path / "base"), draw_params(shapes_of(config)))
  run = lora_run(base, str(tmp_path / "lora"), lora.Lora.targets)
  with pytest.raises(ValueError, match="--format=peft: no Hugging Face .*scale_attention=True"):
    export_peft(run, str(tmp_path / "peft"))
  assert not (tmp_path / "peft").exists()


def test_merge_refuses_a_bitnet_base(tmp_path):
  """A BitNet forward pass rounds each kernel to ternary: merged adapters would be rounded."""
  base = random_base(tmp_path, "llama", quant="bitnet158")
  run = lora_run(base, str(tmp_path / "lora"), lora.Lora.targets, base_quant="ternary")
  with pytest.raises(ValueError, match="--merge_lora: model.quant='bitnet158'.*'ternary'"):
    write_merged_workdir(run, str(tmp_path / "merged"))
  assert not (tmp_path / "merged").exists()


def test_the_command_merges_and_exports(runs, tmp_path):
  """eval.export --merge_lora --format=hf: the tensors of the merged workdir's export, and
  the staging workdir beside --output removed."""
  gpt2 = runs("gpt2")
  out = tmp_path / "exports" / "hf"
  cmd = [sys.executable, "-m", "eval.export", f"--workdir={gpt2['run']}", "--merge_lora"]
  done = subprocess.run(
    [*cmd, "--format=hf", f"--output={out}"], cwd=REPO, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert (
    "merged LoRA rank 4, alpha 16.0 (scale 4) into 6 matrices: attn/out, attn/query, "
    "attn/value of block_0, block_1" in done.stdout
  )
  assert sorted(os.listdir(tmp_path / "exports")) == ["hf"]
  export_hf(gpt2["merged"], str(tmp_path / "direct"))
  want, got = hf_tensors(tmp_path / "direct"), hf_tensors(out)
  assert set(got) == set(want)
  for name, x in want.items():
    np.testing.assert_array_equal(got[name], x, err_msg=name)
