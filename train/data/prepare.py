"""Tokenizes and packs a config's pretraining source once into ArrayRecord shards.

  python -m train.data.prepare --config=configs/gpt.py --output=DIR \\
      [--shards=32] [--workers=0] [--frame=document]

then train with `--config.data.name=arrayrecord:DIR` (train/data/prepared.py reads it).

The `train` split of `data.name` is cut into at most `--shards` ranges of consecutive
documents, the `validation` split is one; each range is tokenized with `data.tokenizer`, framed (`--frame`:
`document` for decoders and diffusion, `[BOS] ... EOS`; `cls_sep` for encoders'
`CLS ... SEP`), packed into rows of `data.seq_len` exactly as evaluation packs them
(`pipeline.packed_documents`, so a range's last row is padded) and written as one shard,
by `--workers` processes at once (0: one per CPU core). A shard is written under a
temporary name and renamed when whole, and `metadata.json` lists the finished ones, so an
interrupted run is resumed by running the same command again: finished shards are kept,
the rest are written anew, giving the same files.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from ml_collections import config_flags

from train.data import pipeline, prepared
from train.data.sources import load_documents
from train.data.tokenizers import make_tokenizer

# --frame: how each document is framed before packing (a function of the special ids)
FRAMES = {"document": pipeline.document_frame, "cls_sep": pipeline.cls_sep}
_SOURCE_KEYS = ("name", "text_field", "doc_separator", "span_bytes")  # what picks the documents
_FLUSH = 64  # documents (and rows) a worker counts before it adds them to the shared tallies

_JOB: dict = {}  # what every worker reads: set by `_start` in each worker


def _start(data_cfg: ml_collections.ConfigDict, output: str, frame: str, counters) -> None:
  """Opens the source's splits and the tokenizer (in each worker: spawned, not forked, so
  no lock of the parent's threads is inherited)."""
  tokenizer = make_tokenizer(data_cfg.tokenizer)
  _JOB.update(
    output=epath.Path(output),
    docs={split: load_documents(data_cfg.name, split, data_cfg) for split in prepared.SPLITS},
    tokenizer=tokenizer,
    frame=FRAMES[frame](tokenizer.specials),
    seq_len=data_cfg.seq_len,
    dtype=prepared.row_dtype(tokenizer.vocab_size, data_cfg.seq_len),
    **counters,
  )


class _Counted(Sequence):
  """Documents [lo, hi) of `docs`, adding to the shared count of documents read."""

  def __init__(self, docs: Sequence, lo: int, hi: int, counter):
    self._docs, self._lo, self._len = docs, lo, hi - lo
    self._counter, self._pending = counter, 0

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    if not 0 <= index < self._len:
      raise IndexError(index)
    self._pending += 1
    if self._pending == _FLUSH:
      self.flush()
    return self._docs[self._lo + index]

  def flush(self) -> None:
    with self._counter.get_lock():
      self._counter.value += self._pending
    self._pending = 0


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _pack(task: tuple[str, str, int, int], path: str) -> tuple[int, int]:
  """Packs documents [lo, hi) of the split into the ArrayRecord file `path`; (rows, tokens)."""
  split, _, lo, hi = task
  job = _JOB
  docs = _Counted(job["docs"][split], lo, hi, job["documents_read"])
  writer = ArrayRecordWriter(path, prepared.WRITER_OPTIONS)
  if not writer.ok():
    raise OSError(f"array_record cannot write {path}")
  rows = tokens = pending = 0
  for row in pipeline.packed_documents(docs, job["tokenizer"], job["seq_len"], job["frame"]):
    writer.write(prepared.encode_row(row, job["dtype"]))
    rows, pending = rows + 1, pending + int((row["segment_ids"] > 0).sum())
    if rows % _FLUSH == 0:
      with job["tokens_written"].get_lock():
        job["tokens_written"].value += pending
      tokens, pending = tokens + pending, 0
  writer.close()
  docs.flush()
  with job["tokens_written"].get_lock():
    job["tokens_written"].value += pending
  return rows, tokens + pending


