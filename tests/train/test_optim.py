"""train/optim.py's two_stage schedule (BitNet b1.58): the learning rate against its
formulas, weight decay switched off from the split and really applied by the optimizer, its
validation, and a tiny BitNet model that trains with it."""

from __future__ import annotations

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, gpt
from tests.conftest import BITNET_TRAIN, STEPS
from tests.train.test_trainer import losses
from train.metrics import read_metrics
from train.optim import (
  cooldown_step,
  learning_rate_schedule,
  make_optimizer,
  weight_decay_schedule,
)
from train.validation import validate_config

LR, MIN_LR, COOL_LR, WD = 2e-3, 1e-4, 5e-4, 0.1


def two_stage(**changes):
  t = base.get_config().train
  t.update(
    dict(
      steps=100,
      warmup_steps=10,
      learning_rate=LR,
      min_learning_rate=MIN_LR,
      schedule="two_stage",
      cooldown_start=0.5,
      cooldown_learning_rate=COOL_LR,
      weight_decay=WD,
    )
  )
  t.update(changes)
  return t


def cosine(peak, end, step, length):
  """optax.cosine_decay_schedule(peak, length, alpha=end / peak) at step."""
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(step, length) / length))


def expected_lr(t, step):
  """The docstring's two-stage shape: warmup, stage 1's cosine, the drop, stage 2's cosine."""
  split = cooldown_step(t)
  if step < t.warmup_steps:
    return t.learning_rate * step / t.warmup_steps
  if step < split:
    return cosine(
      t.learning_rate, t.min_learning_rate, step - t.warmup_steps, t.steps - t.warmup_steps
    )
  return cosine(t.cooldown_learning_rate, t.min_learning_rate, step - split, t.steps - split)


def test_cooldown_step():
  assert cooldown_step(two_stage()) == 50
  assert cooldown_step(two_stage(cooldown_start=0.333)) == 33
  assert cooldown_step(two_stage(cooldown_start=0.05)) == 10  # never inside the warmup


def test_two_stage_learning_rate_values():
  t = two_stage()
  lr = learning_rate_schedule(t)
  for step in [0, 5, 10, 11, 30, 49, 50, 51, 75, 99, 100]:
    assert float(lr(step)) == pytest.approx(expected_lr(t, step), rel=1e-5, abs=1e-9), step
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(LR / 2, rel=1e-6)
  assert float(lr(10)) == pytest.approx(LR, rel=1e-6)  # peak at the end of the warmup
  # just before the split stage 1 is still high; at the split the rate drops at once
  assert float(lr(49)) > 2 * COOL_LR
  assert float(lr(50)) == pytest.approx(COOL_LR, rel=1e-6)
  assert float(lr(100)) == pytest.approx(MIN_LR, rel=1e-5)
  # stage 1 equals the one-stage cosine schedule until the split
  one_stage = learning_rate_schedule(two_stage(schedule="cosine"))
  for step in range(0, 50, 7):
    assert float(lr(step)) == pytest.approx(float(one_stage(step)), rel=1e-6)


def test_two_stage_weight_decay_is_zero_from_the_split():
  t = two_stage()
  wd = weight_decay_schedule(t)
  stage1 = np.array([float(wd(s)) for s in range(50)])
  assert stage1[0] == pytest.approx(WD)
  assert np.all(stage1 > 0) and np.all(np.diff(stage1) <= 0)
  for step in range(50, 101):
    assert float(wd(step)) == 0.0, step
  # other schedules keep weight decay constant
  constant = weight_decay_schedule(two_stage(schedule="cosine"))
  assert float(constant(0)) == float(constant(80)) == pytest.approx(WD)


