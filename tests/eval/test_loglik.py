"""eval/loglik.py: log-likelihoods of (context, continuation) requests for every family.

Tiny random-init workdirs (tests/eval/test_score.py's `write_workdir`: 16-token contexts,
byte tokens). The references are independent of the batching: a float64 log-softmax of
one unbatched forward pass per request (one per masked token for the encoder), the exact
enumeration of every mask of a 3-token continuation for diffusion, lm-evaluation-harness's
own rolling windows, and the project's samplers called directly.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval import utils as lm_utils

from eval import loglik, scoring
from eval.loglik import Scorer
from modeling import decoding, diffusion
from tests.eval.test_score import CONTEXT, LONG_TEXT, apply_fn, write_workdir

# (context, continuation): an empty context, trailing spaces, contexts that overflow the
# model's (few distinct lengths: each reference shape compiles once)
REQUESTS = [
  ("Question: 2+2?\nAnswer:", " 4"),
  ("", "abc"),
  ("The sky today is ", "blue"),
  ("a" * 30, " over!"),
  ("ok", " fine."),
]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
  out = {}
  for preset in ("gpt", "t5", "mdlm", "bert"):
    workdir = tmp_path_factory.mktemp(preset)
    write_workdir(workdir, preset)
    out[preset] = Scorer.from_workdir(str(workdir), batch_size=3, mc_samples=48, seed=0)
  return out


def log_softmax64(logits) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  top = x.max(axis=-1, keepdims=True)
  return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def forward64(s: Scorer, rows, **kw) -> np.ndarray:
  """[B, L, V] float64 log-softmax of the logits of one forward call on unpadded `rows`
  (each one document from position 0)."""
  x = jnp.asarray(rows, jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape)
  logits, _ = apply_fn(s.model)({"params": s.params}, x, pos, jnp.ones_like(x), **kw)
  return log_softmax64(logits)


def causal_logp(s: Scorer, seq) -> np.ndarray:
  """[len(seq), V] float64 log p(next token | seq[:i + 1]): one forward call on `seq`
  followed by filler up to the context, which a causal model's earlier positions never see
  (so every reference shares one shape)."""
  return forward64(s, [[*seq, *[0] * (CONTEXT - len(seq))]])[0, : len(seq)]


def reorderings(s: Scorer, requests, reference):
  """Each request's result at batch size 1, 3 and in a shuffled order at 3, against
  `reference(ctx, cont) -> (log p, is_greedy)`; all must agree to 1e-5."""
  pairs = [s.encode_pair(c, x) for c, x in requests]
  want = [reference(ctx, cont) for ctx, cont in pairs]
  order = list(range(len(pairs)))
  random.Random(0).shuffle(order)
  shuffled = [None] * len(pairs)
  for i, r in zip(order, s.loglikelihood_tokens([pairs[i] for i in order]), strict=True):
    shuffled[i] = r
  for got in (
    dataclasses.replace(s, batch_size=1).loglikelihood(requests),
    s.loglikelihood(requests),
    shuffled,
  ):
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-6, atol=1e-5)
    assert [g[1] for g in got] == [w[1] for w in want]
  return pairs, want


# ---- decoders


def causal_reference(s: Scorer):
  def reference(ctx, cont):
    seq = (ctx + cont)[-(CONTEXT + 1) :]
    logp = causal_logp(s, seq[:-1])
    rows = range(len(seq) - 1 - len(cont), len(seq) - 1)
    values = [logp[i, seq[i + 1]] for i in rows]
    return math.fsum(values), all(logp[i].argmax() == seq[i + 1] for i in rows)

  return reference


def greedy_tokens(s: Scorer, ctx: list[int], n: int) -> list[int]:
  """n tokens, each the argmax of a float64 forward pass on all before it."""
  seq = list(ctx)
  for _ in range(n):
    seq.append(int(causal_logp(s, seq)[-1].argmax()))
  return seq[len(ctx) :]


def test_decoder_loglikelihood_is_the_float64_forward_sum_whatever_the_batch_and_order(scorers):
  s = scorers["gpt"]
  pairs, want = reorderings(s, REQUESTS, causal_reference(s))
  assert pairs[1] == ([1], [ord(c) + 8 for c in "abc"])  # empty context: the prefix (EOS)
  assert pairs[2][1][0] == ord(" ") + 8  # the context's trailing space moved over
  assert len(pairs[3][0]) + len(pairs[3][1]) > CONTEXT + 1  # left-truncated
  # is_greedy both ways: the argmax continuation of a context, and one token changed
  ctx = s.encode("Hello")
  best = greedy_tokens(s, ctx, 3)
  worse = [*best[:2], 9 if best[2] != 9 else 10]
  got = s.loglikelihood_tokens([(ctx, best), (ctx, worse)])
  assert [g[1] for g in got] == [True, False]
  np.testing.assert_allclose(got[0][0], causal_reference(s)(ctx, best)[0], atol=1e-5)


def test_an_add_bos_tokenizer_frames_contexts_and_empty_ones_with_bos(scorers):
  s = scorers["gpt"]
  bos = dataclasses.replace(s.specials, add_bos=True)
  tok = type("BosBytes", (type(s.tokenizer),), {"specials": bos})()
  b = dataclasses.replace(s, tokenizer=tok)
  assert b.prefix_token_id == 2 and b.encode("ab") == [2, ord("a") + 8, ord("b") + 8]
  assert b.encode_pair("", "ab") == ([2], [ord("a") + 8, ord("b") + 8])
  assert b.encode_pair("x", " y") == ([2, ord("x") + 8], [ord(" ") + 8, ord("y") + 8])


def test_bad_requests_and_settings_are_refused(scorers):
  s = scorers["gpt"]
  with pytest.raises(ValueError, match="continuation of context 'ab' is empty"):
    s.loglikelihood([("ab", "")])
  with pytest.raises(ValueError, match=r"a continuation of 17 tokens: allowed 1\.\.16"):
    s.loglikelihood_tokens([([1], [9] * 17)])
  with pytest.raises(ValueError, match="mc_samples=0: allowed a positive integer"):
    dataclasses.replace(s, mc_samples=0)
  with pytest.raises(ValueError, match=r"gen_kwargs \['beam'\]: model.family='decoder' reads"):
    s.generate_until([("ab", {"beam": 2})])


# ---- encoder-decoders


def test_encdec_loglikelihood_is_the_teacher_forced_float64_sum(scorers):
  s = scorers["t5"]
  start = s.specials.decoder_start

  def reference(ctx, cont):
    # the source unpadded; the decoder's input followed by filler (causal: unseen)
    tin = jnp.asarray([[start, *cont[:-1], *[0] * (CONTEXT - len(cont))]], jnp.int32)
    tpos = jnp.arange(CONTEXT)[None]
    kw = dict(targets_in_BL=tin, targets_positions_BL=tpos, targets_segment_ids_BL=tpos * 0 + 1)
    logp = forward64(s, [ctx[-CONTEXT:]], **kw)[0]
    values = [logp[i, t] for i, t in enumerate(cont)]
    return math.fsum(values), all(logp[i].argmax() == t for i, t in enumerate(cont))

  pairs, _ = reorderings(s, REQUESTS, reference)
  eos = s.specials.eos
  assert pairs[0][0][-1] == eos and pairs[0][1] == [ord(c) + 8 for c in " 4"]  # each apart
  assert pairs[1][0] == [eos]  # an empty context: the prefix token (EOS) as the source


# ---- masked diffusion


def denoised_logp(s: Scorer, rows) -> np.ndarray:
  """[B, L, V] float64 log-probs of the SUBS denoiser (no [MASK]) on unpadded `rows`."""
  logp = forward64(s, rows)
  logp[..., diffusion.MASK_ID] = -np.inf
  return logp - np.log(np.exp(logp).sum(axis=-1, keepdims=True))


def exact_conditional_nelbo(s: Scorer, ctx, cont):
  """(E of LLaDA's estimator, its variance over 16 draws per masked count k) by enumerating
  every nonempty subset S of the continuation: E = sum_k 1/k mean_{|S|=k} sum_{l in S} nll."""
  n, c = len(cont), len(ctx)
  subsets = [x for k in range(1, n + 1) for x in itertools.combinations(range(n), k)]
  z = np.tile([*ctx, *cont], (len(subsets), 1))
  for row, subset in enumerate(subsets):
    z[row, [c + i for i in subset]] = diffusion.MASK_ID
  logp = denoised_logp(s, z)
  mean, var = 0.0, 0.0
  for k in range(1, n + 1):
    values = [
      n / k * sum(-logp[row, c + i, cont[i]] for i in subset)
      for row, subset in enumerate(subsets)
      if len(subset) == k
    ]
    mean += np.mean(values) / n
    var += np.var(values) * 16 / (16 * n) ** 2
  return mean, var


def test_diffusion_one_token_continuation_is_exact_and_any_is_batch_and_order_free(scorers):
  s = scorers["mdlm"]
  assert not s.model.cfg.time_conditioning  # LLaDA's count estimator
  exact = []

  def reference(ctx, cont):  # only one-token continuations are exact whatever the draws
    if len(cont) != 1:
      return s.loglikelihood_tokens([(ctx, cont)])[0]
    exact.append(cont)
    logp = denoised_logp(s, [[*ctx[-(CONTEXT - 1) :], diffusion.MASK_ID]])[0, -1]
    return logp[cont[0]], logp.argmax() == cont[0]

  one_token = [("Question: 2+2?\nAnswer:", "4"), ("", "a"), ("a" * 30, "!")]
  reorderings(s, [*REQUESTS, *one_token], reference)
  assert len(exact) == 3


def test_diffusion_bound_is_the_conditional_nelbo_by_enumeration(scorers):
  s = scorers["mdlm"]
  ctx, cont = s.encode_pair("The cat", " it")
  assert (len(ctx), len(cont), s.mc_samples) == (7, 3, 48)  # 16 draws at each masked count
  mean, var = exact_conditional_nelbo(s, ctx, cont)
  got = s.loglikelihood_tokens([(ctx, cont)])[0][0]
  assert abs(got + mean) < 5 * math.sqrt(var) + 1e-5
  # the schedule's time estimator (time-conditioned models) has the same expectation
  draws = loglik._nelbo_draws(
    s.model,
    s.params,
    jnp.asarray([[*ctx, *cont]]),
    jnp.ones((1, 10), jnp.int32),
    jnp.asarray([[0] * 7 + [1] * 3]),
    jnp.asarray([7]),
    0,
    schedule=("loglinear", 1.0),
    mc_samples=512,
    width=CONTEXT,
    by_count=False,
  )
  draws = np.asarray(draws[0], np.float64)
  assert abs(draws.mean() - mean) < 5 * draws.std() / math.sqrt(draws.size)


def test_diffusion_is_greedy_is_llada_greedy_decoding(scorers):
  s = scorers["mdlm"]
  ctx, n = s.encode("Once"), 6
  z = np.array([[*ctx, *[diffusion.MASK_ID] * n]] * 2, np.int32)  # generate_until's shape
  decoded, _ = diffusion.llada_sample(
    s.model, s.params, z, jax.random.PRNGKey(0), steps=n, temperature=0.0
  )
  best = [int(x) for x in decoded[0, len(ctx) :]]
  worse = [*best[:5], 9 if best[5] != 9 else 10]
  others = [(s.encode("x"), [9] * 12), (ctx, best[:1])]  # padded beside longer and shorter rows
  got = s.loglikelihood_tokens([(ctx, best), (ctx, worse), *others])
  assert [g[1] for g in got[:2]] == [True, False]
  unchecked = dataclasses.replace(s, check_greedy=False).loglikelihood_tokens([(ctx, best)])
  assert unchecked == [(pytest.approx(got[0][0], abs=1e-6), False)]


# ---- encoders


def test_encoder_pseudo_loglikelihood_masks_each_continuation_token_in_turn(scorers):
  s = scorers["bert"]
  sep, mask = s.specials.sep, s.specials.mask

  def reference(ctx, cont):
    seq = [*ctx[len(ctx) - min(len(ctx), CONTEXT - len(cont) - 1) :], *cont, sep]
    at = range(len(seq) - 1 - len(cont), len(seq) - 1)
    rows = [[*seq[:i], mask, *seq[i + 1 :]] for i in at]  # one unpadded row per masked token
    logp = forward64(s, rows)
    values = [logp[r, i, seq[i]] for r, i in enumerate(at)]
    return math.fsum(values), all(logp[r, i].argmax() == seq[i] for r, i in enumerate(at))

  pairs, _ = reorderings(s, REQUESTS, reference)
  cls = s.specials.cls
  assert pairs[0][0][0] == cls and pairs[1][0] == [cls]  # [CLS] first, empty or not


# ---- rolling log-likelihoods


def test_decoder_rolling_is_eval_score_and_lm_evals_own_windows(scorers):
  s = scorers["gpt"]
  ids = [int(x) for x in s.tokenizer.encode(LONG_TEXT)]
  assert len(ids) > 3 * CONTEXT
  score = scoring.score_text(
    s.config, s.model, s.params, s.tokenizer, LONG_TEXT, batch_size=s.batch_size, stride=0
  )
  assert s.loglikelihood_rolling([LONG_TEXT]) == [score.loglikelihood]
  # stride C - 1: lm-evaluation-harness's windows for a max length of C - 1, scored here
  windows = lm_utils.get_rolling_token_windows(ids, 1, CONTEXT - 1, 1)
  want = 0.0
  for context, pred in map(lm_utils.make_disjoint_window, windows):
    seq = [*context, *pred]
    logp = causal_logp(s, seq[:-1])
    want += math.fsum(logp[len(seq) - 1 - len(pred) + i, t] for i, t in enumerate(pred))
  got = dataclasses.replace(s, stride=CONTEXT - 1).loglikelihood_rolling([LONG_TEXT])
  np.testing.assert_allclose(got, [want], rtol=1e-6)


@pytest.mark.parametrize("preset", ["t5", "bert"])
def test_rolling_refuses_encdec_and_encoders(scorers, preset):
  with pytest.raises(ValueError, match=r"model.family in \['decoder', 'diffusion'\]"):
    scorers[preset].loglikelihood_rolling(["some text"])


# ---- generation


def test_generate_until_is_the_families_greedy_samplers_cut_at_until(scorers):
  gpt, t5, mdlm = scorers["gpt"], scorers["t5"], scorers["mdlm"]
  key, stops = jax.random.PRNGKey(0), gpt.specials.stop_ids
  ctx = gpt.encode("Once")  # the shapes below are the scorers' (two prompts of one length)
  out = decoding.generate(gpt.model, gpt.params, np.array([ctx] * 2), 6, key, 0.0, eos_id=stops)
  want = {"gpt": decoding.text_of(gpt.tokenizer, out[0])}
  src = np.zeros((3, CONTEXT), np.int32)  # padded to a length bucket, a batch of 3
  src[:, :5] = t5.encode("Once")  # "Once" EOS
  out = decoding.seq2seq_generate(
    t5.model, t5.params, src, 6, key, specials=t5.specials, src_lengths=[5, 5, 1]
  )
  want["t5"] = decoding.text_of(t5.tokenizer, out[0])
  z = np.array([[*ctx, *[diffusion.MASK_ID] * 6]] * 2, np.int32)
  out, _ = diffusion.llada_sample(mdlm.model, mdlm.params, z, key, steps=6, temperature=0.0)
  want["mdlm"] = decoding.text_of(mdlm.tokenizer, out[0, len(ctx) :])
  for name in ("gpt", "t5", "mdlm"):
    text = want[name]
    stop = text[2:4] if len(text) > 3 else "\x00"
    got = scorers[name].generate_until(
      [("Once", {"max_gen_toks": 6}), ("Once", {"max_gen_toks": 6, "until": [stop]})]
    )
    assert got == [text, text.split(stop)[0]], name
  with pytest.raises(ValueError, match="an MLM generates no text"):
    scorers["bert"].generate_until([("Once", {})])


def test_batches_are_longest_first_and_pad_to_few_lengths():
  assert [loglik.bucket(n, 1000) for n in (1, 16, 17, 100, 513, 1000)] == [
    16,
    16,
    32,
    128,
    1000,
    1000,
  ]
  assert list(loglik.batches([3, 9, 1, 9, 5], 2)) == [[1, 3], [4, 0], [2]]


def test_generate_until_follows_a_regex_or_choices_and_diffusion_refuses_them(scorers):
  sampled = {"do_sample": True, "temperature": 1.0, "max_gen_toks": 8}
  texts = scorers["gpt"].generate_until([("Code:", {**sampled, "regex": "[0-9]{3}"})] * 4)
  assert all(re.fullmatch("[0-9]{3}", t) for t in texts), texts
  choices = {**sampled, "choices": "yes,no,maybe", "until": ["a"]}
  texts = scorers["t5"].generate_until([(f"Say {i}", choices) for i in range(4)])
  assert all(t in ("yes", "no", "m") for t in texts), texts  # maybe is cut at its a
  with pytest.raises(ValueError, match=r"gen_kwargs \['regex'\].*unmasks positions in any order"):
    scorers["mdlm"].generate_until([("x", {"regex": "a"})])
  with pytest.raises(ValueError, match=r"--regex='a\(b': not compiled"):
    scorers["gpt"].generate_until([("x", {"regex": "a(b"})])
