"""Packed, batched token streams for training and evaluation, built with grain.

Documents are tokenized, framed (by default as the tokenizer's model frames a document:
[BOS when it adds one] ... EOS), concatenated and cut into rows of `data.seq_len` tokens
(`ConcatThenSplitIterDataset`). Every batch is a dict of int32 `[batch, seq_len]` arrays:

  tokens       token ids, 0 after the last document of a padded row
  segment_ids  1, 2, ... for the documents (or document pieces) of a row; 0 is padding
  positions    position within the document piece, 0 at each piece's start

The training iterator is infinite and checkpointable (`get_state` / `set_state`, JSON
state): document order is reshuffled every epoch, rows are shuffled within a window.
Prepared shards (`arrayrecord:DIR`, train/data/prepared.py) hold rows already packed: they
are shuffled globally each epoch and dealt to the processes instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from modeling.vocab import Specials
from train.data import prepared
from train.data.sources import load_documents
from train.data.tokenizers import Tokenizer


def _check_cfg(data_cfg: ml_collections.ConfigDict, batch_size: int) -> None:
  """Clear errors for sizes grain would reject late or obscurely."""
  if data_cfg.seq_len < 1:
    raise ValueError(f"data.seq_len={data_cfg.seq_len}: allowed: a positive integer")
  if data_cfg.shuffle_window < 1:
    raise ValueError(f"data.shuffle_window={data_cfg.shuffle_window}: allowed: a positive integer")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: allowed: a positive integer")


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(
      f"process_index={process_index}, process_count={process_count}:"
      " allowed 0 <= process_index < process_count"
    )


# (prefix ids, suffix ids) put around each document before packing
Frame = tuple[tuple[int, ...], tuple[int, ...]]


def document_frame(specials: Specials) -> Frame:
  """A document as the tokenizer's model sees one: BOS first when it adds one (Llama),
  EOS last."""
  eos = specials.require("eos", "ending each document")
  return ((specials.bos,) if specials.add_bos else (), (eos,))


def cls_sep(specials: Specials) -> Frame:
  """An encoder's text: [CLS] ... [SEP]."""
  why = "an encoder's [CLS] ... [SEP] framing"
  return ((specials.require("cls", why),), (specials.require("sep", why),))


def _tokenized_docs(
  docs: grain.MapDataset, tokenizer: Tokenizer, frame: Frame | None = None
) -> grain.MapDataset:
  """Each document as `{"tokens": prefix + ids + suffix}` (the family's frame, by default
  `document_frame`; encoders wrap documents in CLS ... SEP); empty documents are dropped."""
  if frame is None:
    frame = document_frame(tokenizer.specials)
  prefix, suffix = (np.asarray(ids, np.int32) for ids in frame)

  none = np.zeros(0, np.int32)

  def tokenize(doc: str | bytes) -> dict[str, np.ndarray] | None:
    ids_N = tokenizer.encode(doc).astype(np.int32)
    if not len(ids_N):
      return None
    # A piece of a long document (sources.Piece) is framed only where the document starts/ends.
    head = prefix if getattr(doc, "opens", True) else none
    tail = suffix if getattr(doc, "closes", True) else none
    return {"tokens": np.concatenate([head, ids_N, tail])}

  return docs.map(tokenize).filter(lambda example: example is not None)