def test_optimizer_decays_kernels_in_stage_1_only_and_never_norm_scales():
  """With zero gradients AdamW's update is the weight decay alone: a kernel shrinks by
  lr * wd of itself per step before the split and not at all after it; a norm scale never."""
  t = two_stage(steps=20, warmup_steps=2, cooldown_start=0.5, grad_clip=1.0)
  split = cooldown_step(t)
  lr, wd = learning_rate_schedule(t), weight_decay_schedule(t)
  params = {"dense": {"kernel": jnp.ones((3, 4))}, "norm": {"scale": jnp.ones((4,))}}
  tx = make_optimizer(t)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  update = jax.jit(tx.update)
  kernels = [1.0]
  for _ in range(t.steps):
    updates, state = update(zeros, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    k = np.asarray(params["dense"]["kernel"])
    assert np.all(k == k.flat[0])
    kernels.append(float(k.flat[0]))
    np.testing.assert_array_equal(params["norm"]["scale"], 1.0)
  for step in range(t.steps):  # kernels[step + 1] is after the update at count `step`
    expected = kernels[step] * (1 - float(lr(step)) * float(wd(step)))
    assert kernels[step + 1] == pytest.approx(expected, rel=1e-6), step
    if 0 < step < split:
      assert kernels[step + 1] < kernels[step], step
    elif step >= split:
      assert kernels[step + 1] == kernels[step], step
  assert kernels[split] < 1 - 5 * LR * WD  # it did shrink in stage 1


def gpt_tiny(**train):
  c = gpt.get_config("size=tiny")
  c.train.update(train)
  return c


@pytest.mark.parametrize(
  "train, pattern",
  [
    (
      dict(schedule="two_stage", cooldown_learning_rate=2e-3, learning_rate=1e-3),
      r"train\.cooldown_learning_rate=0\.002: must lie between train\.min_learning_rate=0\.0001 "
      r"and train\.learning_rate=0\.001 with train\.schedule='two_stage'",
    ),
    (
      dict(schedule="two_stage", cooldown_learning_rate=5e-5, min_learning_rate=1e-4),
      r"train\.cooldown_learning_rate=5e-05: must lie between",
    ),
    (dict(cooldown_start=1.5), r"train\.cooldown_start=1\.5: must be a probability in \[0, 1\]"),
    (dict(cooldown_start=-0.1), r"train\.cooldown_start=-0\.1: must be a probability"),
  ],
  ids=["cooldown_lr_above", "cooldown_lr_below", "cooldown_start_above", "cooldown_start_below"],
)
def test_two_stage_validation(train, pattern):
  with pytest.raises(ValueError, match=pattern):
    validate_config(gpt_tiny(**train))


def test_valid_two_stage_and_quant_configs_pass_and_bad_quant_is_named():
  validate_config(gpt_tiny(schedule="two_stage", cooldown_learning_rate=1e-3))  # = learning_rate
  validate_config(gpt_tiny(schedule="two_stage", cooldown_learning_rate=1e-4))  # = min
  validate_config(gpt_tiny(schedule="cosine", cooldown_learning_rate=1.0))  # not read
  for kind in ("none", "bitnet158", "bitnet1"):
    c = gpt_tiny()
    c.model.quant = kind
    validate_config(c)
  c = gpt_tiny()
  c.model.quant = "foo"
  with pytest.raises(
    ValueError, match=r"model\.quant='foo': allowed \['none', 'bitnet158', 'bitnet1'\]"
  ):
    validate_config(c)


def test_bitnet158_trains_with_the_two_stage_schedule(sweep_run):
  """TINY_ABLATION's bitnet158 run (trainer.run, in the sweep of tests/conftest.py)."""
  module, sweep_workdir, proc = sweep_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  spec = importlib.util.spec_from_file_location("tiny_ablation", module)
  ablation = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ablation)
  config = ablation.get_config("quant=bitnet158")
  assert config.train.schedule == "two_stage" and config.model.quant == "bitnet158"
  workdir = sweep_workdir / "quant=bitnet158"
  by_step = losses(workdir)
  steps = STEPS
  assert sorted(by_step) == list(range(1, steps + 1))
  assert all(np.isfinite(list(by_step.values())))
  first, last = [
    np.mean([by_step[s] for s in r]) for r in (range(1, 4), range(steps - 4, steps + 1))
  ]
  assert last < first - 1.0, by_step
  # the logged learning rate (of the step's update) follows the schedule, drop included
  rates = {r["step"]: r["train/learning_rate"] for r in read_metrics(workdir) if "train/loss" in r}
  split = cooldown_step(config.train)
  for step, rate in rates.items():
    assert rate == pytest.approx(expected_lr(config.train, step - 1), rel=1e-5, abs=1e-9), step
  assert rates[split] > 1.5 * rates[split + 1]
  assert rates[split + 1] == pytest.approx(BITNET_TRAIN["cooldown_learning_rate"], rel=1e-6)
  assert np.isfinite(read_metrics(workdir)[-1]["eval/loss"])
