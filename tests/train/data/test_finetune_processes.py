"""Fine-tuning iterators (labeled rows, SFT conversations, text-to-text pairs) deal rows as
pretraining does (`pipeline.process_batches`): one process and two processes (simulated:
their process_index / process_count) see the same global batches, and two processes resumed
from their JSON states continue exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import t5
from tests.tiny_models import tiny_config
from train.data import chat, labeled, seq2seq
from train.data.tokenizers import ByteTokenizer

BYTES = ByteTokenizer()
ROWS = 4  # the global batch


def jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def conversation(i: int) -> dict:
  return {
    "messages": [
      {"role": "user", "content": f"say {i}"},
      {"role": "assistant", "content": "x" * (i % 7)},
    ]
  }


def labeled_iterator(tmp_path, shards: int):
  rows, _ = labeled.encode_rows([(f"t{i}", None) for i in range(14)], BYTES, 12)
  rows["label"] = np.arange(14, dtype=np.int32)
  rows["weight"] = np.ones(14, np.float32)
  return lambda **kw: labeled.labeled_train_iterator(rows, shards=shards, **kw)


def sft_iterator(tmp_path, shards: int):
  c = tiny_config("gpt", "task=sft", name=jsonl(tmp_path / "c.jsonl", map(conversation, range(30))))
  c.data.update(seq_len=64, shards=shards)
  return lambda **kw: chat.sft_train_iterator(c, BYTES, **kw)


def seq2seq_iterator(tmp_path, shards: int):
  pairs = [{"inputs": f"q{i} " + "y" * (i % 5), "targets": f"a{i}"} for i in range(30)]
  c = t5.get_config("size=tiny,task=seq2seq")
  c.data.update(name=jsonl(tmp_path / "p.jsonl", pairs), seq_len=24, target_len=8, shards=shards)
  return lambda **kw: seq2seq.seq2seq_train_iterator(c, BYTES, **kw)


def processes(build, count: int, states=None) -> list:
  """`count` processes' iterators of the global batch; `states` resumes each first."""
  its = [
    build(batch_size=ROWS // count, seed=3, process_index=i, process_count=count)
    for i in range(count)
  ]
  for it, state in zip(its, states or [], strict=False):
    it.set_state(state)
  return its


def global_batches(its, steps: int) -> list[dict]:
  """`steps` global batches: every process's rows, in process order."""
  return [
    {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
    for parts in ([next(it) for it in its] for _ in range(steps))
  ]


def assert_same(got: list[dict], want: list[dict]) -> None:
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


@pytest.mark.parametrize(
  ("kind", "shards"),
  [(labeled_iterator, 1), (labeled_iterator, 2), (sft_iterator, 1), (seq2seq_iterator, 1)],
)
def test_global_batches_and_resume_do_not_depend_on_the_process_count(tmp_path, kind, shards):
  """The default one shard (every process deals its rows from one global order) and, for
  labeled rows, a shard per process."""
  build = kind(tmp_path, shards)
  one = global_batches(processes(build, 1), 4)
  assert len({b["tokens"].tobytes() for b in one}) == 4  # a new batch every step
  two = processes(build, 2)
  assert_same(global_batches(two, 2), one[:2])
  states = [json.loads(json.dumps(it.get_state())) for it in two]  # a checkpoint holds JSON
  assert_same(global_batches(two, 2), one[2:])
  assert_same(global_batches(processes(build, 2, states), 2), one[2:])
