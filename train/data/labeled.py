"""Labeled examples for fine-tuning encoders: one example per row, not packed.

Sources: a TFDS dataset (`glue/sst2`, `glue/stsb`, `imdb_reviews`, ...) or local JSONL
(`jsonl:<glob>`, the last 10% of records are validation). Each example becomes

  [CLS] text [SEP]                      (single text)
  [CLS] text [SEP] text_pair [SEP]      (pairs: `task.text_pair_field` set)

with the tokenizer's [CLS] and [SEP] ids, padded to `data.seq_len` with its pad id. Longer examples are truncated, the longer text first, and
counted in the log. Rows carry `tokens`, `positions`, `segment_ids` (1 on tokens, 0 on
padding), `token_types` (0 first text, 1 second), `label` (int32 class, or float32
target for regression) and `weight` (1, or 0 on rows that only pad the last eval batch).

All examples are tokenized once, up front, into arrays (fine-tuning sets are small),
which also makes the truncation count exact and label errors immediate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from train.data import sources
from train.data.pipeline import check_process, check_shards, process_batches
from train.data.tokenizers import Tokenizer

_HELD_OUT_FRACTION = 10


def _jsonl_records(name: str, split: str, key: str) -> list[tuple[str, dict]]:
  """(where, record) for the split's records; `where` is `file:line`."""
  out = []
  for path in sources._local_files(name, key):
    for line_no, _, _, record in sources.jsonl_lines(path, key, name):
      out.append((f"{path}:{line_no}", record))
  cut = len(out) - len(out) // _HELD_OUT_FRACTION
  return {"train": out[:cut], "validation": out[cut:], "all": out}[split]


def _records(name: str, split: str, config: ml_collections.ConfigDict, fields: dict) -> Sequence:
  key = "data.eval_name" if split == "all" else "data.name"
  if name.startswith("jsonl:"):
    return _jsonl_records(name, split, key)
  if name == "pystdlib" or name.startswith("text:"):
    raise ValueError(
      f"{key}={name!r}: task.name={config.task.name!r} needs labeled examples: "
      "a TFDS dataset (glue/sst2, ...) or jsonl:<glob>"
    )
  source = sources.tfds_split(name, split, config.data, key, fields)
  return TfdsRecords(name, split, source)


class TfdsRecords(Sequence):
  """(where, record) of a TFDS split's examples, read on access; `where` names the example."""

  def __init__(self, name: str, split: str, source: Sequence):
    self.name, self.split, self.source = name, split, source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> tuple[str, dict]:
    if not 0 <= index < len(self):
      raise IndexError(index)  # TFDS mocks never raise, and iteration would not end
    return f"{self.name} {self.split} example {index}", self.source[index]


def _text(value, where: str = "", field: str = "") -> str:
  """A text value (TFDS gives bytes or 0-d arrays); anything else is an error naming it."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {field!r} is {value!r}, not text")
  return value


def _truncate(a_N: np.ndarray, b_N: np.ndarray | None, room: int) -> tuple:
  """Drops tokens from the end of the longer text until both fit in `room`."""
  la, lb = len(a_N), 0 if b_N is None else len(b_N)
  while la + lb > room:
    if la >= lb:
      la -= 1
    else:
      lb -= 1
  return a_N[:la], (None if b_N is None else b_N[:lb])


def encode_rows(
  texts: list[tuple], tokenizer: Tokenizer, seq_len: int
) -> tuple[dict[str, np.ndarray], int]:
  """[(text, text_pair or None)] -> (row arrays, how many were truncated)."""
  n = len(texts)
  cls, sep = _cls_sep(tokenizer)
  tokens = np.zeros((n, seq_len), np.int32)
  types = np.zeros((n, seq_len), np.int32)
  lengths = np.zeros(n, np.int32)
  truncated = 0
  for i, (a, b) in enumerate(texts):
    a_N = tokenizer.encode(a)
    b_N = None if b is None else tokenizer.encode(b)
    room = seq_len - (2 if b_N is None else 3)
    if room < 2:
      raise ValueError(f"data.seq_len={seq_len}: too short for [CLS] text [SEP] rows")
    if len(a_N) + (0 if b_N is None else len(b_N)) > room:
      truncated += 1
      a_N, b_N = _truncate(a_N, b_N, room)
    row = [cls, *a_N, sep]
    tokens[i, : len(row)] = row
    lengths[i] = len(row)
    if b_N is not None:
      tokens[i, len(row) : len(row) + len(b_N) + 1] = [*b_N, sep]
      types[i, len(row) : len(row) + len(b_N) + 1] = 1
      lengths[i] += len(b_N) + 1
  return _row_arrays(tokens, types, lengths, tokenizer.specials.pad), truncated


def _cls_sep(tokenizer: Tokenizer) -> tuple[int, int]:
  """The tokenizer's [CLS] and [SEP] ids, which every labeled row needs."""
  why = "a labeled example's [CLS] text [SEP] row"
  return tokenizer.specials.require("cls", why), tokenizer.specials.require("sep", why)


