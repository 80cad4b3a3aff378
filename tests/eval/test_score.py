"""eval/scoring.py and `python -m eval.score`: a text's log-likelihood, tokens, bits per byte.

The models are tiny with random params (tests/tiny_models.py) written as workdirs, or the
imported tests/fixtures/hf checkpoints; 16-token contexts (6 in the strided test), so a
61-byte text needs several windows. The references are independent of the windowing:
float64 log-softmax of one forward pass, one forward pass per token on its own left
context, transformers' own logits, an exact enumeration of every mask of a 4-token window."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval import scoring
from eval.hf_io import import_hf
from modeling import diffusion
from modeling.vocab import FOURFOLD
from tests.tiny_models import abstract_init, draw_params, tiny_config
from train import families
from train.checkpoint import Checkpointer
from train.data.tokenizers import ByteTokenizer
from train.trainer import load_for_inference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
CONTEXT = 16  # the tiny models' context
WINDOW = 6  # a shorter window, for the strided test: 5 context lengths to compile
LONG_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"  # 61 bytes
LAST_LINE = re.compile(r"loglikelihood=(-?\d+\.\d+) tokens=(\d+) bits_per_byte=(\d+\.\d+)")


class BosByteTokenizer(ByteTokenizer):
  """Bytes, framed as Llama frames documents: BOS first."""

  specials = dataclasses.replace(FOURFOLD, add_bos=True)


def write_workdir(workdir, preset: str):
  """A workdir of `configs/<preset>.py:size=tiny` with random params, as eval.import_hf
  writes one (config.json and checkpoints/0): (config, model, params, tokenizer)."""
  config = tiny_config(preset, seq_len=CONTEXT)
  tokenizer = ByteTokenizer()
  model, _ = families.resolve(config).build(config, tokenizer)
  params = draw_params(abstract_init(model.cfg, type(model)))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  ckpt = Checkpointer(str(workdir), keep=1, async_save=False)
  ckpt.save(0, {"params": params}, None, force=True)
  ckpt.close()
  return config, model, params, tokenizer


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gpt")
  return workdir, *write_workdir(workdir, "gpt")


@pytest.fixture(scope="module")
def mdlm(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mdlm")
  return workdir, *write_workdir(workdir, "mdlm")


def run_score(*flags):
  cmd = [sys.executable, "-m", "eval.score", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def logprobs64(model, params, seq) -> np.ndarray:
  """[len(seq), V] float64 log-softmax of the model's logits on `seq`, one document."""
  seq = jnp.asarray(seq, jnp.int32)[None]
  pos = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
  logits, _ = model.apply({"params": params}, seq, pos, jnp.ones_like(seq))
  logits = np.asarray(logits[0], np.float64)
  top = logits.max(axis=-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


# ---- decoders


@pytest.mark.parametrize("tokenizer, prefix", [(ByteTokenizer(), 1), (BosByteTokenizer(), 2)])
def test_one_window_score_is_the_float64_sum_of_log_probs_after_the_prefix_token(
  gpt, tokenizer, prefix
):
  _, _, model, params, _ = gpt
  text = "naïve café"  # 10 characters, 12 bytes, 12 byte tokens: one window
  score = scoring.score_causal(model, params, tokenizer, text)
  seq = [prefix, *tokenizer.encode(text)]  # EOS (id 1), or BOS (id 2) where add_bos
  logp = logprobs64(model, params, seq)
  want = [logp[i, seq[i + 1]] for i in range(len(seq) - 1)]
  np.testing.assert_allclose(score.token_logprobs, want, rtol=1e-5, atol=1e-5)
  assert score.loglikelihood == pytest.approx(math.fsum(want), rel=1e-6)
  assert (score.tokens, score.bytes, score.windows) == (12, 12, 1)
  assert score.bits_per_byte == pytest.approx(-math.fsum(want) / math.log(2) / 12, rel=1e-6)
  assert not score.bound


def rolling_windows_of_lm_eval(token_list, prefix_token, max_seq_len):
  """lm-evaluation-harness's `get_rolling_token_windows` with context_len=1 followed by
  `make_disjoint_window`, transcribed (lm_eval/utils.py): (model input, predicted tokens)."""
  pred_len = max_seq_len
  first = min(max_seq_len, len(token_list))
  out = [([prefix_token, *token_list[: first - 1]], token_list[:first])]
  predicted = first
  while predicted < len(token_list):
    window_pred_len = min(len(token_list) - predicted, pred_len)
    window_end = predicted + window_pred_len
    context = token_list[window_end - max_seq_len - 1 : window_end - 1]
    pred = token_list[window_end - window_pred_len : window_end]
    context = context[: len(context) - (len(pred) - 1)]
    out.append(((context + pred)[:-1], pred))
    predicted += window_pred_len
  return out


@functools.cache
def apply_fn(model):
  return jax.jit(model.apply)


def last_logprobs(model, params, context) -> np.ndarray:
  """[V] float64 log p(next token | `context`), the context read alone as one document."""
  seq = jnp.asarray(context, jnp.int32)[None]
  pos = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
  logits = np.asarray(apply_fn(model)({"params": params}, seq, pos, jnp.ones_like(seq))[0])
  logits = logits[0, -1].astype(np.float64)
  return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


@pytest.mark.parametrize("stride", [1, 3, WINDOW - 1])
def test_strided_windows_score_each_token_once_with_the_left_context_its_window_gives(gpt, stride):
  _, _, model, params, tokenizer = gpt
  ids = list(tokenizer.encode(LONG_TEXT))
  seq = [1, *ids]  # EOS, then the text: seq[t] is text token t - 1
  score = scoring.score_causal(
    model, params, tokenizer, LONG_TEXT, context=WINDOW, stride=stride, batch_size=3
  )
  assert score.tokens == len(ids) == 61
  # The rule, written out: window k ends at e_k = min(C + k * stride, len(seq)), holds the
  # C tokens before its end and keeps the tokens from e_(k-1) on (e_(-1) = 1).
  want = []
  for t in range(1, len(seq)):
    k = 0 if t < WINDOW else (t - WINDOW) // stride + 1
    end = min(WINDOW + k * stride, len(seq))
    begin = max(0, end - WINDOW)
    assert min(t, WINDOW - stride) <= t - begin <= WINDOW - 1  # the context promised
    want.append(last_logprobs(model, params, seq[begin:t])[seq[t]])
  np.testing.assert_allclose(score.token_logprobs, want, rtol=1e-5, atol=1e-5)
  assert score.loglikelihood == pytest.approx(math.fsum(want), rel=1e-6)
  assert score.windows == 1 + -(-(len(seq) - WINDOW) // stride)
  if stride == WINDOW - 1:  # lm-evaluation-harness's loglikelihood_rolling, max length C - 1
    ours = [
      (seq[begin : end - 1], seq[first:end])
      for begin, first, end in scoring.causal_windows(len(seq), WINDOW, stride)
    ]
    assert ours == rolling_windows_of_lm_eval(ids, 1, WINDOW - 1)


def test_a_short_window_and_the_default_stride(gpt):
  _, _, model, params, tokenizer = gpt
  full = scoring.score_causal(model, params, tokenizer, LONG_TEXT)  # stride 8
  assert full.windows == 1 + -(-(62 - 16) // 8)
  short = scoring.score_causal(model, params, tokenizer, LONG_TEXT, context=4, stride=2)
  assert short.windows == 1 + (62 - 4) // 2 and short.tokens == 61
  # a window of 4 holds 3 inputs: text token 9 (seq[10]) is predicted from seq[8:10] alone
  seq = [1, *tokenizer.encode(LONG_TEXT)]
  want = logprobs64(model, params, seq[8:10])[-1, seq[10]]
  assert short.token_logprobs[9] == pytest.approx(want, rel=1e-5)
  assert short.loglikelihood != pytest.approx(full.loglikelihood, rel=1e-3)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """name -> (model, params, tokenizer, reference.npz) of an imported tests/fixtures/hf model."""
  out = {}
  for name in ("gpt2", "llama2"):
    workdir = str(tmp_path_factory.mktemp(name))
    import_hf(os.path.join(FIXTURES, name), workdir)
    _, model, params, tokenizer = load_for_inference(workdir)
    out[name] = model, params, tokenizer, np.load(os.path.join(FIXTURES, name, "reference.npz"))
  return out


def test_an_imported_llama_scores_its_first_token_after_bos_as_transformers_does(imported):
  model, params, tokenizer, ref = imported["llama2"]
  ids = ref["input_ids"][0]  # BOS (1), then 255 tokens of functools.py
  text = tokenizer.decode(ids[1:])
  assert tokenizer.specials.add_bos and ids[0] == tokenizer.specials.bos == 1
  score = scoring.score_causal(model, params, tokenizer, text)  # one window of 256
  logits = ref["logits"][0].astype(np.float64)  # transformers' own, on the same ids
  logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  want = logp[np.arange(255), ids[1:]]
  np.testing.assert_allclose(score.token_logprobs, want, atol=2e-4)
  assert score.tokens == 255 and score.bytes == len(text.encode("utf-8"))


def test_an_imported_gpt2_scores_its_first_token_after_endoftext(imported):
  model, params, tokenizer, ref = imported["gpt2"]
  ids = ref["input_ids"][0][:100]  # GPT-2 adds no BOS: 100 tokens of functools.py
  text = tokenizer.decode(ids)
  assert not tokenizer.specials.add_bos and tokenizer.specials.eos == 383  # <|endoftext|>
  score = scoring.score_causal(model, params, tokenizer, text)
  logp = logprobs64(model, params, [383, *ids])
  want = logp[np.arange(100), ids]
  np.testing.assert_allclose(score.token_logprobs, want, rtol=1e-5, atol=1e-5)
  assert "the first given the EOS token (id 383)" in score.notes[0]


def test_window_and_stride_outside_the_context_are_refused(gpt):
  _, _, model, params, tokenizer = gpt
  with pytest.raises(ValueError, match=r"--max_len=17: allowed 2\.\.16"):
    scoring.score_causal(model, params, tokenizer, LONG_TEXT, context=17)
  with pytest.raises(ValueError, match=r"--stride=16: allowed 1\.\.15"):
    scoring.score_causal(model, params, tokenizer, LONG_TEXT, stride=16)
  with pytest.raises(ValueError, match=r"--max_len=1: allowed 2\.\.16"):
    scoring.score_causal(model, params, tokenizer, LONG_TEXT, context=1)
  with pytest.raises(ValueError, match="encodes to no tokens"):
    scoring.score_causal(model, params, tokenizer, "")


def test_cli_last_line_is_the_score(gpt, tmp_path):
  workdir, _, model, params, tokenizer = gpt
  want = scoring.score_causal(model, params, tokenizer, LONG_TEXT, stride=5)
  (tmp_path / "text.txt").write_text(LONG_TEXT, encoding="utf-8")
  out = run_score(f"--workdir={workdir}", f"--text_file={tmp_path / 'text.txt'}", "--stride=5")
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.rstrip("\n").splitlines()[-1]
  match = LAST_LINE.fullmatch(last)
  assert match, last
  ll, tokens, bpb = float(match[1]), int(match[2]), float(match[3])
  assert ll == pytest.approx(want.loglikelihood, abs=2e-5) and tokens == 61
  assert bpb == pytest.approx(-ll / math.log(2) / 61, abs=2e-6)
  assert "the first given the EOS token (id 1)" in out.stdout
  assert "windows 11/11" in out.stderr  # progress goes to stderr, never after the score


def test_cli_refuses_a_workdir_without_a_config(tmp_path):
  (tmp_path / "text.txt").write_text("hello", encoding="utf-8")
  out = run_score(f"--workdir={tmp_path}", f"--text_file={tmp_path / 'text.txt'}")
  assert out.returncode != 0 and not out.stdout
  assert "no config.json" in out.stderr and "Traceback" not in out.stderr


def test_a_flag_the_family_does_not_read_is_refused(gpt, mdlm):
  config, model, params, tokenizer = gpt[1:]
  with pytest.raises(
    ValueError, match=r"--mc_samples: model.family='decoder' scoring reads only \['--stride'\]"
  ):
    scoring.score_text(config, model, params, tokenizer, "hello", mc_samples=4)
  config, model, params, tokenizer = mdlm[1:]
  with pytest.raises(ValueError, match=r"--stride: model.family='diffusion'"):
    scoring.score_text(config, model, params, tokenizer, "hello", stride=4)


def test_missing_empty_and_binary_files_are_refused(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    scoring.read_text(str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="the file is empty"):
    scoring.read_text(str(tmp_path / "empty.txt"))
  (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
  with pytest.raises(ValueError, match="not UTF-8 text"):
    scoring.read_text(str(tmp_path / "latin1.txt"))
  (tmp_path / "ok.txt").write_bytes("café\n".encode())
  assert scoring.read_text(str(tmp_path / "ok.txt")) == "café\n"


@pytest.mark.parametrize("preset", ["t5", "bert"])
def test_encdec_and_encoder_models_are_refused(preset):
  config = tiny_config(preset)
  with pytest.raises(ValueError) as e:
    scoring.score_text(config, None, None, ByteTokenizer(), LONG_TEXT)
  family = config.model.family
  assert f"model.family={family!r}" in str(e.value)
  assert "model.family in ['decoder', 'diffusion']" in str(e.value)


# ---- masked diffusion


def test_diffusion_bound_is_reproducible_under_a_seed_and_says_so(mdlm):
  _, _, model, params, tokenizer = mdlm
  text = LONG_TEXT  # 4 windows of 16, the last of 13 tokens

  def bound(seed, batch_size):
    return scoring.score_diffusion(
      model, params, tokenizer, text, mc_samples=4, seed=seed, batch_size=batch_size
    )

  a, b = bound(0, 3), bound(0, 3)
  assert a.loglikelihood == b.loglikelihood and a.bound
  # each window's draws are keyed on (seed, window), not on the batch it falls in
  assert bound(0, 1).loglikelihood == pytest.approx(a.loglikelihood, rel=1e-5)
  assert bound(1, 3).loglikelihood != pytest.approx(a.loglikelihood, rel=1e-5)
  assert (a.tokens, a.bytes, a.windows) == (61, 61, 4)
  assert any("lower bound on the log-likelihood" in line for line in a.notes)


def test_diffusion_draws_are_the_librarys_nelbo(mdlm):
  _, config, model, params, tokenizer = mdlm
  text, k, seed = "to be or not", 6, 3
  score = scoring.score_diffusion(model, params, tokenizer, text, mc_samples=k, seed=seed)
  tokens = jnp.broadcast_to(jnp.asarray(tokenizer.encode(text)), (k, 12))
  seg = jnp.ones_like(tokens)

  def logits_fn(z, t):
    pos = jnp.broadcast_to(jnp.arange(12), z.shape)
    return diffusion.denoise(model, params, z, pos, seg, t)

  schedule = diffusion.make_schedule(config.task.schedule)
  nelbo = jax.jit(lambda rng: diffusion.nelbo_sum(logits_fn, rng, tokens, seg, schedule))(
    scoring.window_key(seed, 0)
  )
  assert score.loglikelihood == pytest.approx(-float(nelbo) / k, rel=1e-5)


def exact_nelbo(model, params, ids) -> float:
  """The NELBO of one window by enumeration: a time-independent denoiser's NELBO is
  sum over nonempty masks S of B(|S|, n - |S| + 1) * sum over l in S of -log p(x_l | x
  with S masked) (the log-linear schedule's integral of 1/t t^|S| (1 - t)^(n - |S|))."""
  n = len(ids)
  masks = [s for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]
  z = np.tile(ids, (len(masks), 1))
  for row, s in enumerate(masks):
    z[row, list(s)] = diffusion.MASK_ID
  pos = jnp.broadcast_to(jnp.arange(n), z.shape)
  denoise = jax.jit(lambda z: diffusion.denoise(model, params, z, pos, jnp.ones_like(pos), None))
  logits = denoise(jnp.asarray(z))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
  total = 0.0
  for row, s in enumerate(masks):
    k = len(s)
    beta = math.factorial(k - 1) * math.factorial(n - k) / math.factorial(n)
    total += beta * sum(-logp[row, i, ids[i]] for i in s)
  return total


def test_diffusion_bound_converges_to_the_exact_nelbo(mdlm):
  _, _, model, params, tokenizer = mdlm
  assert not model.cfg.time_conditioning
  text, k = "abcd", 1024
  score = scoring.score_diffusion(model, params, tokenizer, text, mc_samples=k, seed=0)
  exact = exact_nelbo(model, params, np.asarray(tokenizer.encode(text)))
  # the draws are stratified, so their spread overstates the mean's error
  assert abs(score.loglikelihood + exact) < 4 * score.draw_std / math.sqrt(k)


def test_cli_diffusion_prints_the_bound(mdlm, tmp_path):
  workdir, _, model, params, tokenizer = mdlm
  want = scoring.score_diffusion(
    model, params, tokenizer, LONG_TEXT, mc_samples=2, seed=5, batch_size=2
  )
  (tmp_path / "text.txt").write_text(LONG_TEXT, encoding="utf-8")
  flags = ("--mc_samples=2", "--seed=5", "--batch_size=2")
  out = run_score(f"--workdir={workdir}", f"--text_file={tmp_path / 'text.txt'}", *flags)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.rstrip("\n").splitlines()
  assert "an estimate of a lower bound on the log-likelihood" in out.stdout
  match = LAST_LINE.fullmatch(lines[-1])
  assert match and int(match[2]) == 61
  assert float(match[1]) == pytest.approx(want.loglikelihood, abs=2e-5)
