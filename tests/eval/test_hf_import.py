"""Hugging Face checkpoints in and out, against transformers' own outputs.

The fixtures (tests/fixtures/hf, made by its make_fixtures.py with transformers 5.25) are
tiny random checkpoints of each architecture, with transformers' logits for a prompt of
256-300 tokens and its greedy generation of 32 tokens. Logits have a standard deviation near
1, so a wrong RoPE pairing or GELU moves them far past the tolerance (the negative controls).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from eval.hf_io import export_hf, import_hf
from modeling import decoding, rope
from train.trainer import load_for_inference

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "hf"
NAMES = (
  "gpt2",
  "llama2",
  "llama3",
  "phi3",
  "bert",
  "bert_model",
  "roberta",
  "t5",
  "t5_v1_1",
  "bloom",
  "deberta_v2",
  "deepseek_v3",
  "deepseek_v3_lite",
)


def forward(model, params, ref) -> np.ndarray:
  """The output transformers recorded: logits, or BertModel's pooler output (one compiled
  program: faster than the op-by-op call for the larger models)."""
  ids = jnp.asarray(ref["input_ids"])
  pos, seg = jnp.arange(ids.shape[1])[None], jnp.ones_like(ids)
  kw = {}
  if "decoder_input_ids" in ref:
    dec = jnp.asarray(ref["decoder_input_ids"])
    kw = dict(
      targets_in_BL=dec,
      targets_positions_BL=jnp.arange(dec.shape[1])[None],
      targets_segment_ids_BL=jnp.ones_like(dec),
    )
  apply = jax.jit(lambda p, kw: model.apply({"params": p}, ids, pos, seg, **kw)[0])
  return np.asarray(apply(params, kw))


def reference(ref) -> np.ndarray:
  return ref["pooled"] if "pooled" in ref else ref["logits"]


def tolerance(ref) -> float:
  return 1e-4 * max(1.0, float(reference(ref).std()))


def greedy(model, params, tokenizer, prompt_1P: np.ndarray, encdec: bool) -> np.ndarray:
  rng = jax.random.PRNGKey(0)
  if encdec:
    out = decoding.seq2seq_generate(
      model, params, prompt_1P, 32, rng, temperature=0.0, specials=tokenizer.specials
    )
  else:
    stop = tokenizer.specials.stop_ids
    out = decoding.generate(model, params, prompt_1P, 32, rng, temperature=0.0, eos_id=stop)
  return np.asarray(out)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """name -> an imported workdir (imported on first use)."""
  made = {}

  def get(name):
    if name not in made:
      made[name] = str(tmp_path_factory.mktemp(name) / "wd")
      import_hf(str(FIXTURES / name), made[name])
    return made[name]

  return get


@pytest.mark.parametrize("name", NAMES)
def test_import_matches_transformers_and_exports_the_same_tensors(name, workdirs, tmp_path):
  ref = np.load(FIXTURES / name / "reference.npz")
  config, model, params, tokenizer = load_for_inference(workdirs(name))
  diff = np.abs(forward(model, params, ref) - reference(ref)).max()
  assert diff <= tolerance(ref), f"{name}: max |logit difference| {diff:.3g}"
  encdec = config.model.family == "encdec"
  for prompt, want in (("prompt_ids", "generated"), ("prompt_cross_ids", "generated_cross")):
    if prompt in ref:  # greedy continuations, as transformers' generate(do_sample=False)
      got = greedy(model, params, tokenizer, ref[prompt], encdec)
      np.testing.assert_array_equal(got, ref[want], err_msg=f"{name}: {want}")

  out = tmp_path / "hf"
  export_hf(workdirs(name), str(out))
  with safe_open(str(FIXTURES / name / "model.safetensors"), "numpy") as f:
    source = {k: f.get_tensor(k) for k in f.keys()}
  with safe_open(str(out / "model.safetensors"), "numpy") as f:
    assert f.metadata() == {"format": "pt"}
    exported = {k: f.get_tensor(k) for k in f.keys()}
  assert set(exported) <= set(source), sorted(set(exported) - set(source))
  for key, x in exported.items():
    np.testing.assert_array_equal(x, source[key], err_msg=key)
  written = json.loads((out / "config.json").read_text())
  original = json.loads((FIXTURES / name / "config.json").read_text())
  assert "tie_word_embeddings" in written
  for key in ("architectures", "vocab_size", "tie_word_embeddings", "eos_token_id"):
    if key in original:
      assert written[key] == original[key], key


def interleaved_rope(x_BLHK, pos_BL, inv_F=10000.0, scale=1.0):
  """The wrong pairing: features (2i, 2i+1) instead of HF's rotate-half (i, i + F)."""
  half = inv_F.shape[0]
  angle_BL1F = (pos_BL.astype(jnp.float32)[:, :, None] * inv_F)[:, :, None, :]
  sin, cos = jnp.sin(angle_BL1F) * scale, jnp.cos(angle_BL1F) * scale
  x = x_BLHK.astype(jnp.float32)
  x1, x2, rest = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2], x[..., 2 * half :]
  y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
  rotated = jnp.stack([y1, y2], axis=-1).reshape(*x.shape[:-1], 2 * half)
  return jnp.concatenate([rotated, rest], axis=-1)


