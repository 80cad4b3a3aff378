"""Decoding: the KV cache reproduces the uncached model, logit filters match NumPy
references, EOS stops a row, long prompts are cut from the left, and a constraint's
automaton masks and advances on the device (tests/eval/test_constrain.py: with real
automata)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modeling import decoding
from modeling.decoding import choose_tokens, complete, filter_logits, generate
from modeling.transformer import Transformer, init_cache
from modeling.vocab import Specials
from tests.tiny_models import VOCAB, random_params, tiny

MAX_LEN = 16
NO_EOS = -1  # an id greedy decoding never produces


CONFIGS = {
  "learned-gqa-loop": dict(preset="gpt", num_kv_heads=2, scan_layers=False),
  "rope-gqa-scan": dict(preset="llama", scan_layers=True),
  "rope-mqa-window": dict(preset="llama", num_kv_heads=1, sliding_window=4),
}


@functools.cache
def model_and_params(name: str, seed: int = 0):
  """A random tiny model of the named kind."""
  cfg = tiny(seq_len=MAX_LEN, **CONFIGS[name])
  return Transformer(cfg), random_params(cfg, seed)


def prompt(batch: int, length: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(8, VOCAB, (batch, length)).astype(np.int32)


def greedy_by_recompute(model, params, prompt_BP: np.ndarray, num_tokens: int) -> np.ndarray:
  """Runs the whole uncached model on the growing sequence and takes the argmax.

  The sequence lives in a fixed [B, max_len] buffer so one compile serves every step; the
  unwritten tail is a separate segment (0), which no real token may attend to.
  """
  b, p = prompt_BP.shape
  length = model.cfg.max_len
  pos_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
  forward = jax.jit(lambda t, s: model.apply({"params": params}, t, pos_BL, s)[0])
  buf_BL = np.zeros((b, length), np.int32)
  buf_BL[:, :p] = prompt_BP
  for t in range(p, p + num_tokens):
    seg_BL = np.broadcast_to(np.arange(length) < t, (b, length)).astype(np.int32)
    logits_BLV = forward(jnp.asarray(buf_BL), jnp.asarray(seg_BL))
    buf_BL[:, t] = np.argmax(np.asarray(logits_BLV[:, t - 1]), axis=-1)
  return buf_BL[:, p : p + num_tokens]


# --- the KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_equals_recompute_without_cache(name):
  model, params = model_and_params(name)
  prompt_BP = prompt(2, 5)
  out_BN = generate(model, params, prompt_BP, 9, jax.random.key(0), temperature=0.0, eos_id=NO_EOS)
  assert out_BN.shape == (2, 9) and out_BN.dtype == np.int32
  np.testing.assert_array_equal(out_BN, greedy_by_recompute(model, params, prompt_BP, 9))
  assert len(np.unique(out_BN)) > 2  # not a degenerate model that repeats one token


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_prefill_and_steps_equal_full_forward(name):
  model, params = model_and_params(name)
  cfg = model.cfg
  b, length, p = 2, 12, 5
  tokens_BL = jnp.asarray(prompt(b, length, seed=1))
  pos_BL = jnp.broadcast_to(jnp.arange(length), (b, length))
  ones_BL = jnp.ones_like(tokens_BL)
  apply = jax.jit(lambda t, pos, seg, cache: model.apply({"params": params}, t, pos, seg, cache))

  full_BLV, none_cache = apply(tokens_BL, pos_BL, ones_BL, None)
  assert none_cache is None
  cache = init_cache(cfg, b, MAX_LEN)  # longer than used: the unwritten tail must stay unseen
  prefill_BPV, cache = apply(tokens_BL[:, :p], pos_BL[:, :p], ones_BL[:, :p], cache)
  steps = [prefill_BPV]
  for t in range(p, length):
    step_B1V, cache = apply(
      tokens_BL[:, t : t + 1], pos_BL[:, t : t + 1], ones_BL[:, t : t + 1], cache
    )
    steps.append(step_B1V)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full_BLV, rtol=1e-5, atol=1e-5)
  assert cache["k"].shape == (cfg.num_layers, b, MAX_LEN, cfg.num_kv_heads, cfg.head_dim)
  k = np.asarray(cache["k"])
  assert np.all(np.abs(k[:, :, :length]).max(axis=(-2, -1)) > 0)
  assert np.all(k[:, :, length:] == 0)


# --- logit filters --------------------------------------------------------------------------


def nucleus_reference(logits_BV: np.ndarray, top_p: float) -> np.ndarray:
  """Boolean [B, V]: the smallest set of most likely tokens whose probability reaches top_p."""
  keep = np.zeros(logits_BV.shape, bool)
  for row, logits in enumerate(logits_BV.astype(np.float64)):
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    assert np.min(np.abs(cum - top_p)) > 1e-5, "test data too close to the threshold"
    n = int(np.searchsorted(cum, top_p)) + 1  # first prefix with mass >= top_p
    keep[row, order[:n]] = True
  return keep


LOGITS_BV = np.random.default_rng(0).normal(0, 2.0, (4, 50)).astype(np.float32)


@pytest.mark.parametrize("top_k", [1, 5, 17])
def test_top_k_keeps_exactly_the_k_largest(top_k):
  out = np.asarray(filter_logits(jnp.asarray(LOGITS_BV), top_k=top_k))
  kept = np.isfinite(out)
  assert np.all(kept.sum(-1) == top_k)
  largest = np.argsort(-LOGITS_BV, axis=-1)[:, :top_k]
  for row in range(len(out)):
    assert set(np.flatnonzero(kept[row])) == set(largest[row])
  np.testing.assert_array_equal(out[kept], LOGITS_BV[kept])
  assert np.all(out[~kept] == -np.inf)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_keeps_the_smallest_nucleus(top_p):
  out = np.asarray(filter_logits(jnp.asarray(LOGITS_BV), top_p=top_p))
  expected = nucleus_reference(LOGITS_BV, top_p)
  np.testing.assert_array_equal(np.isfinite(out), expected)
  np.testing.assert_array_equal(out[expected], LOGITS_BV[expected])
  assert np.all(expected.sum(-1) >= 1)


def test_top_p_always_keeps_the_most_likely_token():
  out = np.asarray(filter_logits(jnp.asarray(LOGITS_BV), top_p=1e-9))
  np.testing.assert_array_equal(np.isfinite(out).sum(-1), 1)
  np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(LOGITS_BV, -1))


def test_top_k_then_top_p_renormalizes_over_the_top_k():
  out = np.asarray(filter_logits(jnp.asarray(LOGITS_BV), top_k=8, top_p=0.7))
  top8 = np.full_like(LOGITS_BV, -np.inf)
  idx = np.argsort(-LOGITS_BV, axis=-1)[:, :8]
  np.put_along_axis(top8, idx, np.take_along_axis(LOGITS_BV, idx, -1), -1)
  np.testing.assert_array_equal(np.isfinite(out), nucleus_reference(top8, 0.7))


def test_no_filter_is_the_identity():
  np.testing.assert_array_equal(filter_logits(jnp.asarray(LOGITS_BV)), LOGITS_BV)


def test_temperature_zero_is_argmax_whatever_the_rng_and_filters():
  expected = np.argmax(LOGITS_BV, -1)
  for seed in range(3):
    for top_k, top_p in [(0, 1.0), (3, 0.5)]:
      out = choose_tokens(jnp.asarray(LOGITS_BV), jax.random.key(seed), 0.0, top_k, top_p)
      assert out.dtype == jnp.int32
      np.testing.assert_array_equal(out, expected)


def test_sampling_follows_the_filtered_tempered_distribution():
  """Top-3 at temperature 2: samples stay in the top 3 with softmax(logits / 2) frequencies."""
  logits_V = np.array([2.0, -1.0, 1.0, 0.3, 1.5, -3.0], np.float32)
  n = 4000
  sample = jax.jit(
    jax.vmap(lambda rng: choose_tokens(jnp.asarray(logits_V)[None], rng, 2.0, 3, 1.0))
  )
  draws = np.asarray(sample(jax.random.split(jax.random.key(0), n)))[:, 0]
  top3 = np.array([0, 4, 2])
  assert set(np.unique(draws)) == set(top3)
  expected = np.exp(logits_V[top3] / 2.0) / np.exp(logits_V[top3] / 2.0).sum()
  np.testing.assert_allclose([np.mean(draws == t) for t in top3], expected, atol=0.03)


# --- EOS, context limits -------------------------------------------------------------------


def test_rows_stop_at_eos_and_continue_as_padding():
  model, params = model_and_params("rope-gqa-scan")
  prompt_BP = prompt(2, 4, seed=2)
  n = 10
  greedy = functools.partial(generate, model, params, prompt_BP, n, jax.random.key(0), 0.0)
  ref_BN = greedy(eos_id=NO_EOS)

  # Row 0's last new token in the middle of the run (first seen at step k), then row 1's
  # first token (EOS straight from the prefill) each become the EOS id.
  first_seen = [k for k in range(1, n - 1) if ref_BN[0, k] not in ref_BN[0, :k]]
  assert first_seen, f"greedy output too repetitive for this test: {ref_BN[0]}"
  for row, k in [(0, first_seen[-1]), (1, 0)]:
    eos = int(ref_BN[row, k])
    assert np.any(ref_BN[row, k + 1 :]), "nothing after the EOS to blank out"
    out_BN = greedy(eos_id=eos)
    np.testing.assert_array_equal(out_BN[row, : k + 1], ref_BN[row, : k + 1])
    np.testing.assert_array_equal(out_BN[row, k + 1 :], 0)
    other = 1 - row  # the other row stops at its own first EOS, if any
    hits = np.flatnonzero(ref_BN[other] == eos)
    stop = hits[0] + 1 if hits.size else n
    np.testing.assert_array_equal(out_BN[other, :stop], ref_BN[other, :stop])
    np.testing.assert_array_equal(out_BN[other, stop:], 0)


def test_long_prompt_is_cut_from_the_left_with_a_warning():
  model, params = model_and_params("learned-gqa-loop")
  long_BP = prompt(2, 21, seed=3)
  keep = MAX_LEN - 1
  run = functools.partial(
    generate, model, params, num_tokens=1, rng=jax.random.key(0), temperature=0.0, eos_id=NO_EOS
  )
  with pytest.warns(UserWarning, match=f"keeping the prompt's last {keep} tokens"):
    out_BN = run(long_BP)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    expected_BN = run(long_BP[:, -keep:])  # fits exactly: no warning
  np.testing.assert_array_equal(out_BN, expected_BN)
  np.testing.assert_array_equal(out_BN, greedy_by_recompute(model, params, long_BP[:, -keep:], 1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoding_past_the_context_slides_the_window(name):
  """Past max_len, each refill restarts from the last max_len // 2 tokens, exactly as recompute."""
  model, params = model_and_params(name)
  prompt_BP = prompt(2, 3, seed=4)
  num_tokens = 40
  with pytest.warns(UserWarning, match=f"continues from the last {MAX_LEN // 2} tokens"):
    out_BN = generate(model, params, prompt_BP, num_tokens, jax.random.key(0), 0.0, eos_id=NO_EOS)
  assert out_BN.shape == (2, num_tokens)
  context_BP, expected = prompt_BP, []
  while sum(e.shape[1] for e in expected) < num_tokens:
    n = min(num_tokens - sum(e.shape[1] for e in expected), MAX_LEN - context_BP.shape[1])
    expected.append(greedy_by_recompute(model, params, context_BP, n))
    context_BP = np.concatenate([context_BP, expected[-1]], axis=1)[:, -(MAX_LEN // 2) :]
  np.testing.assert_array_equal(out_BN, np.concatenate(expected, axis=1))


class Letters:
  """A tokenizer of its own layout: letters a..z are ids 40..65, BOS is 70 and documents
  start with it (Llama-style), and two ids end a sequence (as Llama 3's eos list)."""

  vocab_size = VOCAB
  is_byte_level = False

  def __init__(self, stop: tuple[int, ...]):
    self.specials = Specials(eos=stop[0], bos=70, add_bos=True, stop=stop)

  def encode(self, text):
    return np.asarray([40 + ord(c) - ord("a") for c in text], np.int32)

  def decode(self, ids):
    return "".join(chr(ord("a") + i - 40) if 40 <= i < 66 else f"<{i}>" for i in ids)


def test_complete_starts_the_prompt_with_bos_and_stops_at_any_stop_id():
  """The prompt is fed after the tokenizer's BOS (its model saw every document so), and the
  text ends before the first of its stop ids, whichever comes first."""
  model, params = model_and_params("rope-gqa-scan")
  n, rng = 8, jax.random.key(0)
  with_bos_1N = generate(model, params, np.array([[70, 40, 41, 42]]), n, rng, 0.0, eos_id=NO_EOS)
  plain_1N = generate(model, params, np.array([[40, 41, 42]]), n, rng, 0.0, eos_id=NO_EOS)
  assert (with_bos_1N != plain_1N).any()  # BOS matters to this model
  ref = [int(i) for i in with_bos_1N[0]]
  k = next(k for k in range(2, n) if ref[k] not in ref[:k])  # first seen at step k
  tok = Letters(stop=(NO_EOS - 1, ref[k]))  # the second stop id is the one met
  out = complete(model, params, tok, "abc", n, rng, temperature=0.0)
  assert out == "abc" + tok.decode(ref[:k])


# --- constrained decoding: the device side of an automaton ----------------------------------


def packed(allowed_SV: np.ndarray) -> np.ndarray:
  """uint32 [S, ceil(V / 32)]: token v's bit is bit v % 32 of word v // 32."""
  s, v = allowed_SV.shape
  words = np.zeros((s, -(-v // 32)), np.uint64)
  for state, token in zip(*np.nonzero(allowed_SV), strict=True):
    words[state, token // 32] |= np.uint64(1) << np.uint64(token % 32)
  return words.astype(np.uint32)


def test_allowed_unpacks_the_bitmask_and_adds_stops_in_accepting_states():
  rng = np.random.default_rng(0)
  allowed_SV = rng.random((6, 70)) < 0.3  # 70 ids: the last word is partly used
  final_S = np.array([True, False, True, False, False, True])
  automaton = decoding.Automaton(
    jnp.zeros((6, 70), jnp.int32), jnp.asarray(packed(allowed_SV)), jnp.asarray(final_S)
  )
  state_B = jnp.array([0, 1, 2, 3, 4, 5, 2, 1], jnp.int32)
  for stops in [(1,), (1, 66)]:
    got_BV = np.asarray(decoding.allowed(automaton, state_B, 70, stops))
    want_BV = allowed_SV[np.asarray(state_B)].copy()
    want_BV[:, list(stops)] |= final_S[np.asarray(state_B)][:, None]
    np.testing.assert_array_equal(got_BV, want_BV)


def two_state_automaton() -> decoding.Automaton:
  """State 0 allows 3, 5, 7 (each to state 1); state 1 allows 2 and 4 (back to 0) and is
  accepting; 2 is the dead state."""
  v = 10
  allowed_SV = np.zeros((3, v), bool)
  allowed_SV[0, [3, 5, 7]] = allowed_SV[1, [2, 4]] = True
  next_SV = np.full((3, v), 2, np.int32)
  next_SV[0, [3, 5, 7]], next_SV[1, [2, 4]] = 1, 0
  final_S = np.array([False, True, False])
  return decoding.Automaton(
    jnp.asarray(next_SV), jnp.asarray(packed(allowed_SV)), jnp.asarray(final_S)
  )


def test_constrained_sampling_follows_the_renormalized_allowed_distribution():
  """Fixed logits, 4000 rows: the first token follows softmax over {3, 5, 7}, the second
  (in state 1) softmax over {2, 4} and EOS (1, allowed there); top-k after the mask keeps the
  best allowed token; the state walked over the tokens is where each row ended."""
  automaton = two_state_automaton()
  logits_V = jnp.asarray([0.5, 1.0, -1.0, 0.0, 2.0, 1.0, 3.0, -0.5, 0.0, 0.0], jnp.float32)
  b = 4000

  def step(tok_B1, pos_B1, cache):
    return jnp.broadcast_to(logits_V, (tok_B1.shape[0], 10)), cache

  def run(top_k):
    loop = jax.jit(
      lambda rng: decoding.sample_loop(
        step,
        jnp.broadcast_to(logits_V, (b, 10)),
        None,
        0,
        3,
        jnp.zeros(b, bool),
        rng,
        1.0,
        top_k,
        1.0,
        1,
        automaton,
      )  # fmt: skip
    )
    return np.asarray(loop(jax.random.key(0))[0])

  out_BN = run(0)

  def softmax_over(ids):
    e = np.exp(np.asarray(logits_V, np.float64)[ids])
    return e / e.sum()

  first, second = [3, 5, 7], [1, 2, 4]
  np.testing.assert_allclose(
    [np.mean(out_BN[:, 0] == t) for t in first], softmax_over(first), atol=0.03
  )
  np.testing.assert_allclose(
    [np.mean(out_BN[:, 1] == t) for t in second], softmax_over(second), atol=0.03
  )
  stopped = out_BN[:, 1] == 1
  assert np.all(out_BN[stopped, 2] == 0) and np.all(np.isin(out_BN[~stopped, 2], first))
  state_B = decoding.walk(automaton, jnp.zeros(b, jnp.int32), jnp.asarray(out_BN), 1)
  np.testing.assert_array_equal(state_B, 1)  # after 3 tokens, or a stop in state 1
  np.testing.assert_array_equal(run(1)[0], [5, 4, 5])  # top-1 of what each state allows
