"""Document sources: TFDS datasets, the embedded `pystdlib`, local text and JSONL files.

`load_documents` returns a random-access sequence of documents (`str` or `bytes`) that
grain's `MapDataset.source` accepts. Shuffling and sharding happen in `pipeline.py`.
Local text files are documents between `data.doc_separator` strings (or one per file), read
on access in pieces of at most `data.span_bytes` (`Piece`: bytes that know whether their
document starts / ends there), so a file of any size shards like many documents.
Local sources hold out their last 10% for validation; split `"all"` (used for
`data.eval_name`) is the whole local source, or a TFDS dataset's validation split.
Evaluation reads `data.eval_split` of a TFDS dataset instead when it is set
(`validation+test`: TFDS's split syntax); local sources have no named splits to choose.
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
import time
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from train.data import prepared, pystdlib

SPLITS = ("train", "validation", "all")
ALLOWED_NAMES = (
  "'pystdlib', 'text:<glob>', 'jsonl:<glob>', 'arrayrecord:<dir>' or a TFDS dataset name"
  " ('lm1b', 'tiny_shakespeare', 'c4/en:3.1.0', ...)"
)
_HELD_OUT_FRACTION = 10  # local sources: the last 1/10 is validation
# TFDS imports these legacy dataset packages in one try block and stops at the first with
# a missing optional dependency (h5py), hiding c4, wikipedia, ...; import them one by one.
_TFDS_TEXT_PACKAGES = ("text", "summarization", "translate", "question_answering")


def _key_for(split: str) -> str:
  """The config key a source name came from: split "all" is asked for `data.eval_name`."""
  return "data.eval_name" if split == "all" else "data.name"


def _local_files(name: str, key: str) -> list[str]:
  """Files matched by the glob of `text:<glob>` / `jsonl:<glob>`, sorted by path."""
  pattern = os.path.expanduser(name.partition(":")[2])
  files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f"{key}={name!r}: the glob {pattern!r} matches no file")
  return files


def _is_tfds_name(base: str) -> bool:
  """Whether TFDS has a builder called `base`, asking no network (no community datasets)."""
  if base in tfds.list_builders(with_community_datasets=False):
    return True
  for package in _TFDS_TEXT_PACKAGES:
    # The package first; if its __init__ needs TensorFlow, the dataset's own module
    # (tensorflow_datasets.text.conll2003 registers conll2003 without TensorFlow).
    for module in (f"tensorflow_datasets.{package}", f"tensorflow_datasets.{package}.{base}"):
      try:
        importlib.import_module(module)
      except ImportError:
        continue
  return base in tfds.list_builders(with_community_datasets=False)


def validate_source(name: str, key: str = "data.name") -> None:
  """Raises a ValueError naming `key` unless `name` is a usable source; never downloads."""
  if name == "pystdlib":
    return
  if prepared.is_prepared(name):
    prepared.read_metadata(name, key)
    return
  if name.startswith(("text:", "jsonl:")):
    _local_files(name, key)
    return
  base, _, config = name.split(":", 1)[0].partition("/")
  if not base or not _is_tfds_name(base):
    raise ValueError(f"{key}={name!r}: unknown source; allowed: {ALLOWED_NAMES}")
  configs = [c.name for c in tfds.builder_cls(base).builder_configs.values()]
  if config and configs and config not in configs:
    raise ValueError(f"{key}={name!r}: {base!r} has no config {config!r}; allowed: {configs}")


class Piece(bytes):
  """A document's bytes, or a piece of them: `opens` (the document starts here) and `closes`
  (it ends here) say whether the piece gets the frame's prefix (BOS) and suffix (EOS)."""

  opens: bool = True
  closes: bool = True


class _FileSpans(Sequence[bytes]):
  """Documents (or pieces of them) that are byte ranges of files, read on access (a seek and
  a read of the range) so corpora stay on disk."""

  def __init__(
    self,
    paths: list[str],
    file_N: np.ndarray,
    start_N: np.ndarray,
    stop_N: np.ndarray,
    opens_N: np.ndarray | None = None,
    closes_N: np.ndarray | None = None,
  ):
    self._paths, self._file_N, self._start_N, self._stop_N = paths, file_N, start_N, stop_N
    whole_N = np.ones(len(file_N), bool)
    self._opens_N = whole_N if opens_N is None else opens_N
    self._closes_N = whole_N if closes_N is None else closes_N

  def __len__(self) -> int:
    return len(self._file_N)

  def __getitem__(self, index: int) -> bytes:
    start = int(self._start_N[index])
    with open(self._paths[self._file_N[index]], "rb") as f:
      f.seek(start)
      data = f.read(int(self._stop_N[index]) - start)
    if self._opens_N[index] and self._closes_N[index]:
      return data
    piece = Piece(data)
    piece.opens, piece.closes = bool(self._opens_N[index]), bool(self._closes_N[index])
    return piece

  def select(self, mask_N: np.ndarray) -> _FileSpans:
    return _FileSpans(
      self._paths,
      self._file_N[mask_N],
      self._start_N[mask_N],
      self._stop_N[mask_N],
      self._opens_N[mask_N],
      self._closes_N[mask_N],
    )


