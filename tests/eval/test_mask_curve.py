"""The loss at fixed mask ratios (modeling/diffusion.py masked_nll_at, python -m eval.mask_curve):
the masked counts, the curve's mean against the NELBO enumerated exactly, and the CLI on a
trained tiny diffusion workdir."""

import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from eval.evaluate import mask_curve
from modeling import diffusion
from modeling.vocab import MASK_ID, NUM_SPECIAL
from train import families
from train.trainer import load_for_inference

REPO = __file__.rsplit("/tests/", 1)[0]


def test_each_row_masks_ceil_ratio_times_its_tokens():
  n_B = np.array([10, 7, 1, 3])
  seg_BL = jnp.asarray(np.arange(12) < n_B[:, None], jnp.int32)
  tokens_BL = jnp.full(seg_BL.shape, NUM_SPECIAL, jnp.int32)
  seen = []

  def record(z_BL, t_B):
    seen.append((np.asarray(z_BL), np.asarray(t_B)))
    return jnp.zeros((*z_BL.shape, 16))

  for ratio, want in ((0.05, [1, 1, 1, 1]), (0.35, [4, 3, 1, 2]), (0.5, [5, 4, 1, 2])):
    seen.clear()
    total, count = diffusion.masked_nll_at(record, jax.random.key(0), tokens_BL, seg_BL, ratio)
    masked_BL = seen[0][0] == MASK_ID
    np.testing.assert_array_equal(masked_BL.sum(-1), want)
    assert not (masked_BL & (np.asarray(seg_BL) == 0)).any()  # never padding
    assert int(count) == sum(want)
    assert float(total) == pytest.approx(sum(want) * math.log(15), rel=1e-6)  # uniform on 15


def test_the_mean_over_midpoints_is_the_nelbo_enumerated_exactly():
  """A mask-dependent random denoiser on rows of 5 tokens: at ratios (i - 1/2)/5 the curve's
  mean is sum_k 1/n E[mean cross-entropy of a k-subset], the NELBO per token."""
  length, vocab, rows = 5, 9, 4096
  w_LLV = np.random.default_rng(3).normal(size=(length, length, vocab))

  def denoiser(z_BL, t_B):
    del t_B
    return jnp.einsum("bj,jlv->blv", (z_BL == MASK_ID).astype(jnp.float32), w_LLV)

  x_L = np.array([4, 8, 5, 4, 7])
  tokens_BL = jnp.asarray(np.tile(x_L, (rows, 1)), jnp.int32)
  seg_BL = jnp.ones_like(tokens_BL)
  exact = 0.0
  for bits in range(1, 2**length):
    m_L = np.array([(bits >> i) & 1 for i in range(length)], bool)
    logits_LV = np.einsum("j,jlv->lv", m_L.astype(np.float64), w_LLV)
    logits_LV[:, MASK_ID] = -np.inf
    logp_LV = logits_LV - scipy.special.logsumexp(logits_LV, axis=-1, keepdims=True)
    nll = -logp_LV[np.arange(length), x_L][m_L].sum()
    exact += nll / m_L.sum() / math.comb(length, m_L.sum()) / length
  curve = []
  for i in range(length):
    total, count = diffusion.masked_nll_at(
      denoiser, jax.random.key(i), tokens_BL, seg_BL, (i + 0.5) / length
    )
    assert int(count) == rows * (i + 1)
    curve.append(float(total) / float(count))
  assert np.mean(curve) == pytest.approx(exact, rel=5e-3)
  # one count per ratio: the curve is not flat for this denoiser, so a wrong count would show
  assert max(curve) - min(curve) > 0.05


def test_mask_curve_of_a_trained_model_counts_every_row(mdlm_run):
  workdir, _, _ = mdlm_run
  config, model, params, tokenizer = load_for_inference(str(workdir))
  ratios = [0.1, 0.5, 1.0]
  curve = mask_curve(config, model, params, tokenizer, ratios, eval_steps=2, seed=1)
  task = families.resolve(config).task
  rows = config.train.eval_batch_size or config.train.batch_size
  batches = list(task.eval_batches(config, tokenizer, batch_size=rows, max_batches=2))
  n_B = np.concatenate([(b["segment_ids"] > 0).sum(-1) for b in batches])
  want = [int(np.clip(np.ceil(r * n_B - 1e-6), 1, n_B).sum()) for r in ratios]
  assert [(r, n) for r, _, n in curve] == list(zip(ratios, want, strict=True))
  assert all(0 < v < math.log(tokenizer.vocab_size) + 1 for _, v, _ in curve)
  with pytest.raises(ValueError, match=r"--ratios: \[0\.0, 1\.5\] outside \(0, 1\]"):
    mask_curve(config, model, params, tokenizer, [0.0, 0.5, 1.5])
  config.model.family = "decoder"
  with pytest.raises(ValueError, match="model.family='decoder'"):
    mask_curve(config, model, params, tokenizer, ratios)


def test_mask_curve_cli_prints_the_table(mdlm_workdir):
  cmd = [sys.executable, "-m", "eval.mask_curve", f"--workdir={mdlm_workdir}", "--ratios=0.1,0.9"]
  out = subprocess.run([*cmd, "--eval_steps=1"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  rows = re.findall(r"^(0\.\d+)\s+(\d+\.\d+)\s+(\d+)$", out.stdout, re.M)
  assert [r for r, _, _ in rows] == ["0.100", "0.900"]
  assert re.search(r"^mean over the ratios: \d+\.\d{4}$", out.stdout, re.M)