def _packed_rows(docs: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concatenates the documents and cuts rows of `seq_len` tokens with segment ids, positions."""
  packed = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct={"tokens": seq_len})
  return packed.map(
    lambda row: {
      "tokens": row["tokens"],
      "segment_ids": row["tokens_segment_ids"],
      "positions": row["tokens_positions"],
    }
  )


def packed_documents(
  docs: Sequence, tokenizer: Tokenizer, seq_len: int, frame: Frame | None = None
) -> grain.IterDataset:
  """The documents in their order (no shuffling), tokenized, framed and packed into rows:
  what evaluation reads, and what `train.data.prepare` writes for each range of documents."""
  tokenized = _tokenized_docs(grain.MapDataset.source(docs), tokenizer, frame).to_iter_dataset()
  return _packed_rows(tokenized, seq_len)


def first_fit(
  examples: grain.IterDataset, lengths: dict[str, int], bins: int, seed: int
) -> grain.IterDataset:
  """First-fit packing of whole examples (dicts of 1-D arrays) into rows of `lengths`: each
  key `k` gives `k`, `k_segment_ids` and `k_positions`, all int32. `bins` rows are open at
  once; an example never splits across rows."""
  packed = grain.experimental.FirstFitPackIterDataset(
    examples, length_struct=lengths, num_packing_bins=bins, seed=seed, shuffle_bins=False
  )
  return packed.map(lambda row: {k: v.astype(np.int32) for k, v in row.items()})


def _json_state_to_grain(state: Any) -> Any:
  """Undoes what a JSON round trip does to grain's packing state.

  `ConcatThenSplitIterDataset` marks "no remainder" with the tuple (-1, -1) and compares
  with `!=`, so the list that JSON gives back reads as a pending remainder: the restored
  iterator skips a document. Grain's own Orbax handler round-trips states through JSON.
  """
  if isinstance(state, dict):
    return {
      k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _json_state_to_grain(v)
      for k, v in state.items()
    }
  return state


class ShardedBatches(grain.DatasetIterator):
  """This process's rows of its shards' batches (`rows[i]` of shard `i`'s, default all),
  concatenated in shard order, restorable from JSON.

  The state is one grain state per shard, after a JSON round trip as well.
  """

  def __init__(self, parents, rows: list[slice] | None = None):
    super().__init__(parents)
    self._rows = rows or [slice(None)] * len(self._parents)

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(p) for p in self._parents]
    parts = [{k: v[rows] for k, v in p.items()} for p, rows in zip(parts, self._rows, strict=True)]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [p.get_state() for p in self._parents]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state.get("shards", ())) != len(self._parents):
      raise ValueError(
        f"data iterator state holds {len(state.get('shards', ()))} shards, this process reads "
        f"{len(self._parents)}: resume with the same data.shards, train.batch_size and process "
        "count"
      )
    for p, s in zip(self._parents, state["shards"], strict=True):
      p.set_state(_json_state_to_grain(s))


def _shard_batches(
  docs,
  shard: int,
  num_shards: int,
  data_cfg,
  tokenizer: Tokenizer,
  rows: int,
  seed: int,
  frame,
  rows_fn=None,
) -> grain.DatasetIterator:
  """Infinite batches of `rows` packed rows from documents shard, shard + num_shards, ..."""
  mine = grain.MapDataset.source(docs)[shard::num_shards]
  if len(mine) == 0:
    raise ValueError(
      f"data.shards={num_shards}: data.name={data_cfg.name!r} has {len(docs)} documents (text"
      f" files: pieces of at most data.span_bytes), too few to fill {num_shards} shards;"
      " allowed: at most as many shards as documents (1: one stream every process reads)"
    )
  epochs = mine.shuffle(seed=seed).repeat()
  tokenized = _tokenized_docs(epochs, tokenizer, frame).to_iter_dataset()
  if rows_fn is None:
    packed = _packed_rows(tokenized, data_cfg.seq_len)
  else:
    packed = rows_fn(tokenized, seed + 7919 * shard)
  packed = grain.experimental.WindowShuffleIterDataset(
    packed, window_size=data_cfg.shuffle_window, seed=seed
  )
  batches = packed.batch(rows, drop_remainder=True)
  # Fail instead of spinning forever when (nearly) every document is empty.
  options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=1.0)
  return iter(grain.experimental.WithOptionsIterDataset(batches, options))


def train_iterator(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  frame: Frame | None = None,
  rows_fn=None,
) -> grain.DatasetIterator:
  """Infinite packed training batches of this process's `batch_size` rows.

  `rows_fn(documents, seed)`, if given, turns the stream of tokenized documents into the
  rows instead of packing them (T5's span corruption, `train/data/seq2seq.py`).

  The documents are split into `data.shards` shards, document k going to shard k % shards,
  each packed into its own stream. A global batch (`batch_size` x processes rows) is the
  concatenation of every shard's next `global / shards` rows, in shard order; each process
  takes its own consecutive `batch_size` rows of it, reading only the shards they come from.
  So the global batches never depend on the process count: with one shard (the default) every
  process packs the whole stream and keeps its rows; with a shard per process or more, each
  reads only its own. Within a shard every document's tokens appear once per epoch, in a new
  order each epoch.
  """
  _check_cfg(data_cfg, batch_size)
  check_process(process_index, process_count)
  check_shards(data_cfg.shards, batch_size * process_count)
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed}: allowed 0 <= seed < 2**32")
  if prepared.is_prepared(data_cfg.name):
    if rows_fn is not None:
      raise ValueError(
        f"data.name={data_cfg.name!r}: holds packed rows, not documents to make rows of"
      )
    return _prepared_batches(data_cfg, batch_size, seed, process_index, process_count)
  docs = load_documents(data_cfg.name, "train", data_cfg)

  def shard_batches(k: int, rows: int) -> grain.DatasetIterator:
    return _shard_batches(docs, k, data_cfg.shards, data_cfg, tokenizer, rows, seed, frame, rows_fn)

  return process_batches(shard_batches, data_cfg.shards, batch_size, process_index, process_count)


def process_batches(
  shard_batches, shards: int, batch_size: int, process_index: int, process_count: int
) -> ShardedBatches:
  """This process's `batch_size` consecutive rows of every global batch (`batch_size` x
  processes rows): each of the `shards` streams gives `global / shards` rows of it, in shard
  order, and only the shards this process's rows come from are built.
  `shard_batches(k, rows)`: shard k's infinite batches of `rows` rows. The global batches do
  not depend on the process count; pretraining and every fine-tuning iterator deal rows so."""
  check_process(process_index, process_count)
  global_rows = batch_size * process_count
  check_shards(shards, global_rows)
  per_shard = global_rows // shards
  lo, hi = process_index * batch_size, (process_index + 1) * batch_size  # this process's rows
  parents, rows = [], []
  for k in range(lo // per_shard, (hi - 1) // per_shard + 1):
    parents.append(shard_batches(k, per_shard))
    rows.append(slice(max(lo - k * per_shard, 0), min(hi - k * per_shard, per_shard)))
  return ShardedBatches(parents, rows)


_READ_THREADS, _READ_AHEAD = 4, 8  # prepared rows: batches read at once, and read ahead


def _prepared_batches(
  data_cfg, batch_size: int, seed: int, process_index: int, process_count: int
) -> grain.DatasetIterator:
  """Batches of prepared rows (`arrayrecord:DIR`): one global order of all rows, shuffled
  anew each epoch (grain's index shuffle, seed + epoch), dealt into global batches of
  `batch_size * process_count` consecutive rows; each process reads only its own
  `batch_size` of each. The iterator's state is the number of batches taken."""
  source, meta = prepared.rows_source(data_cfg.name, "train")
  if meta["seq_len"] != data_cfg.seq_len:
    raise ValueError(
      f"data.seq_len={data_cfg.seq_len}: data.name={data_cfg.name!r} holds rows of "
      f"{meta['seq_len']} tokens; allowed: {meta['seq_len']}"
    )
  dtype, seq_len = meta["dtype"], meta["seq_len"]
  rows = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  rows = rows.map(lambda record: prepared.decode_row(record, dtype, seq_len))
  mine = rows.batch(batch_size)[process_index::process_count]
  return iter(
    mine.to_iter_dataset(
      grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_AHEAD)
    )
  )


def check_shards(shards: int, global_rows: int) -> None:
  """`data.shards` against the global batch (`train.batch_size`): a divisor of it."""
  if shards < 1 or global_rows % shards:
    raise ValueError(
      f"data.shards={shards}: allowed: a positive divisor of the global batch of "
      f"{global_rows} rows (train.batch_size); 1 packs one stream that every process reads"
    )


def _pad_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-zero rows (segment id 0: ignored by losses)."""
  missing = batch_size - len(batch["tokens"])
  return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


def eval_batches(
  data_cfg: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  frame: Frame | None = None,
  rows_fn=None,
) -> Iterator[dict[str, np.ndarray]]:
  """The validation data, once, in order, as packed batches of `batch_size` rows.

  The source is `data.eval_name` (all of it) if set, else `data.name`'s validation split.
  Every process packs the same stream and takes its own rows of each global batch, so
  all processes yield the same number of batches. The last batch is padded with
  all-zero rows. `max_batches` > 0 stops early.
  """
  _check_cfg(data_cfg, batch_size)
  check_process(process_index, process_count)
  if max_batches < 0:
    raise ValueError(f"max_batches={max_batches}: allowed 0 (whole split) or a positive count")
  name, split = (data_cfg.eval_name, "all") if data_cfg.eval_name else (data_cfg.name, "validation")
  key = "data.eval_name" if data_cfg.eval_name else "data.name"
  if prepared.is_prepared(name) and rows_fn is None:  # already packed, in order
    source, meta = prepared.rows_source(name, split, key)
    dtype, seq_len = meta["dtype"], meta["seq_len"]
    rows = grain.MapDataset.source(source).map(lambda r: prepared.decode_row(r, dtype, seq_len))
    return batch_eval_rows(
      rows.to_iter_dataset(), batch_size, max_batches, process_index, process_count
    )
  docs = load_documents(name, split, data_cfg)
  if rows_fn is None:
    rows = packed_documents(docs, tokenizer, data_cfg.seq_len, frame)
  else:
    rows = rows_fn(
      _tokenized_docs(grain.MapDataset.source(docs), tokenizer, frame).to_iter_dataset(), 0
    )
  return batch_eval_rows(rows, batch_size, max_batches, process_index, process_count)


def batch_eval_rows(
  rows: grain.IterDataset, batch_size: int, max_batches: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
  """Global batches of the rows, the last padded with all-zero rows; this process's part."""
  global_size = batch_size * process_count
  batches = rows.batch(global_size, drop_remainder=False)
  mine = slice(process_index * batch_size, (process_index + 1) * batch_size)
  batches = batches.map(lambda b: {k: v[mine] for k, v in _pad_rows(b, global_size).items()})
  if max_batches:
    batches = grain.experimental.LimitIterDataset(batches, count=max_batches)
  return iter(batches)
