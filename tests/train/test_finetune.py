"""Fine-tuning encoders: an MLM-pretrained tiny BERT loaded into classify / regress models
(`config.init_from`), its weights restored bit for bit under a new head, shape mismatches
refused, and the classification / regression summaries checked against sklearn and scipy."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import bert
from modeling.transformer import Transformer
from modeling.vocab import FOURFOLD
from tests.tiny_models import abstract_init, draw_params, tiny_config
from train import families, trainer
from train.checkpoint import restore_matching_params
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics
from train.objectives import make_classify, make_regress, summarize_classify, summarize_regress

VOCAB = ByteTokenizer.vocab_size
SEQ_LEN = 32
LOW, HIGH = "abcdefghijklm", "nopqrstuvwxyz"  # the two classes' alphabets
HEAD_PARAMS = [
  "['classifier']['bias']",
  "['classifier']['kernel']",
  "['pooler']['bias']",
  "['pooler']['kernel']",
]
MLM_PARAMS = [
  "['mlm_bias']",
  "['mlm_norm']['bias']",
  "['mlm_norm']['scale']",
  "['mlm_transform']['bias']",
  "['mlm_transform']['kernel']",
]


def words(rng: np.random.Generator, alphabet: str, n_words: int) -> str:
  letters = list(alphabet)
  return " ".join("".join(rng.choice(letters, rng.integers(2, 6))) for _ in range(n_words))


def write_jsonl(path, records: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def alphabet_records(n: int, seed: int) -> list[dict]:
  """Label 1 if the text's letters come from the second half of the alphabet: every byte
  carries the label, so a tiny encoder learns it in a few dozen steps."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  return [
    {"text": words(rng, HIGH if y else LOW, int(rng.integers(2, 6))), "label": int(y)}
    for y in labels
  ]


def share_records(n: int, seed: int) -> list[dict]:
  """Pairs of texts; the target is the share of the second text's letters in the first half
  of the alphabet (0..1), a per-byte average again."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    share = rng.random()
    pair = "".join(rng.choice(list(LOW if rng.random() < share else HIGH)) for _ in range(10))
    out.append(
      {
        "text": words(rng, LOW + HIGH, 2),
        "other": pair,
        "label": sum(c in LOW for c in pair) / len(pair),
      }
    )
  return out


def tiny_encoder(task: str, data_name: str, arch: str = "bert", **train):
  options = f"arch={arch},task={task}"
  c = tiny_config("bert", options, 0.0, name=data_name, text_field="text", seq_len=SEQ_LEN)
  c.train.update(
    dict(
      steps=10,
      batch_size=16,
      learning_rate=1e-3,
      min_learning_rate=1e-3,
      warmup_steps=0,
      schedule="constant",
      log_every=5,
      eval_every=0,
      num_samples=0,
      peak_tflops=1.0,
    )
  )
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> str:
  """A tiny BERT workdir after 10 MLM steps on the classification texts (no labels used)."""
  tmp = tmp_path_factory.mktemp("pretrain")
  texts = write_jsonl(tmp / "texts.jsonl", alphabet_records(200, seed=1))
  workdir = str(tmp / "workdir")
  trainer.run(tiny_encoder("pretrain", texts, learning_rate=3e-3), workdir)
  return workdir


@pytest.fixture(scope="module", params=["bert", "modern"])
def pretrained_arch(request, tmp_path_factory) -> tuple[str, str]:
  """(arch, workdir): `pretrained`, and the same for configs/bert.py's default arch."""
  if request.param == "bert":
    return "bert", request.getfixturevalue("pretrained")
  tmp = tmp_path_factory.mktemp("pretrain_modern")
  texts = write_jsonl(tmp / "texts.jsonl", alphabet_records(200, seed=1))
  workdir = str(tmp / "workdir")
  trainer.run(tiny_encoder("pretrain", texts, "modern", learning_rate=3e-3, steps=4), workdir)
  return "modern", workdir


def init_from_line(out: str) -> tuple[str, int, list[str], list[str]]:
  """(path, loaded count, fresh names, unused names) of the trainer's init_from line."""
  m = re.search(
    r"^init_from (.+): loaded (\d+) parameter arrays; new, initialized fresh: (.+); "
    r"in the checkpoint but unused: (.+)$",
    out,
    re.MULTILINE,
  )
  assert m, out
  return m[1], int(m[2]), ast.literal_eval(m[3]), ast.literal_eval(m[4])


