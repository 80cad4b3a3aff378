"""Pre-tokenized shards: `train.data.prepare` writes them, `data.name=arrayrecord:DIR` reads
them back as the rows the in-memory pipeline packs, in one global order any process count
shares, resumable; an interrupted preparation finishes into the same files; shards of
another tokenizer, length or frame are refused before anything compiles."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from tests.tiny_models import tiny_config
from train.data import pipeline, prepare, prepared
from train.data.sources import load_documents
from train.data.tokenizers import ByteTokenizer, make_tokenizer
from train.validation import validate_config

BYTES = ByteTokenizer()
SEQ_LEN = 16
GPT2 = "hf:tests/fixtures/hf/gpt2"


def _source(tmp_path) -> str:
  """80 distinct JSONL documents of 0 to 60 characters (some empty, some longer than a row)."""
  rng = random.Random(0)
  docs = ["".join(rng.choice("abcdefgh \n") for _ in range(rng.randint(0, 60))) for _ in range(80)]
  path = tmp_path / "docs.jsonl"
  path.write_text(
    "".join(json.dumps({"text": f"{i}:{d}" if i % 9 else ""}) + "\n" for i, d in enumerate(docs))
  )
  return f"jsonl:{path}"


def _config(name: str, preset: str = "gpt", **data):
  return tiny_config(preset, name=name, **{"seq_len": SEQ_LEN, **data})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """A source, and the shards of it prepared in 3 pieces by one worker."""
  tmp_path = tmp_path_factory.mktemp("prepare")
  source = _source(tmp_path)
  out = tmp_path / "shards"
  meta = prepare.prepare(_config(source).data, str(out), shards=3, workers=1)
  return source, out, meta


def _rows(records, meta) -> dict[str, np.ndarray]:
  rows = [prepared.decode_row(r, meta["dtype"], meta["seq_len"]) for r in records]
  return {k: np.stack([r[k] for r in rows]) for k in prepared.KEYS}


def test_shards_hold_the_rows_the_pipeline_packs(shards):
  """Each train shard is the in-memory packing of its range of documents (token ids, segment
  ids, positions); the validation shard evaluates exactly as the source does."""
  source, out, meta = shards
  cfg = _config(source).data
  docs = load_documents(source, "train", cfg)
  n, total = meta["splits"]["train"]["shards"], 0
  assert n == 3 and meta["dtype"] == "uint16" and meta["complete"]
  for k in range(n):
    name = prepared.shard_name("train", k, n)
    got = _rows(prepared.ArrayRecordDataSource(str(out / name)), meta)
    lo, hi = k * len(docs) // n, (k + 1) * len(docs) // n
    want = list(pipeline.packed_documents([docs[i] for i in range(lo, hi)], BYTES, SEQ_LEN))
    assert len(want) == meta["done"][name]["rows"] == len(got["tokens"])
    for key in prepared.KEYS:
      np.testing.assert_array_equal(got[key], np.stack([w[key] for w in want]), err_msg=key)
    total += int((got["segment_ids"] > 0).sum())
  assert total == meta["totals"]["train"]["tokens"]
  read = _config(f"arrayrecord:{out}").data
  from_shards = list(pipeline.eval_batches(read, BYTES, batch_size=4))
  from_source = list(pipeline.eval_batches(cfg, BYTES, batch_size=4))
  assert len(from_shards) == len(from_source) > 1
  for a, b in zip(from_shards, from_source, strict=True):
    for key in prepared.KEYS:
      np.testing.assert_array_equal(a[key], b[key])


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def test_one_global_order_for_any_process_count_and_exact_resume(shards):
  """Every row once per epoch, reshuffled each epoch; two processes' rows of each batch
  make one process's batch; a JSON round trip of the state mid-epoch resumes exactly."""
  source, out, meta = shards
  cfg = _config(f"arrayrecord:{out}").data
  rows = meta["totals"]["train"]["rows"]
  one = pipeline.train_iterator(cfg, BYTES, batch_size=8, seed=3)
  batches = _take(one, 2 * rows // 8 + 2)  # two epochs and a bit
  flat = np.concatenate([b["tokens"] for b in batches])
  all_rows = _rows(
    prepared.ArrayRecordDataSource(prepared.split_files(cfg.name, "train", meta)), meta
  )
  for epoch in (flat[:rows], flat[rows : 2 * rows]):
    assert sorted(map(bytes, epoch.astype(np.int32))) == sorted(map(bytes, all_rows["tokens"]))
  assert not np.array_equal(flat[:rows], flat[rows : 2 * rows])
  two = [
    pipeline.train_iterator(cfg, BYTES, batch_size=4, seed=3, process_index=p, process_count=2)
    for p in range(2)
  ]
  for b in batches[:5]:
    parts = [next(it) for it in two]
    for key in prepared.KEYS:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), b[key])
  resumed = pipeline.train_iterator(cfg, BYTES, batch_size=8, seed=3)
  resumed.set_state(json.loads(json.dumps(two[0].get_state())))  # after 5 batches
  for want in batches[5:]:
    got = next(resumed)
    for key in prepared.KEYS:
      np.testing.assert_array_equal(got[key], want[key])