def _row_arrays(
  tokens: np.ndarray, types: np.ndarray, lengths: np.ndarray, pad: int
) -> dict[str, np.ndarray]:
  """Rows of one example each, the first `lengths` tokens real: segment 1 on them, 0 on the
  padding (which gets the id `pad`); positions 0.."""
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  segment_ids = (positions < lengths[:, None]).astype(np.int32)
  tokens = np.where(segment_ids > 0, tokens, pad).astype(np.int32)
  return {
    "tokens": tokens,
    "token_types": types,
    "segment_ids": segment_ids,
    "positions": positions * segment_ids,
  }


def load_labeled(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, regression: bool
) -> dict[str, np.ndarray]:
  """All examples of the split as row arrays plus `label` and `weight`."""
  d, t = config.data, config.task
  name = d.eval_name if split == "all" else d.name
  fields = {"data.text_field": d.text_field, "task.label_field": t.label_field}
  if t.text_pair_field:
    fields["task.text_pair_field"] = t.text_pair_field
  texts, labels = [], []
  for where, record in _records(name, split, config, fields):
    for key, field in fields.items():
      if field not in record:
        raise ValueError(f"{where}: no field {field!r} ({key}={field!r})")
    label = record[t.label_field]
    if isinstance(label, np.ndarray) and label.ndim == 0:
      label = label.item()  # TFDS (and its mocks) may give 0-d arrays
    if regression:
      try:
        label = float(label)
      except (TypeError, ValueError):
        raise ValueError(
          f"{where}: label {label!r} is not a number (task.name='regress')"
        ) from None
    elif (
      isinstance(label, bool)
      or not isinstance(label, int | np.integer)
      or not (0 <= label < t.num_labels)
    ):
      raise ValueError(
        f"{where}: label {label!r} is not a class id in [0, {t.num_labels}) "
        f"(task.num_labels={t.num_labels}, task.label_field={t.label_field!r})"
      )
    pair = _text(record[t.text_pair_field], where, t.text_pair_field) if t.text_pair_field else None
    texts.append((_text(record[d.text_field], where, d.text_field), pair))
    labels.append(label)
  if not texts:
    raise ValueError(f"data.name={name!r}: the {split!r} split has no examples")
  rows, truncated = encode_rows(texts, tokenizer, d.seq_len)
  if truncated:
    logging.warning(
      "%s %s: %d of %d examples are longer than data.seq_len=%d and were truncated",
      name,
      split,
      truncated,
      len(texts),
      d.seq_len,
    )
  rows["label"] = np.asarray(labels, np.float32 if regression else np.int32)
  rows["weight"] = np.ones(len(texts), np.float32)
  return rows


