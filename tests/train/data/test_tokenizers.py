"""Tokenizers: byte round trips, SentencePiece training with the fourfold special ids."""

from __future__ import annotations

import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from modeling.vocab import FOURFOLD
from train.data import tokenizers as tk
from train.data import train_spm


def test_byte_ids_are_bytes_plus_offset():
  tok = tk.ByteTokenizer()
  ids = tok.encode("aé")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.array([0x61, 0xC3, 0xA9]) + tk.NUM_SPECIAL)
  assert tok.vocab_size == 264 and tok.is_byte_level


def test_byte_roundtrip_and_special_ids_dropped():
  tok = tk.ByteTokenizer()
  text = "def f(x):\n  return x  # ünïcode ✓ 日本 😀\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  with_specials = np.concatenate([[tk.BOS_ID], ids, [tk.EOS_ID, tk.PAD_ID, tk.PAD_ID]])
  assert tok.decode(with_specials) == text
  assert tok.num_bytes(with_specials) == len(text.encode("utf-8"))


def test_byte_invalid_utf8_is_kept_and_replaced_on_decode():
  tok = tk.ByteTokenizer()
  raw = b"ok\xff\xfe\xc3"  # invalid UTF-8, including a truncated sequence
  ids = tok.encode(raw)
  np.testing.assert_array_equal(ids, np.frombuffer(raw, np.uint8).astype(np.int32) + 8)
  assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
  assert tok.encode(b"").shape == (0,)


def _corpus(n_docs: int) -> list[str]:
  rng = random.Random(0)
  words = ["def", "class", "return", "import", "self", "value", "print", "for", "in", "x1"]
  return [
    "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(5))
    for _ in range(n_docs)
  ]


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("spm") / "tok.model")
  return train_spm.train_sentencepiece(_corpus(300), out, vocab_size=300, max_bytes=10**6)


def test_spm_special_id_layout(spm_path):
  tok = tk.SentencePieceTokenizer(spm_path)
  sp = spm.SentencePieceProcessor(model_file=spm_path)
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 6)
  pieces = [sp.id_to_piece(i) for i in (tk.MASK_ID, tk.CLS_ID, tk.SEP_ID, 7)]
  assert pieces == ["[MASK]", "[CLS]", "[SEP]", "[RESERVED7]"]
  assert tok.vocab_size == sp.get_piece_size() <= 300
  assert not tok.is_byte_level


def test_spm_roundtrip_with_unseen_characters(spm_path):
  tok = tk.make_tokenizer(f"spm:{spm_path}")
  text = "def value(self):\n    return x1  # ünseen 日本 😀"
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.min() >= tk.NUM_SPECIAL  # byte fallback: no unknowns, no special ids
  assert tok.decode(ids) == text
  assert tok.decode(np.concatenate([ids, [tk.EOS_ID, tk.PAD_ID]])) == text


def test_spm_text_never_encodes_to_special_ids(spm_path):
  tok = tk.make_tokenizer(f"spm:{spm_path}")
  ids = tok.encode("[MASK] [CLS] [SEP] <s> </s> <pad> <unk>")
  assert ids.min() >= tk.NUM_SPECIAL


def test_spm_invalid_utf8_bytes_do_not_crash(spm_path):
  tok = tk.make_tokenizer(f"spm:{spm_path}")
  raw = b"def \xff\xfe x1\xc3"
  ids = tok.encode(raw)
  assert tok.decode(ids) == raw.decode("utf-8", errors="replace")


def test_spm_training_text_keeps_lines_whole_within_budget():
  chunks = list(train_spm._training_text(_corpus(300), max_bytes=5000))
  assert 4000 < sum(len(c.encode()) for c in chunks) <= 5000
  assert all(c.count("\n") == 4 for c in chunks)  # each short document is one chunk
  long_doc = "x = 1\n" * 2000  # 12000 chars: cut into chunks at line ends
  chunks = list(train_spm._split_lines(long_doc))
  assert "".join(chunks) == long_doc
  assert all(len(c) <= train_spm._MAX_CHUNK_CHARS and c.endswith("\n") for c in chunks)


def test_foreign_spm_model_is_rejected(tmp_path):
  prefix = str(tmp_path / "foreign")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_corpus(50)),
    model_prefix=prefix,
    vocab_size=60,
    hard_vocab_limit=False,
    minloglevel=2,
  )  # SentencePiece defaults: unk=0, bos=1, eos=2, no pad
  with pytest.raises(ValueError, match=r"data\.tokenizer=.*train_spm"):
    tk.make_tokenizer(f"spm:{prefix}.model")


@pytest.mark.parametrize("spec", ["bpe", "spm:/no/such/file.model", "", "Byte", "hf:/no/such/dir"])
def test_make_tokenizer_rejects_bad_specs(spec):
  with pytest.raises(ValueError, match=r"data\.tokenizer=.*allowed: 'byte', 'spm:.*'hf:"):
    tk.make_tokenizer(spec)


def test_fourfold_tokenizers_have_the_fourfold_special_ids(spm_path):
  for tok in (tk.ByteTokenizer(), tk.make_tokenizer(f"spm:{spm_path}")):
    assert tok.specials == FOURFOLD
  s = FOURFOLD
  assert (s.pad, s.eos, s.bos, s.mask, s.cls, s.sep, s.unk) == (0, 1, 2, 3, 4, 5, 6)
  assert (s.decoder_start, s.add_bos, s.stop_ids) == (tk.BOS_ID, False, (tk.EOS_ID,))
  ids_N = np.arange(300)
  np.testing.assert_array_equal(s.is_special(ids_N), ids_N < tk.NUM_SPECIAL)
  assert s.num_ordinary(264) == 256 and s.first_ordinary() == tk.NUM_SPECIAL


def test_make_tokenizer_rejects_corrupt_model(tmp_path):
  path = tmp_path / "bad.model"
  path.write_bytes(b"not a model")
  with pytest.raises(ValueError, match=r"data\.tokenizer="):
    tk.make_tokenizer(f"spm:{path}")


def test_train_spm_rejects_small_vocab(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_spm.train_sentencepiece(["abc"], str(tmp_path / "t.model"), 100, 1000)


def test_train_spm_cli_on_the_default_corpus(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[3]
  output = tmp_path / "tok" / "tok.model"
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.data.train_spm",
      f"--config={repo / 'configs' / 'base.py'}",
      f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
      f"--output={output}",
      "--vocab_size=512",
      "--max_bytes=300000",
    ],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"--config.data.tokenizer=spm:{output}" in result.stdout
  tok = tk.make_tokenizer(f"spm:{output}")
  assert tok.vocab_size == 512
  code = "import os\n\ndef main(argv):\n    return len(argv)\n"
  assert tok.decode(tok.encode(code)) == code
  assert len(tok.encode(code)) < 0.7 * len(code.encode())  # it learned some Python
