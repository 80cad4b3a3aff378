"""Exports loaded by transformers itself: runs only where torch and transformers are
installed (not in the README's test command; see docs/huggingface.md for the venv).

  import -> export -> AutoModel.from_pretrained: the fixture's logits within 1e-5
  train here 20 steps -> export -> transformers: fourfold's own logits
  a LoRA run -> --format=peft -> PeftModel over the base's export: the run's logits (with peft)
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import deepseek  # noqa: E402
from eval.hf_io import export_hf  # noqa: E402
from eval.lora_export import export_peft  # noqa: E402
from tests.eval import test_hf_import, test_lora_export  # noqa: E402
from tests.eval.test_hf_import import FIXTURES, NAMES, forward  # noqa: E402
from tests.tiny_models import short_run, tiny_config  # noqa: E402
from train.trainer import load_for_inference, run  # noqa: E402

workdirs = test_hf_import.workdirs  # the module-scoped imports, shared

AUTO = {
  "GPT2LMHeadModel": transformers.AutoModelForCausalLM,
  "LlamaForCausalLM": transformers.AutoModelForCausalLM,
  "Phi3ForCausalLM": transformers.AutoModelForCausalLM,
  "BloomForCausalLM": transformers.AutoModelForCausalLM,
  "DeepseekV3ForCausalLM": transformers.AutoModelForCausalLM,
  "DebertaV2ForMaskedLM": transformers.AutoModelForMaskedLM,
  "BertForMaskedLM": transformers.AutoModelForMaskedLM,
  "RobertaForMaskedLM": transformers.AutoModelForMaskedLM,
  "BertModel": transformers.AutoModel,
  "T5ForConditionalGeneration": transformers.AutoModelForSeq2SeqLM,
}


def transformers_outputs(out_dir, arch: str, ref) -> np.ndarray:
  model = AUTO[arch].from_pretrained(out_dir, attn_implementation="eager").eval()
  ids = torch.as_tensor(np.asarray(ref["input_ids"]), dtype=torch.long)
  with torch.no_grad():
    if "decoder_input_ids" in ref:
      dec = torch.as_tensor(np.asarray(ref["decoder_input_ids"]), dtype=torch.long)
      return model(input_ids=ids, decoder_input_ids=dec).logits.numpy()
    out = model(input_ids=ids)
    return out.pooler_output.numpy() if arch == "BertModel" else out.logits.numpy()


@pytest.mark.parametrize("name", NAMES)
def test_export_of_an_import_loads_in_transformers(name, workdirs, tmp_path):
  ref = np.load(FIXTURES / name / "reference.npz")
  out = tmp_path / "hf"
  arch = export_hf(workdirs(name), str(out))["architecture"]
  got = transformers_outputs(str(out), arch, ref)
  want = ref["pooled"] if "pooled" in ref else ref["logits"]
  assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(want.std()))
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  fixture_tok = transformers.AutoTokenizer.from_pretrained(str(FIXTURES / name))
  text = "def f(x):\n    return x  # héllo 中文"
  assert tok(text)["input_ids"] == fixture_tok(text)["input_ids"]


@pytest.mark.parametrize(
  "preset,options",
  [
    ("gpt", ""),
    ("llama", ""),
    ("bert", "arch=bert"),
    ("t5", "variant=v1_1"),
    ("t5", "variant=original"),
    (deepseek, ""),
  ],
)
def test_trained_here_then_exported_gives_the_same_logits_in_transformers(
  preset, options, tmp_path
):
  config = short_run(tiny_config(preset, options, seq_len=32, shuffle_window=16), 20)
  config.model.dropout = 0.0
  if preset is deepseek:  # transformers' MLA latents use eps 1e-6; a query latent, groups, YaRN
    config.model.norm_eps = 1e-6
    config.model.mla.q_lora_rank = 16
    config.model.moe.update(n_group=2, topk_group=1, routed_scaling_factor=2.5)
    config.model.rope_scaling.update(
      type="yarn", factor=4.0, original_max_len=8, mscale=1.0, mscale_all_dim=0.8
    )
  if preset == "t5":  # transformers' T5 does not scale its attention logits
    config.model.scale_attention = False
  run(config, str(tmp_path / "wd"))
  _, model, params, tokenizer = load_for_inference(str(tmp_path / "wd"))
  rng = np.random.default_rng(0)
  ids = rng.integers(8, tokenizer.vocab_size, (1, 32)).astype(np.int32)
  ref = {"input_ids": ids}
  if config.model.family == "encdec":
    ref["decoder_input_ids"] = np.concatenate([[[2]], ids[:, :-1]], axis=1).astype(np.int32)
  ours = forward(model, params, ref)
  out = tmp_path / "hf"
  arch = export_hf(str(tmp_path / "wd"), str(out))["architecture"]
  got = transformers_outputs(str(out), arch, ref)
  assert np.abs(got - ours).max() <= 1e-4 * max(1.0, float(ours.std()))
  text = "ROMEO: héllo\n\n  x"
  hf_ids = transformers.AutoTokenizer.from_pretrained(str(out))(text, add_special_tokens=False)
  assert hf_ids["input_ids"] == tokenizer.encode(text).tolist()


lora_runs = test_lora_export.runs  # the LoRA runs and their bases' HF exports, shared


@pytest.mark.parametrize("case", ["llama", "phi3", "gpt2"])
def test_peft_adapters_on_the_exported_base_give_the_lora_models_logits(case, lora_runs, tmp_path):
  """PeftModel.from_pretrained(the base's HF export, --format=peft's folder): the LoRA run's
  logits, through separate projections, fused ones (Phi-3's block adapters) and Conv1D."""
  peft = pytest.importorskip("peft")
  made = lora_runs(case)
  ids = np.random.default_rng(0).integers(8, 264, (1, 32)).astype(np.int32)
  ours = test_lora_export.logits(made["run"], ids)
  arch = export_peft(made["run"], str(tmp_path / "peft"))["architecture"]
  model = AUTO[arch].from_pretrained(made["hf_base"], attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
  with torch.no_grad():
    got = model(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.abs(got - ours).max() <= 1e-4 * max(1.0, float(ours.std()))


@pytest.mark.parametrize(
  "name,targets",
  [
    ("t5_v1_1", "attn/(query|value|out)$|mlp/(gate|up)$"),
    ("bert", "attn/(query|key|out)$|mlp/up$"),
  ],
)
def test_peft_adapters_of_a_run_from_an_import_apply_to_the_source_checkpoint(
  name, targets, workdirs, tmp_path
):
  """import -> LoRA run (random adapters) -> --format=peft -> PeftModel over the fixture
  folder itself: the run's logits (T5's encoder, decoder and cross attention; BERT's
  attention.output.dense named by full path, as `dense` names other modules too)."""
  peft = pytest.importorskip("peft")
  ref = np.load(FIXTURES / name / "reference.npz")
  run = test_lora_export.lora_run(workdirs(name), str(tmp_path / "lora"), targets)
  _, model, params, _ = load_for_inference(run)
  ours = forward(model, params, ref)
  arch = export_peft(run, str(tmp_path / "peft"))["architecture"]
  base = AUTO[arch].from_pretrained(str(FIXTURES / name), attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
  ids = torch.as_tensor(np.asarray(ref["input_ids"]), dtype=torch.long)
  kw = {}
  if "decoder_input_ids" in ref:
    kw["decoder_input_ids"] = torch.as_tensor(
      np.asarray(ref["decoder_input_ids"]), dtype=torch.long
    )
  with torch.no_grad():
    got = model(input_ids=ids, **kw).logits.numpy()
  assert np.abs(ours - ref["logits"]).max() > 0.1  # the adapters matter
  assert np.abs(got - ours).max() <= 1e-4 * max(1.0, float(ours.std()))
