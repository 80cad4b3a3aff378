"""The encoder-decoder family end to end (configs/t5.py at size=tiny): span-corruption
pretraining on the embedded corpus (it learns, it resumes exactly), seq2seq fine-tuning on
a generated JSONL task with exact match / ROUGE / BLEU in its evaluation, eval.main's
evaluation of the workdir, and the eval.sample CLI with beam search."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import t5
from eval.evaluate import evaluate_workdir
from modeling import decoding
from tests.tiny_models import short_run, tiny_config
from train import families, trainer
from train import text_metrics as metrics
from train.data import seq2seq
from train.data.make_seq2seq_task import make_records
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30
VOCAB = ByteTokenizer.vocab_size + 100  # the bytes and T5's 100 sentinels
DECODE_KEYS = ("eval/exact_match", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bleu")


def _train(config, **train):
  return short_run(config, STEPS, **{"learning_rate": 1e-2, **train})


def tiny_pretrain(tfds_dir: str):
  """T5 `size=tiny` span corruption on the default corpus (pystdlib, built in `tfds_dir`)."""
  return _train(
    tiny_config("t5", "task=pretrain", tfds_data_dir=tfds_dir, seq_len=64, shuffle_window=16)
  )


def tiny_seq2seq(data: str):
  c = tiny_config("t5", "task=seq2seq", name=f"jsonl:{data}", seq_len=48, target_len=24)
  c.task.eval_decode = 16
  return _train(c, learning_rate=3e-3, eval_every=STEPS, checkpoint_every=STEPS)


def by_step(workdir, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in read_metrics(str(workdir)) if key in r}


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
  tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  workdir = tmp_path_factory.mktemp("t5_pretrain")
  return workdir, tfds_dir, trainer.run(tiny_pretrain(tfds_dir), str(workdir))


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5_reverse")
  records = make_records("reverse", 600, 4, 10, "abcdefghij", seed=0)
  with open(root / "reverse.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  workdir = root / "run"
  return workdir, trainer.run(tiny_seq2seq(str(root / "reverse.jsonl")), str(workdir))


def test_span_corruption_pretraining_learns(pretrain_run):
  workdir, _, last = pretrain_run
  assert t5.get_config("size=tiny,task=pretrain").data.name == "pystdlib"
  loss = by_step(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  early = np.mean([loss[s] for s in (1, 2, 3)])
  late = np.mean([loss[s] for s in range(STEPS - 4, STEPS + 1)])
  # At init the logits are small: the first loss is that of a uniform guess.
  assert loss[1] == pytest.approx(math.log(VOCAB), abs=0.05), loss[1]
  assert late < early - 1.5, loss
  # The loss is over the targets: 8 rows of the 14 target tokens 64 encoder tokens give.
  assert set(by_step(workdir, "train/tokens").values()) == {8.0 * 14}
  evals = {r["step"]: r for r in read_metrics(str(workdir)) if "eval/loss" in r}
  assert sorted(evals) == [STEPS // 2, STEPS]
  assert evals[STEPS]["eval/loss"] < math.log(VOCAB) - 1.5
  assert evals[STEPS]["eval/perplexity"] == pytest.approx(math.exp(evals[STEPS]["eval/loss"]))
  assert last["eval/loss"] == evals[STEPS]["eval/loss"]
  assert not any(k in last for k in DECODE_KEYS)  # decoding is for seq2seq only


def test_span_corruption_pretraining_resumes_exactly(pretrain_run, tmp_path):
  workdir, tfds_dir, last = pretrain_run
  mid = str(STEPS // 2)
  shutil.copytree(workdir / "checkpoints" / mid, tmp_path / "checkpoints" / mid)
  resumed_last = trainer.run(tiny_pretrain(tfds_dir), str(tmp_path))
  loss, resumed = by_step(workdir, "train/loss"), by_step(tmp_path, "train/loss")
  # The restored data iterator continues the same corrupted rows (its random map included).
  assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
  assert resumed == {s: loss[s] for s in resumed}
  assert resumed_last["eval/loss"] == last["eval/loss"]


def test_seq2seq_run_reports_decoded_text_metrics(seq2seq_run):
  workdir, last = seq2seq_run
  loss = by_step(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  assert np.mean([loss[s] for s in range(STEPS - 4, STEPS + 1)]) < loss[1] - 1.0, loss
  final = [r for r in read_metrics(str(workdir)) if "eval/loss" in r]
  assert [r["step"] for r in final] == [STEPS]
  for key in DECODE_KEYS:
    assert key in last and key in final[-1], key
    assert last[key] == final[-1][key]
  assert 0.0 <= last["eval/exact_match"] <= 1.0
  for key in DECODE_KEYS[1:]:
    assert 0.0 <= last[key] <= 100.0, key
  assert 0.0 < last["eval/accuracy"] < 1.0 and last["eval/loss"] > 0


def test_eval_main_reports_the_runs_decode_metrics(seq2seq_run):
  workdir, last = seq2seq_run
  # As `python -m eval.main --workdir=...` does: the run's own evaluation, reproduced.
  got = evaluate_workdir(str(workdir), [], eval_steps=2)
  assert list(got) == ["seq2seq"]
  for key in ("eval/loss", "eval/accuracy", *DECODE_KEYS):
    assert got["seq2seq"][key] == pytest.approx(last[key], rel=1e-5, abs=1e-6), key
  with pytest.raises(ValueError, match=r"task.name='seq2seq'; it can be evaluated on"):
    evaluate_workdir(str(workdir), ["pretrain"])


def test_decode_examples_of_the_run_are_its_validation_split(seq2seq_run):
  workdir, _ = seq2seq_run
  config, *_, tokenizer = trainer.load_for_inference(str(workdir))
  _, inputs, refs = seq2seq.decode_examples(config, tokenizer, config.task.eval_decode)
  assert len(refs) == 16
  assert all(i == f"reverse: {r[::-1]}" for i, r in zip(inputs, refs, strict=True))


def test_decode_eval_metrics_score_the_decoded_validation_examples(tmp_path, monkeypatch):
  """The tiny run's model decodes little that scores above 0: here an oracle decodes, wrong
  on the first example only, and the metrics are those of its texts against the references."""
  records = make_records("reverse", 100, 4, 10, "abcdefghij", seed=1)
  with open(tmp_path / "reverse.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  config = tiny_seq2seq(str(tmp_path / "reverse.jsonl"))
  config.task.update(eval_decode=6, beam_size=3)
  calls = []

  def oracle(model, params, tokenizer, sources, max_len, rng, **options):
    calls.append((len(sources), max_len, options))
    texts = [tokenizer.decode(s).removeprefix("reverse: ")[::-1] for s in sources]
    return [texts[0] + " x", *texts[1:]]

  monkeypatch.setattr(decoding, "seq2seq_texts", oracle)
  got = families.decode_eval_metrics(config, None, None, ByteTokenizer())
  refs = [r["targets"] for r in records[90:96]]  # the validation split's first six
  preds = [refs[0] + " x", *refs[1:]]
  assert got == metrics.text_metrics(preds, refs)
  assert got["eval/exact_match"] == pytest.approx(5 / 6)
  assert got["eval/rouge1"] == pytest.approx(100 * (5 + 2 / 3) / 6)  # 'w x' vs 'w': F 2/3
  options = dict(batch_size=8, src_len=48, temperature=0.0, beam_size=3, length_penalty=0.6)
  assert calls == [(6, 24, options)]
  config.task.eval_decode = 0
  assert families.decode_eval_metrics(config, None, None, ByteTokenizer()) == {}


def sample(workdir, *flags):
  cmd = [sys.executable, "-m", "eval.sample", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_sample_cli_beam_search_and_refused_flags(seq2seq_run):
  workdir, _ = seq2seq_run
  out = sample(workdir, "--prompt=reverse: abcd", "--num_tokens=12", "--beam_size=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("---- sample ") == 1 and "---- sample 1/1 (" in out.stdout
  # --steps belongs to the diffusion samplers: an encoder-decoder refuses it, naming its own.
  bad = sample(workdir, "--prompt=reverse: abcd", "--num_tokens=12", "--steps=8")
  assert bad.returncode != 0 and "---- sample" not in bad.stdout
  assert "--steps: model.family='encdec' samplers read only" in bad.stderr, bad.stderr[-3000:]
  assert "'--beam_size', '--length_penalty'" in bad.stderr


def test_decode_eval_metrics_of_a_mixture_per_source(tmp_path, monkeypatch):
  """A two-source mixture decodes each source's first `task.eval_decode` examples, and scores
  them together and per source (keys `eval/<metric>/<file stem>`)."""
  for task in ("reverse", "sort"):
    records = make_records(task, 100, 4, 10, "abcdefghij", seed=2)
    with open(tmp_path / f"{task}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  config = tiny_seq2seq(str(tmp_path / "reverse.jsonl"))
  config.task.mixture = f"jsonl:{tmp_path}/reverse.jsonl@1;jsonl:{tmp_path}/sort.jsonl@3"
  config.task.eval_decode = 4

  def oracle(model, params, tokenizer, sources, max_len, rng, **options):
    texts = [tokenizer.decode(s) for s in sources]  # right on reversal, wrong on sorting
    return [t.split(": ")[1][::-1] for t in texts]

  monkeypatch.setattr(decoding, "seq2seq_texts", oracle)
  got = families.decode_eval_metrics(config, None, None, ByteTokenizer())
  assert got["eval/exact_match/reverse"] == 1.0
  held_out = make_records("sort", 100, 4, 10, "abcdefghij", seed=2)[90:94]
  sort_refs = [r["targets"] for r in held_out]
  sort_preds = [r["inputs"].split(": ")[1][::-1] for r in held_out]
  assert got["eval/exact_match/sort"] == metrics.exact_match(sort_preds, sort_refs) < 1.0
  assert got["eval/exact_match"] == pytest.approx((4 + 4 * got["eval/exact_match/sort"]) / 8)
  assert {k.rsplit("/", 1)[-1] for k in got if k.count("/") == 2} == {"reverse", "sort"}
