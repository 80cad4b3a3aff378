"""Hugging Face tokenizers (`data.tokenizer='hf:<dir>'`) against what transformers gives on the
fixtures of tests/fixtures/hf: identical ids with and without the model's special tokens on
code, unicode, whitespace runs and literal special tokens, the same decoded text, and the
model's special ids (BOS / EOS / PAD / [MASK] ..., the decoder's start, vocabulary padding)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import numpy as np
import pytest

from modeling.vocab import Specials
from train.data import pipeline
from train.data import tokenizers as tk

HF = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf")
FIXTURES = [
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
]


def tokenizer(name: str):
  return tk.make_tokenizer(f"hf:{os.path.join(HF, name)}")


def cases(name: str) -> list[dict]:
  with open(os.path.join(HF, name, "tokenizer_cases.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.parametrize("name", FIXTURES)
def test_ids_and_decoded_text_equal_transformers(name):
  """Every recorded text: the ids transformers' tokenizer gives with add_special_tokens
  True (`encode_framed`) and False (`encode`), and its decode with skip_special_tokens."""
  tok = tokenizer(name)
  for case in cases(name):
    text = case["text"]
    assert tok.encode_framed(text).tolist() == case["ids_with_special"], text
    assert tok.encode(text).tolist() == case["ids_without_special"], text
    assert tok.decode(case["ids_with_special"]) == case["decoded_skip_special"], text
    if case["decoded_skip_special"] == text:  # transformers' round trip is ours too
      assert tok.decode(tok.encode(text)) == text


# (class, vocab_size, the model's embedding rows, the Specials fields that differ from
# fourfold's, the special-id ranges); from the fixtures' README and config files
EXPECTED = {
  "bloom": (
    tk.HuggingFaceTokenizer,
    384,
    384,
    dict(pad=3, eos=2, bos=1, mask=None, cls=None, sep=None, unk=0, add_bos=False),
    ((0, 4),),
  ),
  "gpt2": (
    tk.HuggingFaceTokenizer,
    384,
    384,
    dict(pad=0, eos=383, bos=383, mask=None, cls=None, sep=None, unk=383, add_bos=False),
    ((383, 384),),
  ),
  "llama2": (
    tk.HuggingFaceSentencePieceTokenizer,
    448,
    448,
    dict(pad=0, eos=2, bos=1, mask=None, cls=None, sep=None, unk=0, add_bos=True),
    ((0, 3),),
  ),
  "llama3": (
    tk.HuggingFaceTokenizer,
    384,
    384,
    dict(eos=374, bos=373, mask=None, cls=None, sep=None, unk=None, add_bos=True),
    ((373, 384),),
  ),
  "phi3": (
    tk.HuggingFaceTokenizer,
    411,
    416,
    dict(pad=400, eos=400, bos=1, mask=None, cls=None, sep=None, unk=0, add_bos=True),
    ((0, 3), (400, 411)),
  ),
  "bert": (
    tk.HuggingFaceTokenizer,
    400,
    400,
    dict(pad=0, eos=None, bos=None, mask=4, cls=2, sep=3, unk=1, add_bos=False),
    ((0, 5),),
  ),
  "roberta": (
    tk.HuggingFaceTokenizer,
    384,
    384,
    dict(pad=1, eos=2, bos=0, mask=383, cls=0, sep=2, unk=3, add_bos=True),
    ((0, 4), (383, 384)),
  ),
  "t5": (
    tk.HuggingFaceSentencePieceTokenizer,
    320,
    328,
    dict(pad=0, eos=1, bos=None, mask=None, cls=None, sep=None, unk=2, decoder_start=0),
    ((0, 3), (300, 320)),
  ),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_special_ids_are_the_models(name):
  cls, vocab_size, rows, fields, ranges = EXPECTED[name]
  tok = tokenizer(name)
  assert type(tok) is cls and not tok.is_byte_level
  assert (tok.vocab_size, tok.model_vocab_size) == (vocab_size, rows)  # T5, Phi-3: padded
  for field, value in fields.items():
    assert getattr(tok.specials, field) == value, field
  assert tok.specials.special_ranges == ranges


def test_stop_ids_and_decoder_start_come_from_the_models_config():
  """Llama 3's config ends generation at any of three ids; T5's decoder starts at pad."""
  assert tokenizer("llama3").specials.stop_ids == (374, 381, 382)
  assert tokenizer("gpt2").specials.stop_ids == (383,)
  t5 = tokenizer("t5")
  assert (t5.specials.decoder_start, t5.specials.pad, t5.specials.stop_ids) == (0, 0, (1,))


def test_framing_is_the_models():
  """Llama prepends BOS, T5 appends EOS, BERT wraps in [CLS] ... [SEP], GPT-2 adds nothing;
  the document frame of packed pretraining follows (BOS first where the model adds one)."""
  text = "def f(x): return x"
  want = {
    "llama2": ([1], []),
    "llama3": ([373], []),
    "t5": ([], [1]),
    "bert": ([2], [3]),
    "roberta": ([0], [2]),
    "gpt2": ([], []),
  }
  for name, (prefix, suffix) in want.items():
    tok = tokenizer(name)
    assert tok.encode_framed(text).tolist() == prefix + tok.encode(text).tolist() + suffix
  assert pipeline.document_frame(tokenizer("llama3").specials) == ((373,), (374,))
  assert pipeline.document_frame(tokenizer("gpt2").specials) == ((), (383,))
  assert pipeline.document_frame(tokenizer("t5").specials) == ((), (1,))
  with pytest.raises(ValueError, match="no eos token"):
    pipeline.document_frame(tokenizer("bert").specials)


def test_t5_sentinels_count_down_from_the_end_and_eat_the_spaces_around_them():
  tok = tokenizer("t5")
  ids = tok.encode("a <extra_id_0> b<extra_id_1>c").tolist()
  assert 319 in ids and 318 in ids  # <extra_id_N> is 300 + 20 - 1 - N
  assert ids == tok.encode("a<extra_id_0>b <extra_id_1> c").tolist()
  assert tok.specials.is_special(np.array([319, 300, 299])).tolist() == [True, True, False]


def test_packed_documents_carry_the_tokenizers_frame(tmp_path):
  """Llama 3's documents go into packed rows as <|begin_of_text|> ... <|end_of_text|>."""
  (tmp_path / "d.jsonl").write_text(
    "".join(json.dumps({"text": f"doc {i}: x = {i}"}) + "\n" for i in range(20))
  )
  from configs import base

  data = base.get_config().data
  data.update(name=f"jsonl:{tmp_path / 'd.jsonl'}", text_field="text", seq_len=24)
  tok = tokenizer("llama3")
  batch = next(pipeline.train_iterator(data, tok, batch_size=2, seed=0))
  flat_N = batch["tokens"].reshape(-1)
  assert (flat_N == 373).sum() >= 2 and (flat_N[1:][flat_N[:-1] == 374] == 373).all()


