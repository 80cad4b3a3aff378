"""bench/llamacpp.py's measurements without llama.cpp: the loss against a float64 log-softmax
written out here, the identical-prefix count, and the validation windows' shape and text."""

from __future__ import annotations

import numpy as np

from bench import llamacpp
from tests.tiny_models import tiny_config
from train.data.tokenizers import ByteTokenizer


def test_nll_is_the_log_softmax_of_the_target():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 4
  targets = rng.integers(0, 11, (3, 5))
  z = logits.astype(np.float64)
  want = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(llamacpp.nll(logits, targets), want, rtol=1e-12)


def test_agreement_counts_the_identical_prefix():
  a = np.array([5, 6, 7, 8])
  assert llamacpp.agreement(a, a) == (4, 4)
  assert llamacpp.agreement(a, np.array([5, 6, 0, 8])) == (3, 2)
  assert llamacpp.agreement(a, np.array([0, 6, 7, 8])) == (3, 0)


def test_validation_windows_are_the_validation_text(tmp_path):
  text = "".join(f"line {i} of the text\n" for i in range(400))
  path = tmp_path / "t.txt"
  path.write_text(text)
  config = tiny_config("llama", seq_len=16)
  config.data.name = f"text:{path}"
  tok = ByteTokenizer()
  w = llamacpp.validation_windows(config, tok, 100, 16)
  assert w.shape == (6, 16)
  decoded = tok.decode(w.reshape(-1))
  assert decoded in text and text.index(decoded) >= 0.85 * len(text)  # the held-out last 10%
