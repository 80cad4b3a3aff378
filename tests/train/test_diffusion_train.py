"""Masked diffusion training (configs/mdlm.py, train/objectives.py make_diffusion): the NELBO
objective's sums, summarize_diffusion, validation, and a tiny model trained on the default
corpus end to end (metrics, exact resume)."""

from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from configs import mdlm
from modeling.vocab import MASK_ID, NUM_SPECIAL
from tests.tiny_models import MDLM_STEPS, random_params, tiny_mdlm
from train import families, trainer
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics
from train.objectives import summarize_diffusion
from train.validation import validate_config

VOCAB = ByteTokenizer.vocab_size
STEPS = MDLM_STEPS


def by_step(workdir, key: str) -> dict[int, float]:
  return {r["step"]: r[key] for r in read_metrics(workdir) if key in r}


def test_mdlm_tiny_trains_on_the_default_corpus(mdlm_run):
  """The run of the session fixture `mdlm_run` (tests/conftest.py): tiny_mdlm() as is
  (tests/tiny_models.py)."""
  workdir, _, last = mdlm_run
  assert mdlm.get_config("size=tiny").data.name == "pystdlib"
  loss = by_step(workdir, "train/loss")
  assert sorted(loss) == list(range(1, STEPS + 1))
  early = np.mean([loss[s] for s in range(1, 4)])
  late = np.mean([loss[s] for s in range(STEPS - 4, STEPS + 1)])
  assert early == pytest.approx(math.log(VOCAB), abs=1.0)  # near uniform at the start
  assert late < early - 1.0, loss
  evals = {r["step"]: r for r in read_metrics(workdir) if "eval/loss" in r}
  assert sorted(evals) == [STEPS // 2, STEPS]
  first, final = evals[STEPS // 2], evals[STEPS]
  # A uniform guess scores log(V - 1) (never [MASK]); the model learned far more than that.
  assert final["eval/loss"] < first["eval/loss"] < math.log(VOCAB) - 2.0, (first, final)
  assert {k: v for k, v in final.items() if k != "step"} == last
  for m in (first, final):
    assert m["eval/perplexity"] == pytest.approx(math.exp(m["eval/loss"]), rel=1e-6)
    # The bound per byte: a byte-level model's tokens are bytes, plus one EOS per document.
    assert m["eval/bits_per_byte"] == pytest.approx(m["eval/loss"] / math.log(2), rel=0.05)
    assert m["eval/bits_per_byte"] >= m["eval/loss"] / math.log(2)
    assert 0 < m["eval/loss_draw_std"] < 0.5 * m["eval/loss"]
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS // 2), str(STEPS)]


def test_mdlm_resumes_exactly(mdlm_run, tmp_path):
  workdir, tfds_dir, last = mdlm_run
  # Resume from the mid-run checkpoint: a copy of the run as it was after step STEPS / 2.
  mid = str(STEPS // 2)
  shutil.copytree(workdir / "checkpoints" / mid, tmp_path / "checkpoints" / mid)
  resumed_last = trainer.run(tiny_mdlm(tfds_dir), str(tmp_path))
  # Times and masks of a step come from fold_in(seed, step): the resumed steps see the same.
  loss, resumed = by_step(workdir, "train/loss"), by_step(tmp_path, "train/loss")
  assert sorted(resumed) == list(range(STEPS // 2 + 1, STEPS + 1))
  assert resumed == {s: loss[s] for s in resumed}
  for key in ("eval/loss", "eval/loss_draw_std", "eval/bits_per_byte"):
    assert resumed_last[key] == last[key], key


class Recorder:
  """A model whose `apply` records the input tokens of every call."""

  def __init__(self, model):
    self.cfg, self.calls = model.cfg, []
    self._apply = jax.jit(model.apply, static_argnames="deterministic")

  def apply(self, variables, tokens_BL, *args, **kwargs):
    self.calls.append(np.asarray(tokens_BL))
    return self._apply(variables, tokens_BL, *args, **kwargs)


def test_eval_objective_averages_draws_keyed_on_the_batch():
  config = mdlm.get_config("size=tiny")
  config.data.seq_len = 16
  config.task.eval_t_samples = 3
  model, objective = families.resolve(config).build(config, ByteTokenizer())
  model, params = Recorder(model), random_params(model.cfg)
  rng = np.random.default_rng(0)
  tokens_BL = rng.integers(0, VOCAB, (4, 16)).astype(np.int32)
  seg_BL = np.ones((4, 16), np.int32)
  seg_BL[1, 10:] = 0
  pos_BL = np.broadcast_to(np.arange(16, dtype=np.int32), (4, 16))
  batch = {"tokens": tokens_BL, "segment_ids": seg_BL, "positions": pos_BL}

  def evaluate(b):
    model.calls.clear()
    sums = objective(model, params, b, jax.random.key(0), deterministic=True)
    return {k: np.asarray(v) for k, v in sums.items()}, [z == MASK_ID for z in model.calls]

  sums, masks = evaluate(batch)
  draws = sums["loss_draws"]
  assert draws.shape == (3,) and len(masks) == 3
  assert float(sums["loss_sum"]) == pytest.approx(draws.mean(), rel=1e-6)
  assert float(sums["weight"]) == (seg_BL > 0).sum()
  assert float(sums["bytes"]) == ((seg_BL > 0) & (tokens_BL >= NUM_SPECIAL)).sum()
  assert not any(m[seg_BL == 0].any() for m in masks)  # padding is never masked
  assert len({m.tobytes() for m in masks}) == 3  # each draw its own times and masks
  again, masks_again = evaluate(batch)
  np.testing.assert_array_equal(again["loss_draws"], draws)  # evaluation is reproducible
  # Another batch (same layout, other tokens) gets other times and masks.
  _, other_masks = evaluate(dict(batch, tokens=np.roll(tokens_BL, 1, axis=1)))
  assert all((o != m).any() for o, m in zip(other_masks, masks, strict=True))


def test_count_estimator_trains_with_exact_counts_and_evaluates_with_times():
  config = mdlm.get_config("size=tiny")
  config.data.seq_len = 16
  config.task.estimator = "count"
  config.task.eval_t_samples = 1
  model, objective = families.resolve(config).build(config, ByteTokenizer())
  model, params = Recorder(model), random_params(model.cfg)
  rng = np.random.default_rng(1)
  tokens_BL = rng.integers(NUM_SPECIAL, VOCAB, (64, 16)).astype(np.int32)
  seg_BL = np.ones((64, 16), np.int32)
  pos_BL = np.broadcast_to(np.arange(16, dtype=np.int32), (64, 16))
  batch = {"tokens": tokens_BL, "segment_ids": seg_BL, "positions": pos_BL}
  model.calls.clear()
  objective(model, params, batch, jax.random.key(0), deterministic=False)
  (z_BL,) = model.calls
  # k ~ U{1..16} stratified over 64 rows: each count 4 times
  np.testing.assert_array_equal(np.bincount((z_BL == MASK_ID).sum(-1), minlength=17)[1:], 4)
  model.calls.clear()
  objective(model, params, batch, jax.random.key(0), deterministic=True)
  (z_BL,) = model.calls
  counts = np.bincount((z_BL == MASK_ID).sum(-1), minlength=17)
  assert counts[0] > 0 or counts.max() > 4  # evaluation: independent masks, binomial counts


def test_summarize_diffusion_reports_the_spread_of_the_draws():
  draws = np.array([410.0, 395.0, 430.0, 402.0])
  sums = {"loss_sum": draws.mean(), "loss_draws": draws, "weight": 100.0, "bytes": 90.0}
  out = summarize_diffusion(sums, {}, None, byte_level=True)
  assert out["eval/loss"] == pytest.approx(draws.mean() / 100)
  assert out["eval/perplexity"] == pytest.approx(math.exp(draws.mean() / 100))
  assert out["eval/loss_draw_std"] == pytest.approx(np.std(draws / 100, ddof=1), rel=1e-12)
  assert out["eval/bits_per_byte"] == pytest.approx(draws.mean() / math.log(2) / 90)
  one = summarize_diffusion(dict(sums, loss_draws=draws[:1]), {}, None, byte_level=False)
  assert one["eval/loss_draw_std"] == 0.0 and "eval/bits_per_byte" not in one


@pytest.mark.parametrize("size", ["tiny", "XS", "S", "M", "L", "1B"])
def test_every_mdlm_size_is_valid(size):
  validate_config(mdlm.get_config(f"size={size}"))


@pytest.mark.parametrize(
  "key, value, pattern",
  [
    ("schedule", "foo", r"task\.schedule='foo': allowed \['loglinear', 'cosine', 'polynomial'\]"),
    ("eval_t_samples", 0, r"task\.eval_t_samples=0: must be > 0"),
    ("schedule_exponent", 0.0, r"task\.schedule_exponent=0\.0: must be > 0"),
  ],
)
def test_validation_names_the_diffusion_keys(key, value, pattern):
  c = mdlm.get_config("size=tiny")
  c.task[key] = value
  with pytest.raises(ValueError, match=pattern):
    validate_config(c)


def test_end_of_run_samples_must_fit_the_diffusion_context():
  c = mdlm.get_config("size=tiny")
  c.data.seq_len = 32
  c.train.sample_tokens = 26
  c.train.num_samples = 1  # 'def ' (4 bytes) + 26 fits 32
  validate_config(c)
  c.train.num_samples = 3  # 'import ' (7 bytes) + 26 does not
  with pytest.raises(ValueError, match=r"train.sample_tokens=26: .*context \(32\).*\(7 tokens\)"):
    validate_config(c)
  c.train.num_samples = 0
  validate_config(c)


def test_a_workdir_saved_before_a_key_existed_still_loads(mdlm_workdir, tmp_path):
  """config.json of an older run lacks keys added since: they take base.py's defaults."""
  old = tmp_path / "old"
  shutil.copytree(mdlm_workdir, old)
  path = old / "config.json"
  saved = json.loads(path.read_text())
  del saved["model"]["time_conditioning"], saved["task"]["eval_t_samples"]
  path.write_text(json.dumps(saved))
  config, model, params, _ = trainer.load_for_inference(str(old))
  assert config.model.time_conditioning is False and config.task.eval_t_samples == 4
  assert config.model.family == "diffusion" and not model.cfg.time_conditioning
  _, _, ref_params, _ = trainer.load_for_inference(str(mdlm_workdir))
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, ref_params)))