# --- end to end ------------------------------------------------------------------------------


def test_classify_fine_tunes_from_a_pretrained_encoder(pretrained, tmp_path, capsys):
  records = alphabet_records(400, seed=2)
  config = tiny_encoder(
    "classify", write_jsonl(tmp_path / "task.jsonl", records), steps=40, eval_every=20
  )
  config.init_from = pretrained
  capsys.readouterr()
  last = trainer.run(config, str(tmp_path / "ft"))
  path, loaded, fresh, unused = init_from_line(capsys.readouterr().out)
  assert path == pretrained
  assert fresh == HEAD_PARAMS and unused == MLM_PARAMS
  # Every body array: embeddings (token, position, type), their norm, 2 blocks of 16.
  assert loaded == 3 + 2 + 2 * 16

  metrics = read_metrics(tmp_path / "ft")
  evals = {r["step"]: r for r in metrics if "eval/accuracy" in r}
  assert sorted(evals) == [20, 40]
  assert all("eval/f1" in r and math.isfinite(r["eval/loss"]) for r in evals.values())
  assert "train/accuracy" in metrics[0] and "train/mlm_accuracy" not in metrics[0]
  held_out = [r["label"] for r in records[-len(records) // 10 :]]
  majority = max(np.mean(held_out), 1 - np.mean(held_out))
  assert last["eval/accuracy"] == evals[40]["eval/accuracy"]
  assert majority < 0.7 and last["eval/accuracy"] >= max(0.9, majority + 0.2), (last, majority)
  assert last["eval/f1"] >= 0.85
  assert last["eval/loss"] < math.log(2) / 2


def test_regress_fine_tunes_on_pairs(pretrained, tmp_path):
  config = tiny_encoder(
    "regress", write_jsonl(tmp_path / "pairs.jsonl", share_records(400, seed=3)), steps=40
  )
  config.task.text_pair_field = "other"
  config.train.eval_every = 40
  config.init_from = pretrained
  last = trainer.run(config, str(tmp_path / "ft"))
  (final,) = [r for r in read_metrics(tmp_path / "ft") if "eval/spearman" in r]
  assert final["step"] == 40 and final["eval/spearman"] == last["eval/spearman"]
  assert {"eval/loss", "eval/pearson", "eval/spearman"} <= set(last)
  assert "eval/accuracy" not in last and "train/accuracy" not in last
  # The share is a per-byte average over the second text: learned well in 40 steps.
  assert last["eval/spearman"] > 0.5 and last["eval/pearson"] > 0.5, last
  assert last["eval/loss"] < 0.1  # MSE; predicting the mean gives ~0.1 (var of the share)


# --- init_from restores the pretrained body bit for bit --------------------------------------


def flat(tree) -> dict[str, jax.Array]:
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def fresh_params(config):
  """A fresh param tree of the config's model (values drawn in NumPy: no compile)."""
  return draw_params(
    abstract_init(families.resolve(config).transformer_config(config, VOCAB)), seed=7
  )


def test_init_from_restores_the_body_bit_for_bit(pretrained_arch):
  arch, pretrained = pretrained_arch
  pre_config, _, pre_params, _ = trainer.load_for_inference(pretrained)
  assert pre_config.task.name == "pretrain"
  config = tiny_encoder("classify", "unused", arch)
  fresh = fresh_params(config)
  params, kept_fresh, unused = restore_matching_params(pretrained, fresh)
  assert kept_fresh == HEAD_PARAMS
  assert unused == (
    MLM_PARAMS if arch == "bert" else [n for n in MLM_PARAMS if "norm']['b" not in n]
  )

  pre, got, init = flat(pre_params), flat(params), flat(fresh)
  assert got.keys() == init.keys() == (pre.keys() - set(MLM_PARAMS)) | set(HEAD_PARAMS)
  for name, x in got.items():
    want = init[name] if name in HEAD_PARAMS else pre[name]
    assert x.dtype == want.dtype and x.shape == want.shape, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg=name)
  # Not vacuous: the fresh draw differs from the checkpoint in every array.
  body = [n for n in got if n not in HEAD_PARAMS]
  assert all(not np.array_equal(np.asarray(init[n]), np.asarray(pre[n])) for n in body)

  # The body computes the same hidden states under both trees: pool the [CLS] state.
  cfg = families.resolve(config).transformer_config(config, VOCAB)
  assert cfg.pooling == "cls"
  pool_model = Transformer(dataclasses.replace(cfg, head="pool"))
  rng = np.random.default_rng(0)
  tokens_BL = rng.integers(8, VOCAB, (4, SEQ_LEN)).astype(np.int32)
  seg_BL = (np.arange(SEQ_LEN) < np.array([[32], [20], [9], [2]])).astype(np.int32)
  pos_BL = np.arange(SEQ_LEN, dtype=np.int32) * seg_BL
  apply = jax.jit(lambda p: pool_model.apply({"params": p}, tokens_BL, pos_BL, seg_BL)[0])
  from_pre = apply({k: v for k, v in pre_params.items() if not k.startswith("mlm_")})
  from_restored = apply({k: v for k, v in params.items() if k not in ("pooler", "classifier")})
  assert from_pre.shape == (4, pool_model.cfg.d_model)
  np.testing.assert_array_equal(np.asarray(from_restored), np.asarray(from_pre))
  from_fresh = apply({k: v for k, v in fresh.items() if k not in ("pooler", "classifier")})
  assert np.abs(np.asarray(from_fresh) - np.asarray(from_pre)).max() > 1e-3


def test_init_from_accepts_a_workdir_its_checkpoints_or_a_step(pretrained):
  fresh = fresh_params(tiny_encoder("classify", "unused"))
  want = flat(restore_matching_params(pretrained, fresh)[0])
  for path in (f"{pretrained}/checkpoints", f"{pretrained}/checkpoints/10"):
    got = flat(restore_matching_params(path, fresh)[0])
    assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want), path


