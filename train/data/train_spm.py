"""Trains a SentencePiece tokenizer on a config's training data, with the fourfold special ids.

  python -m train.data.train_spm --config=configs/gpt.py --output=runs/tok.model \\
      --vocab_size=4096 [--max_bytes=20000000]

then train with `--config.data.tokenizer=spm:runs/tok.model`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grain
import sentencepiece as spm
from absl import app, flags
from ml_collections import config_flags

from modeling.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, UNK_ID
from train.data.sources import load_documents
from train.data.tokenizers import SPM_RESERVED_PIECES, SentencePieceTokenizer

_MAX_CHUNK_CHARS = 4096  # SentencePiece skips overlong sentences; longer lines are cut


def _split_lines(text: str) -> Iterator[str]:
  """`text` as runs of whole lines, newlines kept so pieces may end in one (`):` + newline)."""
  chunk = ""
  for line in text.splitlines(keepends=True):
    if chunk and len(chunk) + len(line) > _MAX_CHUNK_CHARS:
      yield chunk
      chunk = ""
    chunk += line[:_MAX_CHUNK_CHARS]
  if chunk:
    yield chunk


def _training_text(docs: Sequence, max_bytes: int) -> Iterator[str]:
  """Chunks of the documents, in a fixed random order, until `max_bytes` of text are out."""
  budget = max_bytes
  # A lazily shuffled order (no permutation array, fine for huge sources) samples the
  # whole source rather than its first files.
  for doc in grain.MapDataset.source(docs).shuffle(seed=0):
    text = doc if isinstance(doc, str) else bytes(doc).decode("utf-8", errors="replace")
    for chunk in _split_lines(text):
      if not chunk.strip():
        continue
      budget -= len(chunk.encode("utf-8"))
      if budget < 0:
        return
      yield chunk


def train_sentencepiece(docs: Sequence, output: str, vocab_size: int, max_bytes: int) -> str:
  """Trains a BPE model on up to `max_bytes` of `docs`; returns the path of the `.model`."""
  if vocab_size < NUM_SPECIAL + 256 + 1:
    raise ValueError(
      f"vocab_size={vocab_size}: allowed > {NUM_SPECIAL + 256} (special ids + byte fallback)"
    )
  if not output.endswith(".model"):
    raise ValueError(f"output={output!r}: allowed: a path ending in .model")
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  spm.SentencePieceTrainer.train(
    sentence_iterator=_training_text(docs, max_bytes),
    model_prefix=output[: -len(".model")],
    model_type="bpe",
    vocab_size=vocab_size,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    bos_id=BOS_ID,
    unk_id=UNK_ID,
    # Control symbols take the free ids 3, 4, 5, 7 in order; unlike user-defined
    # symbols, text that spells "[MASK]" never encodes to them.
    control_symbols=list(SPM_RESERVED_PIECES),
    byte_fallback=True,
    character_coverage=0.9995,
    max_sentence_length=_MAX_CHUNK_CHARS * 4,  # bytes
    split_digits=True,
    remove_extra_whitespaces=False,  # keep code indentation
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    hard_vocab_limit=False,
    minloglevel=2,
  )
  SentencePieceTokenizer(output)  # checks the special-id layout
  return output


def main(argv: Sequence[str]) -> None:
  del argv
  data_cfg = flags.FLAGS.config.data
  docs = load_documents(data_cfg.name, "train", data_cfg)
  max_bytes, output = flags.FLAGS.max_bytes, flags.FLAGS.output
  print(f"training SentencePiece on up to {max_bytes} bytes of {data_cfg.name} ...", flush=True)
  path = train_sentencepiece(docs, output, flags.FLAGS.vocab_size, max_bytes)
  print(path)
  print(f"use it with: --config.data.tokenizer=spm:{path}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing `train_sentencepiece`
  # never clashes with another module's `--config`.
  config_flags.DEFINE_config_file("config", help_string="preset whose data.name is read")
  flags.DEFINE_string("output", None, "path of the .model to write")
  flags.DEFINE_integer("vocab_size", 4096, "vocabulary size, special ids included")
  flags.DEFINE_integer("max_bytes", 20_000_000, "text bytes to train on, at most")
  flags.mark_flags_as_required(["config", "output"])
  app.run(main)
