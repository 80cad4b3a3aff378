"""T5 encoder-decoder (modeling/transformer.py) and its decoding (modeling/decoding.py): T5's
relative position buckets, the per-stack bias tables, the masks, both KV caches, greedy and
beam search, and the configs/t5.py variants.

One tiny model shape (B=2 rows, S=8 source tokens, T=6 decoder tokens) serves every test, so
each jitted function compiles once per config.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import t5
from modeling import decoding
from modeling.transformer import (
  EncoderDecoder,
  RelativeBias,
  TransformerConfig,
  init_encdec_cache,
  relative_buckets,
)
from modeling.vocab import BOS_ID, EOS_ID, FOURFOLD, Specials
from tests.tiny_models import abstract_init, draw_params, tiny
from train import families

VOCAB = 32
B, S, T = 2, 8, 6


def tiny_encdec(**overrides) -> TransformerConfig:
  """configs/t5.py's tiny v1_1 model with a small vocabulary."""
  overrides = {"vocab_size": VOCAB, "scan_layers": False, **overrides}
  return tiny("t5", None, "variant=v1_1", vocab=VOCAB, **overrides)


LOOP = tiny_encdec()
SCAN = tiny_encdec(scan_layers=True)
GQA = tiny_encdec(num_kv_heads=2)


def abstract_params(cfg: TransformerConfig):
  return abstract_init(cfg, EncoderDecoder)


@functools.cache
def params_of(cfg: TransformerConfig, seed: int = 0):
  return draw_params(abstract_params(cfg), seed)


def source(seed: int = 0):
  """Source rows (0-padded on the right: row 1 holds 5 tokens) with their positions and
  segment ids, as seq2seq_generate builds them."""
  rng = np.random.default_rng(seed)
  src_BS = rng.integers(3, VOCAB, (B, S)).astype(np.int32)
  src_BS[1, 5:] = 0
  seg_BS = (src_BS != 0).astype(np.int32)
  return src_BS, np.cumsum(seg_BS, axis=1).astype(np.int32) - 1, seg_BS


def targets(seed: int = 1):
  """Decoder inputs [B, T]: BOS, then random tokens; positions 0..T-1, one segment."""
  rng = np.random.default_rng(seed)
  tgt_BT = rng.integers(3, VOCAB, (B, T)).astype(np.int32)
  tgt_BT[:, 0] = BOS_ID
  pos_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  return tgt_BT, pos_BT, np.ones((B, T), np.int32)


def _captured(mdl: nn.Module, method: str) -> bool:
  """Both stacks' outputs and the cross-attention key / value projections."""
  if method != "__call__":
    return False
  cross = mdl.name in ("key", "value") and mdl.parent.name == "cross_attn"
  return cross or mdl.name in ("encoder_final_norm", "decoder_final_norm")


@functools.cache
def forward_fn(cfg: TransformerConfig):
  """Teacher-forced logits [B, T, V], no cache, and the captured intermediates."""

  def forward(params, src_BS, src_pos_BS, src_seg_BS, tgt_BT, tgt_pos_BT, tgt_seg_BT):
    (logits_BTV, _), state = EncoderDecoder(cfg).apply(
      {"params": params},
      src_BS,
      src_pos_BS,
      src_seg_BS,
      targets_in_BL=tgt_BT,
      targets_positions_BL=tgt_pos_BT,
      targets_segment_ids_BL=tgt_seg_BT,
      capture_intermediates=_captured,
      mutable=["intermediates"],
    )
    return logits_BTV, state["intermediates"]

  return jax.jit(forward)


def logits_of(cfg, params, src=None, tgt=None) -> np.ndarray:
  src = source() if src is None else src
  tgt = targets() if tgt is None else tgt
  return np.asarray(forward_fn(cfg)(params, *src, *tgt)[0])


@functools.cache
def decode_fns(cfg: TransformerConfig):
  """(prefill, step), jitted: prefill runs the encoder and the decoder's first token with
  a cache; step feeds one decoder token with tokens_BS=None."""
  model = EncoderDecoder(cfg)

  def prefill(params, src_BS, src_pos_BS, src_seg_BS, tok_B1, cache):
    logits_B1V, cache = model.apply(
      {"params": params},
      src_BS,
      src_pos_BS,
      src_seg_BS,
      cache,
      targets_in_BL=tok_B1,
      targets_positions_BL=jnp.zeros_like(tok_B1),
      targets_segment_ids_BL=jnp.ones_like(tok_B1),
    )
    return logits_B1V[:, 0], cache

  def step(params, tok_B1, pos_B1, cache):
    logits_B1V, cache = model.apply(
      {"params": params},
      None,
      None,
      None,
      cache,
      targets_in_BL=tok_B1,
      targets_positions_BL=pos_B1,
      targets_segment_ids_BL=jnp.ones_like(tok_B1),
    )
    return logits_B1V[:, 0], cache

  return jax.jit(prefill), jax.jit(step)