def test_negative_controls_exceed_the_tolerance(workdirs, monkeypatch):
  """Each mutation that breaks an architecture detail fails the parity check."""
  import dataclasses

  cases = {
    "llama3": lambda m: m,  # with the interleaved RoPE patched in below
    "bert": lambda m: m.clone(cfg=dataclasses.replace(m.cfg, gelu="tanh")),
    "t5_v1_1": lambda m: m.clone(cfg=dataclasses.replace(m.cfg, tie_embeddings=True)),
  }
  for name, mutate in cases.items():
    ref = np.load(FIXTURES / name / "reference.npz")
    _, model, params, _ = load_for_inference(workdirs(name))
    with monkeypatch.context() as patch:
      if name == "llama3":
        patch.setattr(rope, "apply_rope", interleaved_rope)
      diff = np.abs(forward(mutate(model), params, ref) - reference(ref)).max()
    assert diff > 10 * tolerance(ref), f"{name}: the mutation moved logits only {diff:.3g}"


def test_fine_tuning_an_import_starts_from_it_and_resumes_exactly(workdirs, tmp_path, capsys):
  """configs/workdir.py:<import> trains from the imported weights (every array loaded, none
  fresh) with the imported tokenizer, and a resumed run logs the losses of a straight one."""
  import tensorflow_datasets as tfds

  from configs import workdir as workdir_preset
  from tests.tiny_models import short_run
  from train import trainer
  from train.metrics import read_metrics

  def config(steps):
    c = workdir_preset.get_config(workdirs("llama3"))
    c.data.update(name="tiny_shakespeare", seq_len=32, shuffle_window=16)
    return short_run(c, steps, batch_size=4, eval_every=0, checkpoint_every=1)

  with tfds.testing.mock_data(num_examples=8):
    trainer.run(config(2), str(tmp_path / "straight"))
    assert "new, initialized fresh: none" in capsys.readouterr().out
    trainer.run(config(1), str(tmp_path / "resumed"))
    trainer.run(config(2), str(tmp_path / "resumed"))
    with pytest.raises(ValueError, match="holds weights only"):  # an import is not resumed
      trainer.run(config(2), workdirs("llama3"))

  def losses(d):
    return {r["step"]: r["train/loss"] for r in read_metrics(str(d)) if "train/loss" in r}

  straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(straight) == [1, 2] and resumed == straight


def _edited_gpt2(tmp_path, config=None, tensors=None):
  """A copy of the gpt2 fixture with config.json fields and tensors changed (None: drop)."""
  import shutil

  from safetensors.numpy import save_file

  src = tmp_path / "src"
  shutil.copytree(FIXTURES / "gpt2", src)
  hf = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**hf, **(config or {})}))
  if tensors:
    with safe_open(str(src / "model.safetensors"), "numpy") as f:
      all_ = {k: f.get_tensor(k) for k in f.keys()}
    all_.update(tensors)
    save_file({k: v for k, v in all_.items() if v is not None}, str(src / "model.safetensors"))
  return src


