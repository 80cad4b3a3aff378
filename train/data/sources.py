"""Document sources: TFDS datasets, the embedded `pystdlib`, local text and JSONL files.

`load_documents` returns a random-access sequence of documents (`str` or `bytes`) that
grain's `MapDataset.source` accepts. Shuffling and sharding happen in `pipeline.py`.
Local sources hold out their last 10% for validation; split `"all"` (used for
`data.eval_name`) is the whole local source, or a TFDS dataset's validation split.
Evaluation reads `data.eval_split` of a TFDS dataset instead when it is set
(`validation+test`: TFDS's split syntax); local sources have no named splits to choose.
"""

from __future__ import annotations

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

from train.data import pystdlib

SPLITS = ("train", "validation", "all")
ALLOWED_NAMES = (
  "'pystdlib', 'text:<glob>', 'jsonl:<glob>' or a TFDS dataset name"
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
  if name.startswith(("text:", "jsonl:")):
    _local_files(name, key)
    return
  base, _, config = name.split(":", 1)[0].partition("/")
  if not base or not _is_tfds_name(base):
    raise ValueError(f"{key}={name!r}: unknown source; allowed: {ALLOWED_NAMES}")
  configs = [c.name for c in tfds.builder_cls(base).builder_configs.values()]
  if config and configs and config not in configs:
    raise ValueError(f"{key}={name!r}: {base!r} has no config {config!r}; allowed: {configs}")


class _FileSpans(Sequence[bytes]):
  """Documents that are byte ranges of files, read on access so corpora stay on disk."""

  def __init__(self, paths: list[str], file_N: np.ndarray, start_N: np.ndarray, stop_N: np.ndarray):
    self._paths, self._file_N, self._start_N, self._stop_N = paths, file_N, start_N, stop_N

  def __len__(self) -> int:
    return len(self._file_N)

  def __getitem__(self, index: int) -> bytes:
    start = int(self._start_N[index])
    with open(self._paths[self._file_N[index]], "rb") as f:
      f.seek(start)
      return f.read(int(self._stop_N[index]) - start)

  def select(self, mask_N: np.ndarray) -> _FileSpans:
    return _FileSpans(
      self._paths, self._file_N[mask_N], self._start_N[mask_N], self._stop_N[mask_N]
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


def _text_spans(files: list[str], split: str) -> _FileSpans:
  """Each file is a document; validation is the last 10% of the concatenated bytes."""
  size_N = np.array([os.path.getsize(f) for f in files], dtype=np.int64)
  end_N = np.cumsum(size_N)
  begin_N = end_N - size_N
  total = int(end_N[-1])
  lo, hi = {
    "train": (0, total - total // _HELD_OUT_FRACTION),
    "validation": (total - total // _HELD_OUT_FRACTION, total),
    "all": (0, total),
  }[split]
  # Clip each file's [begin, end) in the concatenation to [lo, hi), back to file offsets.
  start_N = np.clip(begin_N, lo, hi) - begin_N
  stop_N = np.clip(end_N, lo, hi) - begin_N
  spans = _FileSpans(files, np.arange(len(files)), start_N, stop_N)
  return spans.select(stop_N > start_N)


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
  builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None, file_format="array_record")
  if not builder.is_prepared():
    start = time.perf_counter()
    builder.download_and_prepare(file_format="array_record")
    logging.info("Prepared %s in %s in %.1f s", name, builder.data_dir, time.perf_counter() - start)
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
  if name.startswith("text:"):
    docs: Sequence = _text_spans(_local_files(name, key), split)
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