class _Rows(Sequence):
  """Row i of a dict of equal-length arrays, as a dict."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {k: v[i] for k, v in self.arrays.items()}


def labeled_train_iterator(
  rows: dict[str, np.ndarray],
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shards: int = 1,
) -> grain.DatasetIterator:
  """Infinite, reshuffled every epoch, checkpointable. Examples are dealt as pretraining's
  documents are (`process_batches`): example k goes to shard k % `shards` (data.shards), and
  each process keeps its rows of the global batch, so the batches do not depend on the
  process count."""
  check_process(process_index, process_count)
  check_shards(shards, batch_size * process_count)
  examples = grain.MapDataset.source(_Rows(rows))

  def shard_batches(k: int, size: int) -> grain.DatasetIterator:
    mine = examples[k::shards]
    if len(mine) < size:
      raise ValueError(
        f"train.batch_size: {len(mine)} training examples (shard {k} of data.shards={shards}) "
        f"cannot fill its {size} rows of each global batch"
      )
    batches = mine.shuffle(seed=seed).repeat().batch(size, drop_remainder=True)
    # The rows are in memory and a batch is one gather: no prefetch threads, no buffer.
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

  return process_batches(shard_batches, shards, batch_size, process_index, process_count)


def labeled_eval_batches(
  rows: dict[str, np.ndarray],
  *,
  batch_size: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order; each process takes its rows of each global batch; the
  last batch is padded with weight-0 rows."""
  check_process(process_index, process_count)
  n = len(rows["weight"])
  global_size = batch_size * process_count
  count = -(-n // global_size)
  if max_batches:
    count = min(count, max_batches)
  for b in range(count):
    start = b * global_size + process_index * batch_size
    idx = np.arange(start, start + batch_size)
    real = idx < n
    batch = {k: v[np.where(real, idx, 0)] for k, v in rows.items()}
    batch["weight"] = batch["weight"] * real
    for key in [k for k in batch if k.startswith("segment_ids")]:
      batch[key] = batch[key] * real[:, None]
    yield batch


def tag_names(config: ml_collections.ConfigDict, name: str = "") -> list[str]:
  """Tag names from `task.tag_names`, else the TFDS feature's ClassLabel names."""
  t = config.task
  name = name or config.data.name
  if t.tag_names:
    return [n.strip() for n in t.tag_names.split(",")]
  if not name.startswith("jsonl:"):
    import tensorflow_datasets as tfds

    sources.validate_source(name)  # registers builders that need importing (conll2003)
    feature = tfds.builder(name).info.features[t.label_field]
    names = getattr(getattr(feature, "feature", None), "names", None)
    if names:
      return list(names)
  raise ValueError(
    f"task.tag_names='': give the tag names (comma-separated, e.g. 'O,B-PER,I-PER') for "
    f"data.name={name!r}"
  )


def encode_words(
  words: list[str], tag_ids: list[int], tokenizer: Tokenizer, seq_len: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """[CLS] word word ... [SEP] with each word's tag on its first piece (-1 elsewhere).

  Byte-level tokenizers get a space between words; SentencePiece marks word starts
  itself. Returns (ids, labels, words kept); words past `seq_len` are dropped.
  """
  cls_id, sep_id = _cls_sep(tokenizer)
  ids, labels, kept = [cls_id], [-1], 0
  space = list(tokenizer.encode(" ")) if tokenizer.is_byte_level else []
  for i, (word, tag) in enumerate(zip(words, tag_ids, strict=True)):
    pieces = list(tokenizer.encode(word)) or list(tokenizer.encode("?"))
    sep = space if i else []
    if len(ids) + len(sep) + len(pieces) + 1 > seq_len:
      break
    ids += sep + pieces
    labels += [-1] * len(sep) + [tag] + [-1] * (len(pieces) - 1)
    kept += 1
  return np.asarray(ids + [sep_id], np.int32), np.asarray(labels + [-1], np.int32), kept


def load_tagged(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str
) -> dict[str, np.ndarray]:
  """Token-classification examples (words + one tag per word) as row arrays with
  per-token `labels` (-1: not a word's first piece) and `words` (tags of words dropped by
  truncation are counted, as `dropped`, so the metric can count them as missed)."""
  d, t = config.data, config.task
  name = d.eval_name if split == "all" else d.name
  fields = {"task.tokens_field": t.tokens_field, "task.label_field": t.label_field}
  names = tag_names(config, name)
  index = {n: i for i, n in enumerate(names)}
  seq_len = d.seq_len
  if seq_len < 3:
    raise ValueError(f"data.seq_len={seq_len}: too short for [CLS] word [SEP] rows")
  rows = {k: [] for k in ("tokens", "labels", "lengths")}
  dropped_tags, truncated = [], 0
  for where, record in _records(name, split, config, fields):
    for key, field in fields.items():
      if field not in record:
        raise ValueError(f"{where}: no field {field!r} ({key}={field!r})")
    words = [_text(w, where, t.tokens_field) for w in record[t.tokens_field]]
    tags = list(record[t.label_field])
    if len(words) != len(tags):
      raise ValueError(f"{where}: {len(words)} words but {len(tags)} tags")
    tag_ids = []
    for tag in tags:
      if isinstance(tag, np.ndarray) and tag.ndim == 0:
        tag = tag.item()
      if isinstance(tag, bytes | str):
        tag = _text(tag, where, t.label_field)
      elif isinstance(tag, int | np.integer) and not isinstance(tag, bool):
        tag = int(tag)
      else:
        raise ValueError(f"{where}: tag {tag!r} is neither a tag name nor an integer tag id")
      if isinstance(tag, str) and tag not in index:
        raise ValueError(f"{where}: tag {tag!r} is not one of task.tag_names {names}")
      if isinstance(tag, int) and not 0 <= tag < len(names):
        raise ValueError(f"{where}: tag id {tag} is outside [0, {len(names)}) ({names})")
      tag_ids.append(index[tag] if isinstance(tag, str) else tag)
    ids, labels, kept = encode_words(words, tag_ids, tokenizer, seq_len)
    truncated += kept < len(words)
    dropped_tags.append(tag_ids[kept:])
    rows["tokens"].append(np.pad(ids, (0, seq_len - len(ids))))
    rows["lengths"].append(len(ids))
    rows["labels"].append(np.pad(labels, (0, seq_len - len(labels)), constant_values=-1))
  if not rows["tokens"]:
    raise ValueError(f"data.name={name!r}: the {split!r} split has no examples")
  if truncated:
    logging.warning(
      "%s %s: %d of %d sentences are longer than data.seq_len=%d; their last words are "
      "dropped and counted as missed entities",
      name,
      split,
      truncated,
      len(dropped_tags),
      seq_len,
    )
  tokens = np.stack(rows["tokens"])
  n = len(tokens)
  # Dropped words' tags travel with the rows (padded with -1) for the entity-level metric.
  width = max(1, max(len(x) for x in dropped_tags))
  dropped = np.full((n, width), -1, np.int32)
  for i, tags in enumerate(dropped_tags):
    dropped[i, : len(tags)] = tags
  return {
    **_row_arrays(
      tokens, np.zeros_like(tokens), np.asarray(rows["lengths"]), tokenizer.specials.pad
    ),
    "labels": np.stack(rows["labels"]),
    "dropped": dropped,
    "weight": np.ones(n, np.float32),
  }


def load_pairs(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str
) -> dict[str, np.ndarray]:
  """Text pairs for sentence embeddings: rows for the first texts (`tokens`, ...) and the
  second (`tokens_b`, ...), and `label` (the pair's score, if `task.label_field` is set).

  Training keeps the pairs scored at least `task.min_score` (positives); evaluation keeps
  every scored pair, for the correlation of cosine similarity with the score.
  """
  d, t = config.data, config.task
  name = d.eval_name if split == "all" else d.name
  if not t.text_pair_field:
    raise ValueError("task.text_pair_field='': task.name='embed' needs text pairs")
  fields = {"data.text_field": d.text_field, "task.text_pair_field": t.text_pair_field}
  if t.label_field:
    fields["task.label_field"] = t.label_field
  training = split == "train"
  firsts, seconds, scores = [], [], []
  for where, record in _records(name, split, config, fields):
    for key, field in fields.items():
      if field not in record:
        raise ValueError(f"{where}: no field {field!r} ({key}={field!r})")
    score = float("nan")
    if t.label_field:
      try:
        score = float(record[t.label_field])
      except (TypeError, ValueError):
        score = float("nan")
      if not np.isfinite(score):
        raise ValueError(f"{where}: score {record[t.label_field]!r} is not a finite number")
      if training and score < t.min_score:
        continue
    elif not training:
      raise ValueError("task.label_field='': evaluating embeddings needs scored pairs")
    firsts.append((_text(record[d.text_field], where, d.text_field), None))
    seconds.append((_text(record[t.text_pair_field], where, t.text_pair_field), None))
    scores.append(score)
  if not firsts:
    raise ValueError(
      f"data.name={name!r}: the {split!r} split has no pairs (task.min_score={t.min_score})"
    )
  rows, truncated = encode_rows(firsts, tokenizer, d.seq_len)
  rows_b, truncated_b = encode_rows(seconds, tokenizer, d.seq_len)
  if truncated or truncated_b:
    logging.warning(
      "%s %s: %d of %d texts are longer than data.seq_len=%d and were truncated",
      name,
      split,
      truncated + truncated_b,
      2 * len(firsts),
      d.seq_len,
    )
  rows.update({f"{k}_b": v for k, v in rows_b.items()})
  rows["label"] = np.asarray(scores, np.float32)
  rows["weight"] = np.ones(len(firsts), np.float32)
  return rows
