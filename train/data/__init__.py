"""Data: sources (TFDS, the embedded pystdlib corpus, local files), tokenizers, packing."""

from train.data.pipeline import eval_batches, train_iterator
from train.data.sources import load_documents, validate_source
from train.data.tokenizers import (
  ByteTokenizer,
  HuggingFaceSentencePieceTokenizer,
  HuggingFaceTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  make_tokenizer,
)

__all__ = [
  "ByteTokenizer",
  "HuggingFaceSentencePieceTokenizer",
  "HuggingFaceTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "eval_batches",
  "load_documents",
  "make_tokenizer",
  "train_iterator",
  "validate_source",
]