def test_init_from_without_a_checkpoint_or_shared_params_is_refused(pretrained, tmp_path):
  fresh = fresh_params(tiny_encoder("classify", "unused"))
  with pytest.raises(ValueError, match="no checkpoint found"):
    restore_matching_params(str(tmp_path), fresh)
  with pytest.raises(ValueError, match="no parameter of this model"):
    restore_matching_params(pretrained, {"other": {"kernel": jnp.zeros((3,))}})


def test_init_from_a_model_of_another_shape_names_the_parameter(pretrained, tmp_path):
  records = alphabet_records(40, seed=4)
  config = tiny_encoder("classify", write_jsonl(tmp_path / "task.jsonl", records))
  config.model.d_ff = 128  # the pretrained model has 256
  config.init_from = pretrained
  with pytest.raises(ValueError) as e:
    trainer.run(config, str(tmp_path / "ft"))
  assert str(e.value).startswith(
    f"init_from={pretrained!r}: ['block_0']['mlp']['down']['kernel'] has shape (256, 64) in "
    f"{pretrained}/checkpoints/10, the config gives (128, 64)."
  ), str(e.value)
  assert not (tmp_path / "ft" / "metrics.jsonl").exists()
  assert not list((tmp_path / "ft").glob("checkpoints/[0-9]*"))


# --- summaries against sklearn and scipy -----------------------------------------------------


CLASSIFY_CONFIG = bert.get_config("size=tiny,task=classify")


class FixedOutput:
  """A stand-in model whose `apply` returns the given outputs, whatever the inputs."""

  def __init__(self, out):
    self.out = out

  def apply(self, variables, *args, **kwargs):
    return jnp.asarray(self.out), None


def labeled_batch(label_B, weight_B):
  zeros_BL = np.zeros((len(label_B), 4), np.int32)
  return {
    "tokens": zeros_BL,
    "positions": zeros_BL,
    "segment_ids": zeros_BL,
    "token_types": zeros_BL,
    "label": label_B,
    "weight": weight_B.astype(np.float32),
  }


