"""Tokenizers: raw bytes, or a SentencePiece model trained with the fourfold special ids.

Each tokenizer names its special ids in `specials` (modeling/vocab.py `Specials`): bytes
and fourfold SentencePiece models share the ids 0..7 (`FOURFOLD`). Framing, objectives and
decoding read the ids from there.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import sentencepiece as spm

from modeling.vocab import (
  BOS_ID,
  CLS_ID,
  EOS_ID,
  FOURFOLD,
  MASK_ID,
  NUM_SPECIAL,
  PAD_ID,
  SEP_ID,
  UNK_ID,
  Specials,
)

# Control pieces at the reserved ids 3, 4, 5, 7 of the SentencePiece models train_spm writes.
SPM_RESERVED_PIECES = ("[MASK]", "[CLS]", "[SEP]", "[RESERVED7]")

_ALLOWED_SPECS = "allowed: 'byte' or 'spm:<path to .model>'"


class Tokenizer(Protocol):
  """What the pipeline and the trainer need from a tokenizer."""

  vocab_size: int  # the ids it can emit, added tokens included
  is_byte_level: bool
  specials: Specials  # its model's special ids and framing

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of the text alone, without the model's framing (BOS / EOS)."""
    ...

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids`, special ids skipped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: byte b is id b + NUM_SPECIAL. No vocabulary file, no unknowns."""

  vocab_size = 256 + NUM_SPECIAL
  is_byte_level = True
  specials = FOURFOLD

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32, no EOS) of `text`; bytes are taken as they are, valid UTF-8 or not."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of the byte tokens in `ids`; special ids are dropped, invalid UTF-8 replaced."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    bytes_N = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)] - NUM_SPECIAL
    return bytes_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def num_bytes(self, ids: np.ndarray | list[int]) -> int:
    """How many of `ids` are byte tokens (for bits per byte)."""
    return int(np.count_nonzero(np.asarray(ids) >= NUM_SPECIAL))


class SentencePieceTokenizer:
  """A SentencePiece `.model` whose special ids follow the fourfold layout (see train_spm)."""

  is_byte_level = False
  specials = FOURFOLD

  def __init__(self, path: str):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    _check_special_ids(self._sp, path)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32, no EOS) of `text`; bytes are decoded as UTF-8, invalid bytes replaced."""
    if isinstance(text, bytes | bytearray | memoryview):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids`, with the reserved ids 0..7 dropped."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    kept = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)]
    return self._sp.decode(kept.tolist())


def _check_special_ids(sp: spm.SentencePieceProcessor, path: str) -> None:
  """Raises unless pad/eos/bos/unk sit at 0/1/2/6 and ids 3, 4, 5, 7 are reserved pieces."""
  expected = {"pad": PAD_ID, "eos": EOS_ID, "bos": BOS_ID, "unk": UNK_ID}
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id(), "unk": sp.unk_id()}
  reserved = dict(zip((MASK_ID, CLS_ID, SEP_ID, 7), SPM_RESERVED_PIECES, strict=True))
  ordinary = [
    i
    for i, piece in reserved.items()
    if i >= sp.get_piece_size() or not (sp.is_control(i) or sp.id_to_piece(i) == piece)
  ]
  if got != expected or ordinary:
    raise ValueError(
      f"SentencePiece model {path}: special ids {got} (ordinary pieces at reserved ids"
      f" {ordinary}) do not follow the fourfold layout {expected} with ids 3, 4, 5, 7"
      " reserved. Retrain it with `python -m train.data.train_spm --config=<preset>"
      " --output=<path>.model --vocab_size=<n>`."
    )


def make_tokenizer(spec: str) -> ByteTokenizer | SentencePieceTokenizer:
  """The tokenizer named by `data.tokenizer`: `byte` or `spm:<path to .model>`."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("spm:"):
    path = os.path.expanduser(spec[len("spm:") :])
    if not os.path.isfile(path):
      raise ValueError(f"data.tokenizer={spec!r}: no such file {path!r}; {_ALLOWED_SPECS}")
    try:
      return SentencePieceTokenizer(path)
    except (OSError, RuntimeError, ValueError) as e:
      raise ValueError(f"data.tokenizer={spec!r}: {e}; {_ALLOWED_SPECS}") from e
  raise ValueError(f"data.tokenizer={spec!r}: unknown tokenizer; {_ALLOWED_SPECS}")
