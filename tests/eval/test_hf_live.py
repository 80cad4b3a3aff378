"""Exports loaded by transformers itself: runs only where torch and transformers are
installed (not in the README's test command; see docs/huggingface.md for the venv).

  import -> export -> AutoModel.from_pretrained: the fixture's logits within 1e-5
  train here 20 steps -> export -> transformers: fourfold's own logits
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from eval.hf_io import export_hf  # noqa: E402
from tests.eval import test_hf_import  # noqa: E402
from tests.eval.test_hf_import import FIXTURES, NAMES, forward  # noqa: E402
from tests.tiny_models import short_run, tiny_config  # noqa: E402
from train.trainer import load_for_inference, run  # noqa: E402

workdirs = test_hf_import.workdirs  # the module-scoped imports, shared

AUTO = {
  "GPT2LMHeadModel": transformers.AutoModelForCausalLM,
  "LlamaForCausalLM": transformers.AutoModelForCausalLM,
  "Phi3ForCausalLM": transformers.AutoModelForCausalLM,
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
  ],
)
def test_trained_here_then_exported_gives_the_same_logits_in_transformers(
  preset, options, tmp_path
):
  config = short_run(tiny_config(preset, options, seq_len=32, shuffle_window=16), 20)
  config.model.dropout = 0.0
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