def test_summarize_classify_matches_sklearn():
  sklearn_metrics = pytest.importorskip("sklearn.metrics")
  objective = make_classify(CLASSIFY_CONFIG.task, VOCAB, FOURFOLD)
  rng = np.random.default_rng(0)
  for trial in range(4):
    sums, labels, preds, nll = None, [], [], []
    for _ in range(3):  # batches of an eval split, summed
      label_B = rng.integers(0, 4, 16).astype(np.int32)
      # 6 classes: labels use 0..3; class 4 is predicted now and then, class 5 never.
      logits_B6 = rng.standard_normal((16, 6)).astype(np.float32)
      logits_B6[:, 4] -= 0.5
      logits_B6[:, 5] = -10.0
      weight_B = (rng.random(16) < 0.8).astype(np.float32)
      batch = labeled_batch(label_B, weight_B)
      out = jax.tree.map(np.asarray, objective(FixedOutput(logits_B6), None, batch, None, True))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
      keep = weight_B > 0
      labels.append(label_B[keep])
      preds.append(logits_B6.argmax(-1)[keep])
      nll.append(-np.asarray(jax.nn.log_softmax(logits_B6))[np.arange(16), label_B][keep])
    y_true, y_pred = np.concatenate(labels), np.concatenate(preds)
    assert 4 in y_pred and 5 not in y_pred and 4 not in y_true, trial
    got = summarize_classify(sums, {}, CLASSIFY_CONFIG, byte_level=True)
    assert float(sums["weight"]) == len(y_true) < 48
    assert got["eval/accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred))
    want_f1 = sklearn_metrics.f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert got["eval/f1"] == pytest.approx(want_f1, rel=1e-6), trial
    # Class 4 (predicted, never true) counts; class 5 (neither) does not.
    over_labels = sklearn_metrics.f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro")
    assert abs(got["eval/f1"] - over_labels) > 1e-3
    assert got["eval/loss"] == pytest.approx(np.concatenate(nll).mean(), rel=1e-5)


def test_summarize_classify_without_examples():
  zeros = {k: np.zeros(3) for k in ("tp", "fp", "fn")}
  sums = dict(zeros, loss_sum=0.0, weight=0.0, correct=0.0)
  got = summarize_classify(sums, {}, CLASSIFY_CONFIG, byte_level=True)
  assert got == {"eval/loss": 0.0, "eval/accuracy": 0.0, "eval/f1": 0.0}


def test_summarize_regress_matches_scipy_over_the_real_rows():
  objective = make_regress(bert.get_config("task=regress").task, VOCAB, FOURFOLD)
  rng = np.random.default_rng(1)
  sums, rows, kept_pred, kept_target = None, {}, [], []
  for _ in range(3):
    target_B = rng.random(16).astype(np.float32)
    pred_B1 = (target_B + 0.3 * rng.standard_normal(16)).astype(np.float32)[:, None]
    weight_B = (rng.random(16) < 0.75).astype(np.float32)
    pred_B1[weight_B == 0] = 100.0  # padding rows: far off, they would swamp the correlation
    batch = labeled_batch(target_B, weight_B)
    out = jax.tree.map(np.asarray, objective(FixedOutput(pred_B1), None, batch, None, True))
    for k in [k for k in out if k.startswith("rows/")]:
      rows.setdefault(k, []).append(out.pop(k))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
    keep = weight_B > 0
    kept_pred.append(pred_B1[keep, 0])
    kept_target.append(target_B[keep])
  rows = {k: np.concatenate(v) for k, v in rows.items()}
  pred, target = np.concatenate(kept_pred), np.concatenate(kept_target)
  assert len(rows["rows/prediction"]) == 48 > len(pred)
  got = summarize_regress(sums, rows, bert.get_config("task=regress"), byte_level=False)
  assert set(got) == {"eval/loss", "eval/pearson", "eval/spearman"}
  assert got["eval/loss"] == pytest.approx(np.mean((pred - target) ** 2), rel=1e-5)
  assert got["eval/pearson"] == pytest.approx(scipy.stats.pearsonr(pred, target)[0], rel=1e-6)
  assert got["eval/spearman"] == pytest.approx(scipy.stats.spearmanr(pred, target)[0], rel=1e-6)
  assert got["eval/spearman"] > 0.5
  everything = scipy.stats.pearsonr(rows["rows/prediction"], rows["rows/target"])[0]
  assert abs(everything - got["eval/pearson"]) > 0.1