def _write_shard(task: tuple[str, str, int, int]) -> tuple[str, int, int]:
  """Writes one shard under a temporary name, then gives it its own; (shard, rows, tokens).
  array_record writes local files only: a bucket's shard is written locally, then copied."""
  shard = task[1]
  final = _JOB["output"] / shard
  if _is_local(final):
    partial = final.parent / f"{shard}.partial"
    rows, tokens = _pack(task, os.fspath(partial))
    partial.replace(final)  # whole, or absent under its own name
    return shard, rows, tokens
  with tempfile.TemporaryDirectory() as scratch:
    partial = epath.Path(scratch) / shard
    rows, tokens = _pack(task, os.fspath(partial))
    partial.copy(final, overwrite=True)  # a bucket object appears whole when its upload ends
  return shard, rows, tokens


class Progress:
  """A progress bar on stderr: documents read of all, shards, tokens and this run's tokens
  per second; redrawn in place on a terminal, else a line every `every_s` seconds."""

  def __init__(self, total_docs: int, total_shards: int, base_tokens: int, stream, every_s=5.0):
    self.total_docs, self.total_shards, self.base_tokens = total_docs, total_shards, base_tokens
    self.stream, self.every_s, self.tty = stream, every_s, stream.isatty()
    self.start = self.last = time.monotonic()

  def show(self, docs: int, shards: int, tokens: int, final: bool = False) -> None:
    now = time.monotonic()
    if not final and not self.tty and now - self.last < self.every_s:
      return
    self.last = now
    frac = docs / max(self.total_docs, 1)
    bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
    rate = (tokens - self.base_tokens) / max(now - self.start, 1e-9)
    line = (
      f"prepare [{bar}] {docs:,}/{self.total_docs:,} documents, {shards}/{self.total_shards}"
      f" shards, {tokens:,} tokens, {rate:,.0f} tokens/s"
    )
    end = "\n" if final or not self.tty else ""
    print(("\r" if self.tty else "") + line, end=end, file=self.stream, flush=True)


def _write_metadata(output: epath.Path, meta: dict) -> None:
  """metadata.json, replaced whole (a rename locally; an object upload on a bucket)."""
  text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
  if _is_local(output):
    partial = output / f"{prepared.METADATA}.partial"
    partial.write_text(text)
    partial.replace(output / prepared.METADATA)
  else:
    (output / prepared.METADATA).write_text(text)