def test_a_directory_without_a_tokenizer_names_what_it_looked_for(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=r"hf:.*has no tokenizer: looked for tokenizer\.json, "):
    tk.make_tokenizer(f"hf:{tmp_path}")
  with pytest.raises(ValueError, match=r"tokenizer\.model, spiece\.model"):
    tk.make_tokenizer(f"hf:{tmp_path}")


def test_a_corrupt_tokenizer_file_is_refused_naming_the_spec(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"data\.tokenizer='hf:"):
    tk.make_tokenizer(f"hf:{tmp_path}")


def test_specials_ranges_skip_the_specials_in_the_middle():
  s = Specials(special_ranges=((0, 1), (5, 7), (9, 10)))
  ids = [s.nth_ordinary(n) for n in range(s.num_ordinary(12))]
  assert ids == [1, 2, 3, 4, 7, 8, 10, 11] and s.first_ordinary() == 1


# ---- against transformers itself, on texts the fixtures do not hold (needs transformers)


def _texts(n: int) -> list[str]:
  rng = random.Random(0)
  pieces = [c["text"] for c in cases("gpt2") if c["text"]] + [
    " ", "  ", "\n", "\t", "\n\n ", "   x", "<s>", "</s>", "<pad>", "<unk>", "[CLS]", "[SEP]",
    "[MASK]", "<mask>", "<|endoftext|>", "<extra_id_0>", " <extra_id_3> ", "<|begin_of_text|>",
    "<|user|>", "<|end|>", "\u2581", "don't", " .", "\ufb01", "\u3000", "\u00a0", "\r\n", "e\u0301",
  ]  # fmt: skip
  out = []
  for _ in range(n):
    text = ""
    for _ in range(rng.randint(1, 6)):
      p = rng.choice(pieces)
      start = rng.randrange(len(p))
      text += p[start : start + rng.randint(1, 30)] if len(p) > 20 else p
    out.append(text)
  return out


def _reference(name: str):
  """What the fixtures' ids came from: AutoTokenizer for tokenizer.json, transformers'
  SentencePiece backend set up as the slow (legacy) Llama / T5 tokenizers otherwise."""
  from transformers import AutoTokenizer

  directory = os.path.join(HF, name)
  if name not in ("llama2", "t5"):
    return AutoTokenizer.from_pretrained(directory)
  path = os.path.join(HF, "make_fixtures.py")
  spec = importlib.util.spec_from_file_location("make_fixtures", path)
  mf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mf)
  if name == "llama2":
    return mf.sp_backend(os.path.join(directory, "tokenizer.model"), "llama")
  return mf.sp_backend(os.path.join(directory, "spiece.model"), "t5", mf.T5_EXTRA)


@pytest.mark.parametrize("name", ["gpt2", "llama2", "llama3", "phi3", "bert", "roberta", "t5"])
def test_ids_equal_transformers_on_random_mixed_texts(name):
  pytest.importorskip("transformers")
  ref, tok = _reference(name), tokenizer(name)
  for text in _texts(200):
    assert tok.encode_framed(text).tolist() == ref(text)["input_ids"], repr(text)
    assert tok.encode(text).tolist() == ref(text, add_special_tokens=False)["input_ids"]