def decode_incrementally(cfg, params, src, tgt_BT):
  """Logits [B, T, V] of the prefill then one step per decoder token, and the prefill's
  cache."""
  prefill, step = decode_fns(cfg)
  cache = init_encdec_cache(cfg, B, S, T)
  logits_BV, cache = prefill(params, *src, jnp.asarray(tgt_BT[:, :1]), cache)
  first_cache, out = cache, [logits_BV]
  for t in range(1, T):
    pos_B1 = jnp.full((B, 1), t, jnp.int32)
    logits_BV, cache = step(params, jnp.asarray(tgt_BT[:, t : t + 1]), pos_B1, cache)
    out.append(logits_BV)
  return np.stack(out, axis=1), first_cache


# --- relative position buckets --------------------------------------------------------


def reference_bucket(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
  """T5's bucket of key position - query position, in float64 (Mesh TensorFlow's
  _relative_position_bucket)."""
  n, offset = num_buckets, 0
  if bidirectional:
    n //= 2
    offset = n if rel > 0 else 0  # keys after the query: the upper half
    dist = abs(rel)
  else:
    dist = max(-rel, 0)  # only looking back; later keys share bucket 0
  exact = n // 2
  if dist < exact:
    return offset + dist
  log_part = math.log(dist / exact) / math.log(max_distance / exact) * (n - exact)
  return offset + min(exact + int(log_part), n - 1)


BUCKET_CASES = [(32, 128, True), (32, 128, False), (8, 20, True), (8, 20, False)]


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional", BUCKET_CASES)
def test_relative_buckets_match_t5_reference(num_buckets, max_distance, bidirectional):
  rel_N = np.arange(-300, 301)
  got_N = np.asarray(relative_buckets(jnp.asarray(rel_N), bidirectional, num_buckets, max_distance))
  want_N = np.array([reference_bucket(r, bidirectional, num_buckets, max_distance) for r in rel_N])
  np.testing.assert_array_equal(got_N, want_N)
  # Every bucket is used (but the upper half's distance 0: a later key is at least 1 away),
  # and distances past max_distance all share the last one.
  unused = {num_buckets // 2} if bidirectional else set()
  assert set(got_N.tolist()) == set(range(num_buckets)) - unused
  last = num_buckets // 2 - 1 if bidirectional else num_buckets - 1
  assert (got_N[rel_N <= -max_distance] == last).all()
  if bidirectional:
    assert (got_N[rel_N >= max_distance] == num_buckets - 1).all()
  else:
    assert (got_N[rel_N > 0] == 0).all()


def test_relative_bias_looks_up_the_table_by_bucket():
  heads, buckets, max_distance = 3, 8, 20
  table_NH = np.random.default_rng(0).standard_normal((buckets, heads)).astype(np.float32)
  q_pos_BL = np.array([[0, 5, 30], [2, 2, 9]], np.int32)
  kv_pos_BS = np.array([[0, 1, 2, 3, 40], [7, 0, 2, 50, 9]], np.int32)
  for bidirectional in (True, False):
    module = RelativeBias(heads, bidirectional, buckets, max_distance)
    bias_BHLS = module.apply({"params": {"embedding": table_NH}}, q_pos_BL, kv_pos_BS)
    rel_BLS = kv_pos_BS[:, None, :] - q_pos_BL[:, :, None]
    idx_BLS = np.vectorize(reference_bucket)(rel_BLS, bidirectional, buckets, max_distance)
    np.testing.assert_array_equal(bias_BHLS, table_NH[idx_BLS].transpose(0, 3, 1, 2))


# --- the shared relative bias ---------------------------------------------------------


@pytest.mark.parametrize("cfg", [LOOP, SCAN], ids=["loop", "scan"])
def test_one_relative_bias_table_per_stack(cfg):
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
  names = {tuple(k.key for k in path): leaf.shape for path, leaf in flat}
  rel = {path: shape for path, shape in names.items() if any("rel_bias" in k for k in path)}
  table = (cfg.rel_buckets, cfg.num_heads)
  assert rel == {
    ("encoder_rel_bias", "embedding"): table,
    ("decoder_rel_bias", "embedding"): table,
  }
  blocks = [path for path in names if "block" in path[0]]
  assert blocks and not any("bias" in k for path in blocks for k in path)


def test_relative_bias_tables_change_the_output():
  params = params_of(LOOP)
  base_BTV = logits_of(LOOP, params)
  for stack in ("encoder_rel_bias", "decoder_rel_bias"):
    table_NH = params[stack]["embedding"]
    changed = {**params, stack: {"embedding": table_NH + jnp.arange(table_NH.shape[0])[:, None]}}
    assert np.abs(logits_of(LOOP, changed) - base_BTV).max() > 1e-2, stack


# --- masks: causal decoder, bidirectional encoder, packed segments --------------------


def test_decoder_is_causal_and_sees_the_whole_source():
  params = params_of(LOOP)
  src, tgt = source(), targets()
  fwd = forward_fn(LOOP)
  base_BTV, inter = fwd(params, *src, *tgt)
  enc_BSD = inter["encoder_final_norm"]["__call__"][0]
  for j in range(1, T):  # a later decoder input never changes earlier logits
    tgt_BT = tgt[0].copy()
    tgt_BT[:, j] = (tgt_BT[:, j] + 1) % VOCAB
    out_BTV = logits_of(LOOP, params, tgt=(tgt_BT, *tgt[1:]))
    np.testing.assert_allclose(out_BTV[:, :j], base_BTV[:, :j], atol=1e-5, rtol=0)
    assert np.abs(out_BTV[:, j] - base_BTV[:, j]).max() > 1e-3
  for s in range(S):  # every real source token reaches every decoder position
    src_BS = src[0].copy()
    real_B = src_BS[:, s] != 0
    src_BS[real_B, s] = (src_BS[real_B, s] + 1) % VOCAB
    out_BTV, inter = fwd(params, src_BS, *src[1:], *tgt)
    changed_BT = np.abs(np.asarray(out_BTV) - np.asarray(base_BTV)).max(-1) > 1e-4
    np.testing.assert_array_equal(changed_BT, np.broadcast_to(real_B[:, None], (B, T)))
    # The encoder is bidirectional: its first output sees the last tokens and vice versa.
    changed_enc_BS = np.abs(inter["encoder_final_norm"]["__call__"][0] - enc_BSD).max(-1) > 1e-4
    np.testing.assert_array_equal(changed_enc_BS, src[2] * real_B[:, None] > 0)


def test_packed_examples_do_not_see_each_other():
  params = params_of(LOOP)
  src_seg_BS = np.array([[1, 1, 1, 1, 2, 2, 2, 0]] * B, np.int32)
  src_pos_BS = np.array([[0, 1, 2, 3, 0, 1, 2, 0]] * B, np.int32)
  tgt_seg_BT = np.array([[1, 1, 1, 2, 2, 2]] * B, np.int32)
  tgt_pos_BT = np.array([[0, 1, 2, 0, 1, 2]] * B, np.int32)
  src_BS = np.random.default_rng(2).integers(3, VOCAB, (B, S)).astype(np.int32) * (src_seg_BS > 0)
  tgt_BT = targets()[0]
  tgt_BT[:, 3] = BOS_ID

  def logits(src_BS, tgt_BT):
    return logits_of(
      LOOP, params, (src_BS, src_pos_BS, src_seg_BS), (tgt_BT, tgt_pos_BT, tgt_seg_BT)
    )

  base_BTV = logits(src_BS, tgt_BT)
  for seg in (1, 2):
    other_T = tgt_seg_BT[0] != seg
    src2_BS = np.where(src_seg_BS == seg, (src_BS + 1) % VOCAB, src_BS)
    tgt2_BT = np.where(tgt_seg_BT == seg, (tgt_BT + 1) % VOCAB, tgt_BT)
    for out_BTV in (logits(src2_BS, tgt_BT), logits(src_BS, tgt2_BT)):
      np.testing.assert_allclose(out_BTV[:, other_T], base_BTV[:, other_T], atol=1e-5, rtol=0)
      assert np.abs(out_BTV[:, ~other_T] - base_BTV[:, ~other_T]).max(-1).min() > 1e-4


# --- both KV caches -------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [LOOP, SCAN, GQA], ids=["loop", "scan", "gqa"])
def test_incremental_decoding_matches_teacher_forcing(cfg):
  params = params_of(cfg)
  src, tgt = source(), targets()
  full_BTV = logits_of(cfg, params, src, tgt)
  inc_BTV, cache = decode_incrementally(cfg, params, src, tgt[0])
  np.testing.assert_allclose(inc_BTV, full_BTV, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache["src_segment_ids"], src[2])
  layers, g, k = cfg.num_decoder_layers, cfg.num_kv_heads, cfg.head_dim
  assert cache["ck"].shape == cache["cv"].shape == (layers, B, S, g, k)


def test_cross_cache_holds_the_projected_encoder_output():
  params = params_of(LOOP)
  src, tgt = source(), targets()
  _, inter = forward_fn(LOOP)(params, *src, *tgt)
  _, step = decode_fns(LOOP)
  _, cache = decode_incrementally(LOOP, params, src, tgt[0])
  for i in range(LOOP.num_decoder_layers):
    cross = inter[f"decoder_block_{i}"]["cross_attn"]
    np.testing.assert_allclose(cache["ck"][i], cross["key"]["__call__"][0], atol=1e-5)
    np.testing.assert_allclose(cache["cv"][i], cross["value"]["__call__"][0], atol=1e-5)
  # Later calls read the cross keys / values from the cache and leave them there.
  tok_B1, pos_B1 = jnp.asarray(tgt[0][:, 1:2]), jnp.ones((B, 1), jnp.int32)
  logits_BV, after = step(params, tok_B1, pos_B1, cache)
  for name in ("ck", "cv", "src_segment_ids"):
    np.testing.assert_array_equal(after[name], cache[name])
  for name in ("ck", "cv"):
    corrupt = {**cache, name: cache[name][:, ::-1]}  # the rows swapped
    assert np.abs(step(params, tok_B1, pos_B1, corrupt)[0] - logits_BV).max() > 1e-3, name


# --- greedy decoding and beam search --------------------------------------------------


GREEDY_SRC = 3  # source(3): row 0 ends with EOS after 2 tokens, row 1 runs all T


@functools.cache
def greedy_params():
  """LOOP's params with EOS's output column scaled up, so that greedy rows end."""
  params = params_of(LOOP)
  return {**params, "head": {"kernel": params["head"]["kernel"].at[:, EOS_ID].multiply(1.5)}}


@functools.cache
def greedy_tokens() -> np.ndarray:
  src_BS = source(GREEDY_SRC)[0]
  return decoding.seq2seq_generate(
    EncoderDecoder(LOOP), greedy_params(), src_BS, T, jax.random.key(0)
  )


def greedy_by_recompute(params, src, start: int, eos_ids: tuple[int, ...]) -> np.ndarray:
  """Argmax by recomputing the whole prefix each step (later inputs are zeros, which the
  causal decoder ignores), without any cache, the decoder starting at `start`; a row stops
  after any of `eos_ids`."""
  dec_BT = np.zeros((B, T), np.int32)
  dec_BT[:, 0] = start
  want_BN = np.zeros((B, T), np.int32)
  done_B = np.zeros(B, bool)
  for i in range(T):
    logits_BV = logits_of(LOOP, params, src, (dec_BT, *targets()[1:]))[:, i]
    top2_BV = np.sort(logits_BV, axis=-1)[:, -2:]
    assert (top2_BV[:, 1] - top2_BV[:, 0]).min() > 1e-3  # no near-ties: a well-posed check
    want_BN[:, i] = np.where(done_B, 0, logits_BV.argmax(-1))
    done_B |= np.isin(want_BN[:, i], eos_ids)
    if i + 1 < T:
      dec_BT[:, i + 1] = want_BN[:, i]
  return want_BN


def test_greedy_generate_matches_full_recompute():
  params, src = greedy_params(), source(GREEDY_SRC)
  out_BN = greedy_tokens()
  assert list(out_BN[0, 2:]) == [EOS_ID, 0, 0, 0] and EOS_ID not in out_BN[1]  # both kinds
  np.testing.assert_array_equal(out_BN, greedy_by_recompute(params, src, BOS_ID, (EOS_ID,)))


def test_greedy_generate_starts_and_stops_at_the_tokenizers_ids():
  """A T5-like tokenizer: the decoder starts at its decoder_start (pad, 0), not fourfold's
  BOS, and a row stops at any of its stop ids; source padding comes from the lengths."""
  params, (src_BS, src_pos_BS, src_seg_BS) = greedy_params(), source(GREEDY_SRC)
  free_BN = greedy_by_recompute(params, (src_BS, src_pos_BS, src_seg_BS), 0, ())
  assert (free_BN != greedy_by_recompute(params, source(GREEDY_SRC), BOS_ID, ())).any()
  stop = (int(free_BN[0, 2]), int(free_BN[1, 3]))  # each row stops at a different one
  specials = Specials(pad=0, eos=stop[0], bos=None, decoder_start=0, stop=stop)
  want_BN = greedy_by_recompute(params, (src_BS, src_pos_BS, src_seg_BS), 0, stop)
  assert (want_BN == 0).any() and (want_BN != free_BN).any()  # the stops cut both rows
  lengths = src_seg_BS.sum(1)
  filled_BS = np.where(src_seg_BS > 0, src_BS, 9)  # padding ids the lengths mask out
  out_BN = decoding.seq2seq_generate(
    EncoderDecoder(LOOP),
    params,
    filled_BS,
    T,
    jax.random.key(0),
    specials=specials,
    src_lengths=lengths,
  )
  np.testing.assert_array_equal(out_BN, want_BN)


@functools.cache
def beam_and_greedy_fn(cfg: TransformerConfig):
  """Results of beam_search with beam 1 and with beam 3 (tokens, score) and sample_loop's
  tokens at temperature 0, on the model's own step after one prefill."""
  prefill, step = decode_fns(cfg)

  def run(params, src_BS, src_pos_BS, src_seg_BS):
    bos_B1 = jnp.full((B, 1), BOS_ID, jnp.int32)
    cache = init_encdec_cache(cfg, B, S, T)
    logits_BV, cache = prefill(params, src_BS, src_pos_BS, src_seg_BS, bos_B1, cache)

    def model_step(tok_B1, pos_B1, cache):
      return step(params, tok_B1, pos_B1 + 1, cache)

    beam1 = decoding.beam_search(model_step, logits_BV, cache, 0, T, 1, 0.6, EOS_ID)
    beam3 = decoding.beam_search(model_step, logits_BV, cache, 0, T, 3, 0.6, EOS_ID)
    done_B = jnp.zeros((B,), bool)
    greedy_BN, _ = decoding.sample_loop(
      model_step, logits_BV, cache, 0, T, done_B, jax.random.key(0), 0.0, 0, 1.0, EOS_ID
    )
    return beam1, beam3, greedy_BN

  return jax.jit(run)


def model_logp(params, src, out_BN) -> np.ndarray:
  """[B] log-probability of output tokens up to EOS, by the teacher-forced model (float64)."""
  dec_BT = np.concatenate([np.full((B, 1), BOS_ID), out_BN[:, :-1]], axis=1).astype(np.int32)
  logits_BTV = logits_of(LOOP, params, src, (dec_BT, *targets()[1:])).astype(np.float64)
  logp_BTV = logits_BTV - np.log(np.exp(logits_BTV).sum(-1, keepdims=True))
  tok_logp_BT = np.take_along_axis(logp_BTV, out_BN[..., None], -1)[..., 0]
  return (tok_logp_BT * (out_BN != 0)).sum(-1)


def test_beam_search_with_the_model_cache():
  params, src = greedy_params(), source(GREEDY_SRC)
  (beam1_BN, score1_B), (beam3_BN, score3_B), greedy_BN = jax.tree.map(
    np.asarray, beam_and_greedy_fn(LOOP)(params, *src)
  )
  # Beam 1 is greedy decoding, and equals seq2seq_generate's (sample_loop's) greedy path.
  np.testing.assert_array_equal(beam1_BN, greedy_BN)
  np.testing.assert_array_equal(beam1_BN, greedy_tokens())
  # Scores are the log-probabilities the full model gives the tokens up to EOS: with 3
  # beams this needs each beam's caches to follow its hypothesis.
  np.testing.assert_allclose(score1_B, model_logp(params, src, beam1_BN), rtol=1e-4)
  np.testing.assert_allclose(score3_B, model_logp(params, src, beam3_BN), rtol=1e-4)
  assert (beam3_BN != beam1_BN).any()  # the beams found something else


# A Markov chain over tokens {0 pad, 1 EOS, 2, 3, 4}: row r's next-token probabilities
# after token t are _P["chain"][r][t]; _P["first"][r] are the first token's.
N_STEPS = 4
_P = {
  "first": [[0, 0.05, 0.5, 0.4, 0.05], [0, 0.05, 0.2, 0.4, 0.35]],
  "chain": [
    [  # row 0: greedy takes 2 (0.5), after which nothing is likely; 3 (0.4) ends surely
      [0, 0.2, 0.2, 0.2, 0.4],
      [0, 0.2, 0.2, 0.2, 0.4],
      [0, 0.3, 0.25, 0.2, 0.25],
      [0, 0.97, 0.01, 0.01, 0.01],
      [0, 0.02, 0.02, 0.02, 0.94],
    ],
    [  # row 1: 3 -> EOS is short and likely; 4 -> 4 -> 4 -> 4 long and a bit less likely
      [0, 0.2, 0.2, 0.2, 0.4],
      [0, 0.2, 0.2, 0.2, 0.4],
      [0, 0.5, 0.2, 0.2, 0.1],
      [0, 0.9, 0.04, 0.03, 0.03],
      [0, 0.04, 0.05, 0.06, 0.85],
    ],
  ],
}
with np.errstate(divide="ignore"):
  FIRST_LOGP = np.log(np.array(_P["first"]))
  CHAIN_LOGP = np.log(np.array(_P["chain"]))


def chain_step(tok_B1, pos_B1, cache):
  """The chain's next-token logits. The row is read from both kinds of cache leaves (batch
  on axis 1, and src_segment_ids on axis 0): mismatched rows give flat logits."""
  del pos_B1
  row_B = cache["row"][0]
  ok_B = row_B == cache["src_segment_ids"][:, 0]
  logits_BV = jnp.asarray(CHAIN_LOGP, jnp.float32)[row_B, tok_B1[:, 0]]
  return jnp.where(ok_B[:, None], logits_BV, 0.0), cache


@functools.partial(jax.jit, static_argnames=("beam", "alpha"))
def chain_beam_search(beam: int, alpha: float):
  cache = {"row": jnp.arange(2)[None, :], "src_segment_ids": jnp.arange(2)[:, None]}
  first_BV = jnp.asarray(FIRST_LOGP, jnp.float32)
  return decoding.beam_search(chain_step, first_BV, cache, 0, N_STEPS, beam, alpha, EOS_ID)


def chain_logp(row: int, seq) -> float:
  """Log-probability of a sequence (tokens after EOS are 0 and free), in float64."""
  total, prev = 0.0, None
  for tok in seq:
    if tok == 0:
      break
    total += FIRST_LOGP[row, tok] if prev is None else CHAIN_LOGP[row, prev, tok]
    prev = tok
  return total


def chain_best(row: int, alpha: float) -> tuple[tuple[int, ...], float]:
  """The best sequence by exhaustive search: ranked by logp / length_penalty(length)."""
  seqs = set()
  for seq in itertools.product(range(1, 5), repeat=N_STEPS):
    end = seq.index(EOS_ID) + 1 if EOS_ID in seq else N_STEPS
    seqs.add(seq[:end] + (0,) * (N_STEPS - end))

  def rank(seq):
    return chain_logp(row, seq) / decoding.length_penalty(np.count_nonzero(seq), alpha)

  best = max(seqs, key=rank)
  return best, chain_logp(row, best)


def chain_greedy(row: int) -> tuple[int, ...]:
  seq, prev = [], None
  for _ in range(N_STEPS):
    prev = int(np.argmax(FIRST_LOGP[row] if prev is None else CHAIN_LOGP[row, prev]))
    seq.append(prev)
    if prev == EOS_ID:
      break
  return tuple(seq) + (0,) * (N_STEPS - len(seq))


def test_length_penalty():
  assert decoding.length_penalty(1, 0.6) == pytest.approx(1.0)
  assert decoding.length_penalty(7, 1.0) == pytest.approx(2.0)
  assert decoding.length_penalty(19, 0.5) == pytest.approx(2.0)
  assert decoding.length_penalty(10, 0.0) == 1.0


def test_beam_search_beats_greedy_on_a_trap():
  seq_BN, score_B = map(np.asarray, chain_beam_search(3, 0.0))
  greedy = chain_greedy(0)
  assert greedy == (2, EOS_ID, 0, 0)
  assert tuple(seq_BN[0]) == (3, EOS_ID, 0, 0)
  assert score_B[0] > chain_logp(0, greedy) + 0.5
  for row in range(2):
    np.testing.assert_allclose(score_B[row], chain_logp(row, seq_BN[row]), rtol=1e-5)
  # Beam 1 is greedy, and pays for it.
  seq1_BN, score1_B = map(np.asarray, chain_beam_search(1, 0.0))
  assert tuple(seq1_BN[0]) == greedy
  np.testing.assert_allclose(score1_B[0], chain_logp(0, greedy), rtol=1e-5)


def test_length_penalty_ranks_the_beams():
  """alpha=0 ranks by raw log-probability (the short hypothesis of row 1); a large alpha
  prefers the long one. Each time the beam finds the exhaustive search's best."""
  results = {}
  for alpha in (0.0, 3.0):
    seq_BN, score_B = map(np.asarray, chain_beam_search(3, alpha))
    for row in range(2):
      best, best_logp = chain_best(row, alpha)
      assert tuple(seq_BN[row]) == best, (alpha, row)
      np.testing.assert_allclose(score_B[row], best_logp, rtol=1e-5)
    results[alpha] = tuple(seq_BN[1])
  assert results[0.0] == (3, EOS_ID, 0, 0)
  assert results[3.0] == (4, 4, 4, 4)


# --- configs/t5.py --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["v1_1", "original"])
def test_t5_variants_build(variant):
  config = t5.get_config(f"size=tiny,variant={variant}")
  vocab = types.SimpleNamespace(vocab_size=300, specials=FOURFOLD)  # a tokenizer's size and ids
  model, objective = families.resolve(config).build(config, vocab)
  assert isinstance(model, EncoderDecoder) and callable(objective)
  cfg = model.cfg
  assert cfg.vocab_size == 300 + config.task.num_sentinels
  assert (cfg.num_layers, cfg.num_decoder_layers, cfg.position) == (2, 2, "relative")
  params = nn.unbox(abstract_params(cfg))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [tuple(k.key for k in path) for path, _ in flat]
  assert not any(p[-1] == "bias" for p in paths)  # no biases anywhere
  assert params["embed"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
  mlps = [params[f"{stack}_block_{i}"]["mlp"] for stack in ("encoder", "decoder") for i in (0, 1)]
  if variant == "v1_1":
    assert params["head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
    assert cfg.mlp == "geglu" and all(set(m) == {"up", "gate", "down"} for m in mlps)
  else:
    assert "head" not in params
    assert cfg.mlp == "relu" and all(set(m) == {"up", "down"} for m in mlps)
  # The output layer, on the decoder's output y: v1_1's head, or the original's embedding
  # with y rescaled by d_model ** -0.5.
  small = dataclasses.replace(cfg, vocab_size=VOCAB, scan_layers=False)
  params = params_of(small)
  logits_BTV, inter = forward_fn(small)(params, *source(), *targets())
  y_BTD = np.asarray(inter["decoder_final_norm"]["__call__"][0], np.float64)
  if variant == "v1_1":
    want_BTV = y_BTD @ np.asarray(params["head"]["kernel"])
  else:
    want_BTV = y_BTD @ np.asarray(params["embed"]["embedding"]).T * cfg.d_model**-0.5
  np.testing.assert_allclose(logits_BTV, want_BTV, rtol=1e-4, atol=1e-4)


def test_text_of_stops_at_eos_and_drops_sentinels():
  class Bytes:
    vocab_size = 10
    specials = FOURFOLD

    def decode(self, ids):
      return ",".join(str(int(i)) for i in ids)

  assert decoding.text_of(Bytes(), np.array([4, 12, 5, EOS_ID, 6, 0])) == "4,5"
  assert decoding.text_of(Bytes(), np.array([7, 8])) == "7,8"
  other = Bytes()
  other.specials = Specials(eos=7, stop=(7, 8))  # the tokenizer's own EOS ids, not fourfold's
  assert decoding.text_of(other, np.array([4, EOS_ID, 5, 8, 6])) == f"4,{EOS_ID},5"
  assert decoding.text_of(other, np.array([7, 8])) == ""