class _JsonlTexts(Sequence[str]):
  """The text field of JSONL records (kept as file spans, parsed on access)."""

  def __init__(self, spans: _FileSpans, field: str):
    self._spans, self._field = spans, field

  def __len__(self) -> int:
    return len(self._spans)

  def __getitem__(self, index: int) -> str:
    return json.loads(self._spans[index])[self._field]


class _TextField(Sequence):
  """One feature (the text) of a TFDS data source's examples."""

  def __init__(self, source: Sequence, field: str):
    self._source, self._field = source, field

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str | bytes:
    if not -len(self) <= index < len(self):
      raise IndexError(index)  # some sources (TFDS mocks) never raise, and `for` never ends
    return self._source[index][self._field]


_SCAN_BYTES = 1 << 24  # files are scanned for separators in chunks of 16 MiB
_CUT_WINDOW = 1024  # a span cut moves back to just after a newline within this many bytes


@functools.lru_cache(maxsize=64)
def _separated(path: str, separator: bytes, size: int, mtime: int) -> tuple[np.ndarray, np.ndarray]:
  """[start, stop) of each document of a file: the text between separators (which are
  dropped), or the whole file when `separator` is empty. Streamed in chunks, never read whole;
  cached per file version (`size`, `mtime`: the train and validation splits scan once)."""
  if not separator:
    return np.array([0], np.int64), np.array([size], np.int64)
  hits, carry, base = [], b"", 0  # base: the file offset of buf[0]
  with open(path, "rb") as f:
    while chunk := f.read(_SCAN_BYTES):
      buf = carry + chunk
      found, at = [], buf.find(separator)
      while at >= 0:
        found.append(at)
        at = buf.find(separator, at + len(separator))
      hits.append(base + np.array(found, np.int64))
      # The next chunk starts with the tail a separator could straddle (never a found one).
      free = len(buf) - (found[-1] + len(separator) if found else 0)
      keep = min(len(separator) - 1, free)
      carry, base = buf[len(buf) - keep :], base + len(buf) - keep
  at_N = np.concatenate(hits) if hits else np.zeros(0, np.int64)
  return np.concatenate([[0], at_N + len(separator)]), np.concatenate([at_N, [size]])