def prepare(
  data_cfg: ml_collections.ConfigDict,
  output: str,
  *,
  frame: str = "document",
  shards: int = 32,
  workers: int = 0,
  stream=sys.stderr,
) -> dict:
  """Writes (or finishes writing) the shards of `data_cfg.name` into `output`; returns the
  metadata. A directory prepared with other settings is refused, naming the first
  difference."""
  if frame not in FRAMES:
    raise ValueError(f"--frame={frame!r}: allowed {list(FRAMES)}")
  if shards < 1:
    raise ValueError(f"--shards={shards}: allowed: a positive integer")
  if workers < 0:
    raise ValueError(f"--workers={workers}: allowed: 0 (one per CPU core) or a positive integer")
  out = epath.Path(output)
  ctx = multiprocessing.get_context("spawn")
  counters = {"documents_read": ctx.Value("q", 0), "tokens_written": ctx.Value("q", 0)}
  _start(data_cfg, output, frame, counters)
  docs, ids, tokenizer = _JOB["docs"], _JOB["frame"], _JOB["tokenizer"]
  meta = {
    "format": prepared.FORMAT,
    "source": {f"data.{k}": data_cfg[k] for k in _SOURCE_KEYS},
    "tokenizer": prepared.tokenizer_identity(data_cfg.tokenizer, tokenizer),
    "frame": {"name": frame, "prefix": list(ids[0]), "suffix": list(ids[1])},
    "seq_len": data_cfg.seq_len,
    "dtype": _JOB["dtype"],
    # validation in one shard: packed as evaluation packs the source, so it scores the same
    "splits": {
      "train": {"documents": len(docs["train"]), "shards": min(shards, len(docs["train"]))},
      "validation": {"documents": len(docs["validation"]), "shards": 1},
    },
  }
  done = {}
  if (out / prepared.METADATA).exists():
    old = prepared.read_metadata(f"{prepared.PREFIX}{out}", "--output", complete=False)
    for key, value in meta.items():
      if old.get(key) != value:
        raise ValueError(
          f"--output={output!r} holds shards prepared with other settings: {key} is {old.get(key)}"
          f" there, {value} now; use another --output, or delete it to prepare anew"
        )
    done = old["done"]
  out.mkdir(parents=True, exist_ok=True)
  tasks = []
  for split, n in ((s, meta["splits"][s]["shards"]) for s in prepared.SPLITS):
    size = len(docs[split])
    for k in range(n):
      shard = prepared.shard_name(split, k, n)
      if shard in done and (out / shard).exists():
        continue
      done.pop(shard, None)
      tasks.append((split, shard, k * size // n, (k + 1) * size // n))
  _write_metadata(out, {**meta, "done": done, "complete": False})

  total_shards = sum(s["shards"] for s in meta["splits"].values())
  # the documents and tokens of the shards written before this run
  total_docs = sum(len(d) for d in docs.values())
  base_docs = total_docs - sum(hi - lo for _, _, lo, hi in tasks)
  base_tokens = sum(v["tokens"] for v in done.values())
  progress = Progress(total_docs, total_shards, base_tokens, stream)

  def show(final: bool = False) -> None:
    progress.show(
      base_docs + counters["documents_read"].value,
      len(done),
      base_tokens + counters["tokens_written"].value,
      final,
    )

  def finished(result: tuple[str, int, int]) -> None:
    shard, rows, tokens = result
    done[shard] = {"rows": rows, "tokens": tokens}
    _write_metadata(out, {**meta, "done": done, "complete": False})
    show()

  workers = min(workers or os.cpu_count() or 1, max(len(tasks), 1))
  if workers == 1:
    for task in tasks:
      finished(_write_shard(task))
  else:
    start_args = (data_cfg, output, frame, counters)
    with ctx.Pool(workers, initializer=_start, initargs=start_args) as pool:
      results = pool.imap_unordered(_write_shard, tasks)
      for _ in tasks:
        while True:
          try:
            finished(results.next(timeout=1.0))
            break
          except multiprocessing.TimeoutError:
            show()
  show(final=True)
  totals = {}
  for split in prepared.SPLITS:
    mine = [v for shard, v in done.items() if shard.startswith(split + "-")]
    totals[split] = {k: sum(v[k] for v in mine) for k in ("rows", "tokens")}
  meta.update(done=done, complete=True, totals=totals)
  _write_metadata(out, meta)
  return meta


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  data_cfg = f.config.data
  if prepared.is_prepared(data_cfg.name):
    raise app.UsageError(
      f"data.name={data_cfg.name!r}: already prepared; name a source of documents"
    )
  start = time.perf_counter()
  try:
    meta = prepare(data_cfg, f.output, frame=f.frame, shards=f.shards, workers=f.workers)
  except ValueError as e:  # a bad source or a directory prepared otherwise: one line
    sys.exit(f"train.data.prepare: {e}")
  for split, total in meta["totals"].items():
    print(f"{split}: {total['rows']:,} rows of {meta['seq_len']}, {total['tokens']:,} tokens")
  print(f"{f.output}: complete ({time.perf_counter() - start:.1f} s)")
  print(f"train with: --config.data.name={prepared.PREFIX}{f.output}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing `prepare` never clashes with
  # another module's `--config`.
  config_flags.DEFINE_config_file(
    "config", help_string="preset whose data (source, tokenizer, seq_len) is read"
  )
  flags.DEFINE_string("output", None, "directory (local or gs://) of the shards and metadata.json")
  flags.DEFINE_integer(
    "shards", 32, "shards per split, at most (fewer when there are fewer documents)"
  )
  flags.DEFINE_integer("workers", 0, "processes writing shards at once; 0: one per CPU core")
  flags.DEFINE_enum(
    "frame",
    "document",
    list(FRAMES),
    "document: [BOS] ... EOS (decoder, diffusion); cls_sep: CLS ... SEP (encoder)",
  )
  flags.mark_flags_as_required(["config", "output"])
  app.run(main)