def test_an_interrupted_preparation_finishes_into_the_same_files(shards, tmp_path):
  """A deleted shard, a half-written one, and one written but not yet listed are redone; the
  finished ones are kept; the files equal an uninterrupted run's. Until then the directory
  is refused, and so is a rerun with other settings."""
  source, out, _ = shards
  again = tmp_path / "again"
  cfg = _config(source).data
  prepare.prepare(cfg, str(again), shards=3, workers=1)
  meta = json.loads((again / "metadata.json").read_text())
  (again / "train-00001-of-00003.array_record").unlink()
  (again / "train-00002-of-00003.array_record.partial").write_bytes(b"half")
  del meta["done"]["train-00002-of-00003.array_record"]
  (again / "train-00002-of-00003.array_record").write_bytes(b"not listed")
  kept = (again / "train-00000-of-00003.array_record").stat().st_mtime_ns
  meta["complete"] = False
  (again / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"stopped after 3 of 4 shards; rerun"):
    validate_config(_config(f"arrayrecord:{again}"))
  cfg.seq_len = 32
  with pytest.raises(ValueError, match=r"seq_len is 16 there, 32 now"):
    prepare.prepare(cfg, str(again), shards=3, workers=1)
  cfg.seq_len = SEQ_LEN
  prepare.prepare(cfg, str(again), shards=3, workers=1)
  assert (again / "train-00000-of-00003.array_record").stat().st_mtime_ns == kept
  names = sorted(p.name for p in out.iterdir())
  assert sorted(p.name for p in again.iterdir()) == names
  for name in names:
    assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_shards_of_another_tokenizer_length_or_frame_are_refused(shards, tmp_path):
  source, out, _ = shards
  name = f"arrayrecord:{out}"
  validate_config(_config(name))  # the shards' own settings pass
  with pytest.raises(ValueError, match=r"^data.seq_len=32: .* holds rows of 16 tokens"):
    validate_config(_config(name, seq_len=32))
  other = tmp_path / "gpt2"
  prepare.prepare(_config(source, tokenizer=GPT2).data, str(other), shards=1, workers=1)
  vocab = make_tokenizer(GPT2).vocab_size
  with pytest.raises(
    ValueError,
    match=rf"^data.tokenizer='byte': .*'{GPT2}' \(vocabulary {vocab}.* not of 'byte' \(vocabulary 264",
  ):
    validate_config(_config(f"arrayrecord:{other}"))
  with pytest.raises(
    ValueError,
    match=r"framed \[\] \.\.\. \[1\] .*--frame=document.*'encoder' frames them \[4\] \.\.\. \[5\]",
  ):
    validate_config(_config(name, "bert"))
  encoder = tmp_path / "encoder"
  prepare.prepare(_config(source, "bert").data, str(encoder), shards=1, workers=1, frame="cls_sep")
  validate_config(_config(f"arrayrecord:{encoder}", "bert"))  # CLS ... SEP: an encoder's
  with pytest.raises(ValueError, match=r"'encdec' task.name='pretrain' reads its own examples"):
    validate_config(_config(name, "t5"))
  with pytest.raises(ValueError, match=r"^data.shards=2: "):
    validate_config(_config(name, shards=2))
  with pytest.raises(
    ValueError, match=r"^data.name='arrayrecord:.*nowhere': no directory .*nowhere; write one with"
  ):
    validate_config(_config(f"arrayrecord:{tmp_path}/nowhere"))
  with pytest.raises(
    ValueError, match=r"no metadata.json in .*: not written by `python -m train.data.prepare"
  ):
    validate_config(_config(f"arrayrecord:{tmp_path}"))
