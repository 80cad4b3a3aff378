"""Pre-tokenized shards, `data.name=arrayrecord:DIR`: packed rows in ArrayRecord files.

`python -m train.data.prepare` (train/data/prepare.py) writes DIR: for each split (`train`,
`validation`) the files `<split>-<k>-of-<n>.array_record`, and `metadata.json` beside them.
Each record is one packed row of `seq_len` tokens: the arrays tokens, segment_ids and
positions stacked as [3, seq_len] in `dtype` (uint16 where the vocabulary and the length
fit, else int32), as raw bytes. The metadata names the tokenizer (its `data.tokenizer`,
vocabulary size and a SHA-256 of its model file and special ids), the frame around each
document, the sequence length, the source and the rows and tokens of every shard.

Paths go through `etils.epath`, so DIR may be local or a bucket (`gs://...`); the records
themselves are read by array_record's own reader, which opens `gs://` objects with its
built-in Google Cloud Storage client.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from etils import epath
from grain.sources import ArrayRecordDataSource

PREFIX = "arrayrecord:"
METADATA = "metadata.json"
FORMAT = "fourfold packed rows, version 1"
KEYS = ("tokens", "segment_ids", "positions")  # the arrays of a row, in record order
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access (grain asks for it)


def is_prepared(name: str) -> bool:
  return name.startswith(PREFIX)


def directory(name: str) -> epath.Path:
  """DIR of `arrayrecord:DIR` (a local path, `~` expanded, or a bucket URL)."""
  path = name[len(PREFIX) :]
  return epath.Path(path if "://" in path else os.path.expanduser(path))


def shard_name(split: str, k: int, n: int) -> str:
  return f"{split}-{k:05d}-of-{n:05d}.array_record"


def row_dtype(vocab_size: int, seq_len: int) -> str:
  """The narrowest of uint16 and int32 that holds every token id, segment id and position."""
  return "uint16" if max(vocab_size, seq_len + 1) <= 1 << 16 else "int32"


def encode_row(row: dict[str, np.ndarray], dtype: str) -> bytes:
  return np.stack([row[k] for k in KEYS]).astype(dtype).tobytes()


def decode_row(record: bytes, dtype: str, seq_len: int) -> dict[str, np.ndarray]:
  row_3L = np.frombuffer(record, dtype).reshape(len(KEYS), seq_len).astype(np.int32)
  return dict(zip(KEYS, row_3L, strict=True))


def tokenizer_identity(spec: str, tokenizer) -> dict:
  """What makes two tokenizers give the same ids: the vocabulary size and a SHA-256 of the
  model file (none for bytes) and the special ids; `spec` (data.tokenizer) is for messages."""
  digest = hashlib.sha256(repr(tokenizer.specials).encode())
  path = getattr(tokenizer, "path", None)
  digest.update(epath.Path(path).read_bytes() if path else b"byte")
  return {"spec": spec, "vocab_size": int(tokenizer.vocab_size), "sha256": digest.hexdigest()}


def describe_tokenizer(identity: dict) -> str:
  return (
    f"{identity['spec']!r} (vocabulary {identity['vocab_size']}, sha256 {identity['sha256'][:12]})"
  )


def read_metadata(name: str, key: str = "data.name", complete: bool = True) -> dict:
  """DIR's metadata; a missing DIR or metadata, or (with `complete`) an unfinished
  preparation, is a ValueError of one line naming `key`."""
  where = directory(name)
  path = where / METADATA
  how = f"python -m train.data.prepare --config=<config> --output={where}"
  if not where.is_dir():
    raise ValueError(f"{key}={name!r}: no directory {where}; write one with `{how}`")
  if not path.exists():
    raise ValueError(f"{key}={name!r}: no {METADATA} in {where}: not written by `{how}`")
  meta = json.loads(path.read_text())
  if meta.get("format") != FORMAT:
    raise ValueError(
      f"{key}={name!r}: {path} is format {meta.get('format')!r}; allowed: {FORMAT!r}"
    )
  if complete and not meta["complete"]:
    done, total = len(meta["done"]), sum(s["shards"] for s in meta["splits"].values())
    raise ValueError(
      f"{key}={name!r}: its preparation stopped after {done} of {total} shards; rerun `{how}` "
      "with the same config to finish it"
    )
  return meta


def split_files(name: str, split: str, meta: dict) -> list[str]:
  """The split's shard paths, each with its row range (`path[0:rows]`), so that opening
  them reads no file footer (array_record's FileInstruction syntax)."""
  where, n = directory(name), meta["splits"][split]["shards"]
  files = []
  for k in range(n):
    shard = shard_name(split, k, n)
    files.append(f"{os.fspath(where / shard)}[0:{meta['done'][shard]['rows']}]")
  return files


def rows_source(name: str, split: str, key: str = "data.name"):
  """(the split's rows as a random-access ArrayRecord source of records, the metadata).
  Split "all" (data.eval_name) is the validation split."""
  meta = read_metadata(name, key)
  split = "validation" if split == "all" else split
  if not meta["totals"][split]["rows"]:
    raise ValueError(f"{key}={name!r}: its {split!r} split has no rows")
  return ArrayRecordDataSource(split_files(name, split, meta)), meta