@pytest.mark.parametrize(
  "config,tensors,message",
  [
    ({"architectures": ["MambaForCausalLM"]}, None, "imports .*GPT2LMHeadModel.*LlamaForCausalLM"),
    ({"activation_function": "gelu_fast"}, None, "activation_function='gelu_fast'"),
    (None, {"transformer.h.1.ln_2.bias": None}, r"lacks 1 tensors.*h\.1\.ln_2\.bias"),
    (None, {"transformer.h.0.adapter.weight": np.zeros(3, np.float32)}, "h.0.adapter.weight"),
    (
      None,
      {"transformer.h.0.mlp.c_fc.weight": np.zeros((64, 100), np.float32)},
      r"c_fc\.weight.*\(64, 100\).*\(64, 128\)",
    ),
    ({"vocab_size": 300}, None, "384 ids but the embedding only 300 rows"),
  ],
)
def test_bad_checkpoints_are_refused_and_nothing_is_written(tmp_path, config, tensors, message):
  src = _edited_gpt2(tmp_path, config, tensors)
  with pytest.raises(ValueError, match=message):
    import_hf(str(src), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  assert not [p for p in tmp_path.iterdir() if ".importing" in p.name]  # staging removed


def test_a_sharded_index_naming_a_missing_file_and_a_non_empty_workdir_are_refused(tmp_path):
  src = _edited_gpt2(tmp_path)
  (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
  with safe_open(str(src / "model-00001-of-00002.safetensors"), "numpy") as f:
    names = list(f.keys())
  weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
  weight_map[names[0]] = "model-00002-of-00002.safetensors"
  (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
    import_hf(str(src), str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  (tmp_path / "wd").mkdir()
  (tmp_path / "wd" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="not empty; pass --overwrite"):
    import_hf(str(FIXTURES / "gpt2"), str(tmp_path / "wd"))
  assert (tmp_path / "wd" / "notes.txt").read_text() == "mine"


def test_export_refuses_a_model_no_architecture_represents():
  """Written as an architecture's config.json and read back, the model must not change."""
  from eval.hf_io import choose_arch
  from tests.tiny_models import tiny_config

  t5 = tiny_config("t5")  # fourfold's T5 preset scales its attention logits; HF's T5 does not
  with pytest.raises(ValueError, match=r"model.scale_attention=True .*reads back as False"):
    choose_arch(t5, 264)
  t5.model.scale_attention = False
  assert choose_arch(t5, 264).name == "T5ForConditionalGeneration"
  bitnet = tiny_config("llama")
  bitnet.model.quant = "bitnet158"
  with pytest.raises(ValueError, match="model.quant='bitnet158'"):
    choose_arch(bitnet, 264)
  assert choose_arch(tiny_config("gpt"), 264).name == "GPT2LMHeadModel"
  from configs import deepseek

  ds = deepseek.get_config("size=tiny")  # the training-only MoE keys (bias updates) aside
  with pytest.raises(ValueError, match="rms_norm_eps=1e-05"):
    choose_arch(ds, 264)
  ds.model.norm_eps = 1e-6
  assert choose_arch(ds, 264).name == "DeepseekV3ForCausalLM"


def _published(preset: str, legacy: bool) -> dict:
  """The config.json of a published DeepseekV3ForCausalLM (param_counts.json holds its
  transformers config); `legacy`: RoPE in the hub files' older schema (top-level rope_theta,
  rope_scaling with "type")."""
  counts = json.loads((FIXTURES / "param_counts.json").read_text())
  hf = dict(counts["presets"][f"deepseek.py:size={preset}"]["config"])
  if legacy:
    rope = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
  return {**hf, "architectures": ["DeepseekV3ForCausalLM"]}


@pytest.mark.parametrize("preset,legacy", [("deepseek_v3", True), ("kimi_k2", False)])
def test_published_deepseek_configs_read_as_the_presets(preset, legacy):
  """DeepSeek-V3's and Kimi K2's config.json give configs/deepseek.py's published shapes:
  MLA ranks, expert layout, YaRN (the model fields import sets, runtime ones aside)."""
  from configs import base, deepseek
  from eval.hf_arch import ARCHITECTURES

  read = ARCHITECTURES["DeepseekV3ForCausalLM"].read_config(_published(preset, legacy))
  got, want = base.get_config().model, deepseek.get_config(f"size={preset}").model
  got.update(read)
  for key, value in read.items():
    if isinstance(value, dict):
      assert {k: got[key][k] for k in value} == {k: want[key][k] for k in value}, key
    else:
      assert got[key] == want[key], key
  assert got.rope_scaling.to_dict() == want.rope_scaling.to_dict()


@pytest.mark.parametrize(
  "edit,message",
  [
    ({"norm_topk_prob": False}, "norm_topk_prob=False: fourfold's router always normalizes"),
    ({"rope_interleave": False}, "rope_interleave=False"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quant_method='fp8'"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05: transformers normalizes MLA's latents"),
    ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({"rope_scaling": {"type": "yarn", "factor": 40, "attention_factor": 1.2}}, "attention_factor"),
  ],
)
def test_deepseek_configs_fourfold_cannot_compute_are_refused(edit, message):
  from eval.hf_arch import ARCHITECTURES, Unsupported

  hf = {**_published("deepseek_v3", True), **edit}
  with pytest.raises(Unsupported, match=message):
    ARCHITECTURES["DeepseekV3ForCausalLM"].read_config(hf)


def test_deepseek_layers_past_the_model_are_read_past():
  """The multi-token-prediction module's tensors (model.layers.{num_layers}.*) are not part
  of the model: read past (deepseek_v3_lite's checkpoint carries some), not an error."""
  import types

  from eval.hf_arch import ARCHITECTURES

  arch, c = ARCHITECTURES["DeepseekV3ForCausalLM"], types.SimpleNamespace(num_layers=2)
  assert arch.reads_past("model.layers.2.eh_proj.weight", c)
  assert arch.reads_past("model.layers.12.self_attn.q_a_proj.weight", c)
  assert not arch.reads_past("model.layers.1.mlp.gate.weight", c)
  assert not arch.reads_past("model.norm.weight", c)
  assert not ARCHITECTURES["LlamaForCausalLM"].reads_past("model.layers.2.mlp.gate.weight", c)


def test_a_bfloat16_checkpoint_is_cast_to_float32_exactly(tmp_path, caplog):
  import ml_dtypes

  with safe_open(str(FIXTURES / "gpt2" / "model.safetensors"), "numpy") as f:
    source = {k: f.get_tensor(k) for k in f.keys()}
  halves = {k: v.astype(ml_dtypes.bfloat16) for k, v in source.items()}
  src = _edited_gpt2(tmp_path, {"dtype": "bfloat16"}, halves)
  with caplog.at_level("INFO"):
    import_hf(str(src), str(tmp_path / "wd"))
  assert "cast to float32 (the params' dtype): {'bfloat16': 28}" in caplog.text
  _, _, params, _ = load_for_inference(str(tmp_path / "wd"))
  want = halves["transformer.wte.weight"].astype(np.float32)
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]), want)


SHARDED_IMPORT = """
import json, sys
import jax, numpy as np
from safetensors import safe_open
from eval import hf_io
placed = {}
place = hf_io._place
def spy(x, target):
  out = place(x, target)
  placed[target.shape] = max(s.data.size for s in out.addressable_shards) / out.size
  return out
hf_io._place = spy
hf_io.import_hf(sys.argv[1], sys.argv[2], mesh={"data": 1, "fsdp": 8, "tensor": 1})
from train.trainer import load_for_inference
_, _, params, _ = load_for_inference(sys.argv[2])
with safe_open(sys.argv[1] + "/model.safetensors", "numpy") as f:
  same = np.array_equal(np.asarray(params["embed"]["embedding"]), f.get_tensor("model.embed_tokens.weight"))
print("RESULT", json.dumps({"devices": jax.device_count(), "shares": {str(k): v for k, v in placed.items()}, "same": same}))
"""


def test_on_a_mesh_each_param_is_placed_sharded_as_it_is_read(tmp_path):
  """With fsdp=8 every matrix arrives on the 8 devices as eighths (the `embed` dim split),
  never whole on one device, and the checkpoint restores the source's values."""
  import subprocess
  import sys

  from tests.sharding import runner

  env = runner.device_env(8)
  out = subprocess.run(
    [sys.executable, "-c", SHARDED_IMPORT, str(FIXTURES / "llama3"), str(tmp_path / "wd")],
    capture_output=True,
    text=True,
    env=env,
    cwd=str(FIXTURES.parents[2]),
    timeout=300,
  )
  line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
  assert line, out.stderr[-3000:]
  result = json.loads(line[0][len("RESULT ") :])
  assert result["devices"] == 8 and result["same"]
  matrices = {k: v for k, v in result["shares"].items() if not k.endswith(",)")}  # not vectors
  assert matrices and all(share == 1 / 8 for share in matrices.values()), [
    (k, v) for k, v in matrices.items() if v != 1 / 8
  ]