def _cut(f, start: int, stop: int, span: int) -> int:
  """Where a piece starting at `start` of a document ending at `stop` ends: `span` bytes on,
  moved back to just after the last newline of the `_CUT_WINDOW` bytes before that, else to
  the start of a UTF-8 character (so no character is split across pieces)."""
  end = start + span
  if end >= stop:
    return stop
  window = min(_CUT_WINDOW, span // 2)
  f.seek(end - window)
  tail = f.read(window + 1)  # the window, then the byte at `end`
  newline = tail.rfind(b"\n", 0, window)
  if newline >= 0:
    return end - window + newline + 1
  for back in range(min(4, window + 1)):  # a UTF-8 character has at most 3 continuation bytes
    if tail[window - back] & 0xC0 != 0x80:
      return end - back
  return end  # not UTF-8 here: cut anywhere


def _bounded(path: str, start_N, stop_N, opens_N, closes_N, span: int) -> list[np.ndarray]:
  """The documents cut into pieces of at most `span` bytes; only the long ones need reads."""
  columns = [start_N, stop_N, opens_N, closes_N]
  long_N = np.flatnonzero(stop_N - start_N > span)
  if not len(long_N):
    return columns
  parts, done = [], 0  # runs of short documents as they are, long ones as their pieces
  with open(path, "rb") as f:
    for i in long_N:
      parts.append([c[done:i] for c in columns])
      starts, stops = [int(start_N[i])], []
      while (end := _cut(f, starts[-1], int(stop_N[i]), span)) < stop_N[i]:
        stops.append(end)
        starts.append(end)
      stops.append(int(stop_N[i]))
      opens = [bool(opens_N[i])] + [False] * (len(starts) - 1)
      closes = [False] * (len(starts) - 1) + [bool(closes_N[i])]
      parts.append([np.array(starts), np.array(stops), np.array(opens), np.array(closes)])
      done = i + 1
  parts.append([c[done:] for c in columns])
  return [np.concatenate([p[k] for p in parts]) for k in range(4)]


def _text_spans(files: list[str], split: str, separator: str = "", span: int = 0) -> _FileSpans:
  """Documents of local text files (split at `separator`, else one per file), cut into pieces
  of at most `span` bytes (0: uncut); validation is the last 10% of the concatenated bytes,
  where a document straddling the cut becomes two (each framed whole, as before pieces)."""
  size_N = np.array([os.path.getsize(f) for f in files], dtype=np.int64)
  end_N = np.cumsum(size_N)
  total = int(end_N[-1])
  lo, hi = {
    "train": (0, total - total // _HELD_OUT_FRACTION),
    "validation": (total - total // _HELD_OUT_FRACTION, total),
    "all": (0, total),
  }[split]
  parts = []  # per file: (file index, start, stop, opens, closes) of its documents' pieces
  for i, path in enumerate(files):
    begin = int(end_N[i] - size_N[i])  # the file's offset in the concatenation
    if begin >= hi or begin + size_N[i] <= lo:
      continue
    mtime = os.stat(path).st_mtime_ns
    doc_start_N, doc_stop_N = _separated(path, separator.encode(), int(size_N[i]), mtime)
    # Clip each document's [start, stop) to the split's [lo, hi), in file offsets.
    start_N = np.clip(doc_start_N, lo - begin, hi - begin)
    stop_N = np.clip(doc_stop_N, lo - begin, hi - begin)
    kept_N = stop_N > start_N
    start_N, stop_N = start_N[kept_N], stop_N[kept_N]
    whole_N = np.ones(len(start_N), bool)  # the split's cut makes two documents of one
    columns = [start_N, stop_N, whole_N, whole_N]
    if span:
      columns = _bounded(path, *columns, span)
    parts.append([np.full(len(columns[0]), i), *columns])
  if not parts:
    return _FileSpans(files, *(np.zeros(0, np.int64) for _ in range(3)))
  file_N, start_N, stop_N, opens_N, closes_N = (np.concatenate(c) for c in zip(*parts, strict=True))
  return _FileSpans(files, file_N, start_N, stop_N, opens_N.astype(bool), closes_N.astype(bool))


def jsonl_lines(path: str, key: str, name: str):
  """(line number, start byte, end byte, parsed record) for each non-blank line; a line that
  is not JSON, or not a JSON object, is refused naming `key`, the file and the line."""
  offset = 0
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      start, offset = offset, offset + len(line)
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{key}={name!r}: {path}:{line_no}: not valid JSON ({e})") from e
      if not isinstance(record, dict):
        raise ValueError(f"{key}={name!r}: {path}:{line_no}: not a JSON object")
      yield line_no, start, offset, record


def _jsonl_spans(files: list[str], field: str, split: str, key: str, name: str) -> _FileSpans:
  """One span per non-blank line; every line is parsed once here so errors surface early."""
  file_idx, starts, stops = [], [], []
  for i, path in enumerate(files):
    for line_no, start, offset, record in jsonl_lines(path, key, name):
      if not isinstance(record.get(field), str):
        raise ValueError(
          f"{key}={name!r}: {path}:{line_no}: no string field {field!r} (data.text_field={field!r})"
        )
      if record[field]:
        file_idx.append(i)
        starts.append(start)
        stops.append(offset)
      else:
        file_idx.append(-1)  # empty text: counts for the split, then dropped
        starts.append(0)
        stops.append(0)
  n = len(file_idx)
  cut = n - n // _HELD_OUT_FRACTION
  lo, hi = {"train": (0, cut), "validation": (cut, n), "all": (0, n)}[split]
  file_N = np.array(file_idx[lo:hi], dtype=np.int64)
  spans = _FileSpans(files, file_N, np.array(starts[lo:hi]), np.array(stops[lo:hi]))
  return spans.select(file_N >= 0)


def tfds_split(
  name: str, split: str, data_cfg: ml_collections.ConfigDict, key: str, fields: dict[str, str]
) -> Sequence:
  """A TFDS split (prepared on first use) as a random-access source of example dicts.

  `fields` maps config keys to the feature names they give; each must be a feature.
  Split "validation" (and "all") is `data.eval_split` if set, else "validation", falling
  back to "test" when the dataset has no validation split.
  """
  validate_source(name, key)  # registers builders that need importing (glue, conll2003)
  builder = tfds_builder(name, data_cfg.tfds_data_dir, key)
  available = list(builder.info.splits.keys())  # empty under tfds.testing.mock_data
  if split in ("validation", "all") and data_cfg.get("eval_split"):
    split = data_cfg.eval_split
    for part in split.split("+"):  # TFDS split syntax: 'validation+test', 'test[:50%]'
      part = part.split("[")[0].strip()
      if available and part not in available:
        raise ValueError(
          f"data.eval_split={split!r}: {name!r} has no split {part!r}; allowed: {available}, "
          "joined with '+'"
        )
  else:
    if split == "all":
      split = "validation"
    if split == "validation" and available and "validation" not in available:
      split = "test"
    if available and split not in available:
      raise ValueError(f"{key}={name!r}: no {split!r} split; the dataset has {available}")
  features = builder.info.features
  for config_key, feature in fields.items():
    if features is not None and feature not in features:
      raise ValueError(
        f"{config_key}={feature!r}: not a feature of {name!r}; allowed: {sorted(features.keys())}"
      )
  return builder.as_data_source(split=split)


def tfds_builder(name: str, data_dir: str, key: str):
  """The prepared TFDS builder of `name` in `data_dir` (empty: TFDS's default). A local dir
  gets it prepared on first use (`download_and_prepare`); a bucket (gs://...) is only read:
  a dataset missing there is an error saying how to prepare it, never a local download."""
  builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
  if builder.is_prepared():
    return builder
  if "://" in data_dir:
    raise ValueError(
      f"data.tfds_data_dir={data_dir!r}: {key}={name!r} is not prepared there (no "
      f"{builder.data_dir}); a bucket is read, never prepared into. Prepare it once on a "
      f"machine with the disk for it: `tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record`, or in Python tfds.builder({name!r}, data_dir="
      f"{data_dir!r}).download_and_prepare(file_format='array_record')"
    )
  start = time.perf_counter()
  builder.download_and_prepare(file_format="array_record")
  logging.info("Prepared %s in %s in %.1f s", name, builder.data_dir, time.perf_counter() - start)
  return builder


def tfds_dataset(name: str) -> str | None:
  """The TFDS dataset a valid `data.name` reads (pystdlib: its builder), or None (files)."""
  if name == "pystdlib":
    return f"pystdlib/py{pystdlib.PY_VERSION}"
  return name if _is_tfds_name(name.split(":", 1)[0].partition("/")[0]) else None


def _tfds_documents(
  name: str, split: str, data_cfg: ml_collections.ConfigDict, key: str
) -> Sequence:
  """A TFDS split as a sequence of its text field."""
  source = tfds_split(name, split, data_cfg, key, {"data.text_field": data_cfg.text_field})
  return _TextField(source, data_cfg.text_field)


def eval_split(config: ml_collections.ConfigDict) -> str:
  """The split evaluation reads: "all" of data.eval_name when it is set, else data.name's
  "validation" split."""
  return "all" if config.data.eval_name else "validation"


def load_documents(name: str, split: str, data_cfg: ml_collections.ConfigDict) -> Sequence:
  """Random-access documents (`str` or `bytes`) of source `name`, split train/validation/all."""
  key = _key_for(split)
  if split not in SPLITS:
    raise ValueError(f"split={split!r} for {key}={name!r}: allowed {list(SPLITS)}")
  validate_source(name, key)
  if prepared.is_prepared(name):
    raise ValueError(
      f"{key}={name!r}: holds packed pretraining rows, not documents; allowed here: a source"
      " of documents (pystdlib, text:<glob>, jsonl:<glob> or a TFDS dataset)"
    )
  if name.startswith("text:"):
    files = _local_files(name, key)
    docs: Sequence = _text_spans(files, split, data_cfg.doc_separator, data_cfg.span_bytes)
  elif name.startswith("jsonl:"):
    files = _local_files(name, key)
    docs = _JsonlTexts(
      _jsonl_spans(files, data_cfg.text_field, split, key, name), data_cfg.text_field
    )
  else:
    tfds_name = f"pystdlib/py{pystdlib.PY_VERSION}" if name == "pystdlib" else name
    docs = _tfds_documents(tfds_name, split, data_cfg, key)
  if len(docs) == 0:
    local = name.startswith(("text:", "jsonl:")) and split != "all"
    hint = " (local sources hold out their last 10% for validation)" if local else ""
    raise ValueError(f"{key}={name!r}: the {split!r} split has no non-empty document{hint}")
  return docs
