"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, beams.

Prefill writes the prompt's keys and values into the cache (for an encoder-decoder: runs
the encoder once and writes every layer's cross-attention keys and values); then a
jitted loop feeds one token per step and stops at EOS (any of the tokenizer's stop ids) or
after N tokens. The loops take a `step(tokens_B1, pos_B1, cache) -> (logits_BV, cache)`,
so both families (and tests with a hand-made step) share them. The text-in, text-out
helpers read the special ids (BOS, EOS, the decoder's start) from `tokenizer.specials`.

Constrained decoding: every loop takes an optional `Automaton` (a regex's token-level
automaton, built on the host by eval/constrain.py), whose state per row (per beam) rides
in the loop's carry: each step keeps only the tokens its state allows (the stop ids only in
accepting states) and moves the state by the token chosen, with no host round trip.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from modeling.transformer import TransformerConfig, init_cache, init_encdec_cache
from modeling.vocab import EOS_ID, FOURFOLD, Specials


def filter_logits(logits_BV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Masks (to -inf) all but the top-k tokens and the smallest nucleus of mass top_p."""
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the token that crosses top_p is kept, so >= 1 survives
    cutoff = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return logits_BV


class Automaton(NamedTuple):
  """A token-level automaton on the device. States are 0..S-1: 0 is the start, S-1 the
  dead state (nothing allowed, absorbing), where every disallowed token leads.

  The stop ids are not in the tables: `allowed` adds them in accepting states, so one
  automaton serves any stop ids (a chat template's end of turn as well as EOS).
  """

  next_SV: jax.Array  # int32 [S, V]: the state after each token
  mask_SW: jax.Array  # uint32 [S, ceil(V / 32)]: bit v % 32 of word v // 32 says token v is allowed
  final_S: jax.Array  # bool [S]: accepting states


def allowed(automaton: Automaton, state_B: jax.Array, vocab: int, eos_id) -> jax.Array:
  """Boolean [B, vocab]: the tokens each row's state allows; the stop ids (`eos_id`) only in
  accepting states."""
  words_BW = automaton.mask_SW[state_B]
  bits_BWK = (words_BW[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  allowed_BV = bits_BWK.reshape(state_B.shape[0], -1)[:, :vocab] > 0
  stop_V = is_eos(jnp.arange(vocab, dtype=jnp.int32), eos_id)
  return allowed_BV | (automaton.final_S[state_B][:, None] & stop_V)


def constrain(logits_BV, automaton: Automaton | None, state_B, eos_id) -> jax.Array:
  """Logits with every token the rows' states disallow at -inf (unchanged without one)."""
  if automaton is None:
    return logits_BV
  return jnp.where(allowed(automaton, state_B, logits_BV.shape[-1], eos_id), logits_BV, -jnp.inf)


def advance(automaton: Automaton | None, state_B, tokens_B, eos_id) -> jax.Array:
  """The rows' states after `tokens_B`; a stop id leaves the state as it is."""
  if automaton is None:
    return state_B
  return jnp.where(is_eos(tokens_B, eos_id), state_B, automaton.next_SV[state_B, tokens_B])


def walk(automaton: Automaton | None, state_B, tokens_BN, eos_id) -> jax.Array:
  """The rows' states after `tokens_BN`, from `state_B` (a padded tail of 0s after a stop
  id is not walked)."""
  if automaton is None:
    return state_B
  stopped_B = jnp.zeros(state_B.shape, bool)

  def step(carry, tok_B):
    state_B, stopped_B = carry
    state_B = jnp.where(stopped_B, state_B, advance(automaton, state_B, tok_B, eos_id))
    return (state_B, stopped_B | is_eos(tok_B, eos_id)), None

  (state_B, _), _ = jax.lax.scan(step, (state_B, stopped_B), tokens_BN.T)
  return state_B


def choose_tokens(
  logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def is_eos(tokens, eos_id) -> jax.Array:
  """Which `tokens` end a sequence: equal to `eos_id`, or to any of a tuple of ids."""
  eos_N = np.asarray(eos_id, np.int32).reshape(-1)
  if eos_N.size == 1:
    return tokens == int(eos_N[0])
  return jnp.any(tokens[..., None] == eos_N, axis=-1)


def sample_loop(
  step,
  logits_BV,
  cache,
  start: int,
  num_tokens: int,
  done_B,
  rng,
  temperature,
  top_k,
  top_p,
  eos_id,
  automaton: Automaton | None = None,
  state_B=None,
):
  """Tokens [B, N] drawn one at a time from `logits_BV` (the prefill's) on; a row's tokens
  after its EOS (`eos_id`: an id or a tuple of ids) are 0. Token i is fed at position
  `start + i`. With an `automaton`, each row starts in `state_B` (None: the start state)
  and draws only what its state allows; temperature, top-k and top-p apply after the mask."""
  b = logits_BV.shape[0]
  if state_B is None:
    state_B = jnp.zeros((b,), jnp.int32)

  def draw(logits_BV, done_B, state_B, rng):
    logits_BV = constrain(logits_BV, automaton, state_B, eos_id)
    tok_B = jnp.where(done_B, 0, choose_tokens(logits_BV, rng, temperature, top_k, top_p))
    state_B = jnp.where(done_B, state_B, advance(automaton, state_B, tok_B, eos_id))
    return tok_B, done_B | is_eos(tok_B, eos_id), state_B

  rng, sub = jax.random.split(rng)
  first, done_B, state_B = draw(logits_BV, done_B, state_B, sub)
  out_BN = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)

  def body(i, carry):
    out_BN, cache, done_B, state_B, rng = carry
    tok_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    logits_BV, cache = step(tok_B1, jnp.full((b, 1), start + i - 1, jnp.int32), cache)
    rng, sub = jax.random.split(rng)
    nxt_B, done_B, state_B = draw(logits_BV, done_B, state_B, sub)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, nxt_B[:, None], i, axis=1)
    return out_BN, cache, done_B, state_B, rng

  carry = (out_BN, cache, done_B, state_B, rng)
  out_BN, _, done_B, _, _ = jax.lax.fori_loop(1, num_tokens, body, carry)
  return out_BN, done_B


def _take_rows(cache, rows_R):
  """The cache's rows `rows_R` (batch axis 1 of layer-stacked leaves, 0 of the source's
  segment ids)."""

  def take(path, a):
    axis = 0 if jax.tree_util.keystr(path).endswith("['src_segment_ids']") else 1
    return jnp.take(a, rows_R, axis=axis)

  return jax.tree_util.tree_map_with_path(take, cache)


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha: scores are divided by it to compare lengths."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(
  step,
  logits_BV,
  cache,
  start: int,
  num_tokens: int,
  beam: int,
  alpha: float,
  eos_id: int | tuple[int, ...],
  automaton: Automaton | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(best sequence [B, N], its log-probability [B]) of a beam search of width `beam`.

  Hypotheses are ranked by log-probability / length_penalty(length, alpha); a finished
  one (EOS) keeps its score and pads with 0, competing with the live ones. `cache` holds
  B rows; each is repeated per beam. Beam 1 is greedy decoding. With an `automaton`, each
  beam carries its state and extends only by the tokens it allows (masked after the
  log-softmax, so scores stay the model's log-probabilities).
  """
  b, v = logits_BV.shape
  k = min(beam, v)
  state_B = jnp.zeros((b,), jnp.int32)
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32))
  score_BK, tok_BK = jax.lax.top_k(constrain(logp_BV, automaton, state_B, eos_id), k)
  state_BK = advance(automaton, jnp.zeros((b, k), jnp.int32), tok_BK, eos_id)
  seqs_BKN = jnp.zeros((b, k, num_tokens), jnp.int32).at[:, :, 0].set(tok_BK)
  done_BK = is_eos(tok_BK, eos_id)
  len_BK = jnp.ones((b, k), jnp.float32)
  cache = _take_rows(cache, jnp.repeat(jnp.arange(b), k))
  pad_V = jnp.full((v,), -jnp.inf).at[0].set(0.0)  # a finished hypothesis only pads

  def body(i, carry):
    seqs_BKN, score_BK, done_BK, len_BK, state_BK, cache = carry
    tok = seqs_BKN[:, :, i - 1].reshape(b * k, 1)
    logits, cache = step(tok, jnp.full((b * k, 1), start + i - 1, jnp.int32), cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    logp_BKV = constrain(logp, automaton, state_BK.reshape(-1), eos_id).reshape(b, k, v)
    logp_BKV = jnp.where(done_BK[..., None], pad_V, logp_BKV)
    total_BKV = score_BK[..., None] + logp_BKV
    new_len_BK = len_BK + ~done_BK
    rank_BKV = total_BKV / length_penalty(new_len_BK, alpha)[..., None]
    _, flat_BK = jax.lax.top_k(rank_BKV.reshape(b, k * v), k)
    parent_BK, tok_BK = flat_BK // v, flat_BK % v
    pick = functools.partial(jnp.take_along_axis, axis=1)
    score_BK = pick(total_BKV.reshape(b, k * v), flat_BK)
    seqs_BKN = pick(seqs_BKN, parent_BK[..., None]).at[:, :, i].set(tok_BK)
    was_done_BK = pick(done_BK, parent_BK)
    len_BK = pick(new_len_BK, parent_BK)
    state_BK = pick(state_BK, parent_BK)
    state_BK = jnp.where(was_done_BK, state_BK, advance(automaton, state_BK, tok_BK, eos_id))
    done_BK = was_done_BK | is_eos(tok_BK, eos_id)
    rows = (jnp.arange(b)[:, None] * k + parent_BK).reshape(-1)
    return seqs_BKN, score_BK, done_BK, len_BK, state_BK, _take_rows(cache, rows)

  carry = (seqs_BKN, score_BK, done_BK, len_BK, state_BK, cache)
  seqs_BKN, score_BK, done_BK, len_BK, state_BK, _ = jax.lax.fori_loop(1, num_tokens, body, carry)
  rank_BK = score_BK / length_penalty(len_BK, alpha)
  if automaton is not None:  # hypotheses the automaton accepts first, when there are any
    ok_BK = done_BK | automaton.final_S[state_BK]
    ok_BK = ok_BK & jnp.isfinite(rank_BK)
    rank_BK = jnp.where(ok_BK.any(axis=1, keepdims=True) & ~ok_BK, -jnp.inf, rank_BK)
  best_B = jnp.argmax(rank_BK, axis=1)
  rows_B = jnp.arange(b)
  return seqs_BKN[rows_B, best_B], score_BK[rows_B, best_B]


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "num_tokens",
    "temperature",
    "top_k",
    "top_p",
    "beam",
    "alpha",
    "eos_id",
  ),
)
def _generate(
  model,
  params,
  prompt_BP,
  done_B,
  rng,
  automaton,
  state_B,
  *,
  num_tokens,
  temperature,
  top_k,
  top_p,
  beam,
  alpha,
  eos_id,
):
  cfg: TransformerConfig = model.cfg
  b, p = prompt_BP.shape
  cache = init_cache(cfg, b, p + num_tokens)
  pos_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits_BPV, cache = model.apply(
    {"params": params}, prompt_BP, pos_BP, jnp.ones_like(prompt_BP), cache
  )

  def step(tok_B1, pos_B1, cache):
    logits_B1V, cache = model.apply(
      {"params": params}, tok_B1, pos_B1, jnp.ones_like(tok_B1), cache
    )
    return logits_B1V[:, 0], cache

  if beam > 1:
    out_BN, _ = beam_search(
      step, logits_BPV[:, -1], cache, p, num_tokens, beam, alpha, eos_id, automaton
    )
    return out_BN, jnp.ones((b,), bool), state_B
  out_BN, done_B = sample_loop(
    step,
    logits_BPV[:, -1],
    cache,
    p,
    num_tokens,
    done_B,
    rng,
    temperature,
    top_k,
    top_p,
    eos_id,
    automaton,
    state_B,
  )
  return out_BN, done_B, walk(automaton, state_B, out_BN, eos_id)


def generate(
  model: nn.Module,
  params,
  prompt_BP: np.ndarray,
  num_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | tuple[int, ...] = EOS_ID,
  automaton: Automaton | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
) -> np.ndarray:
  """New tokens [B, N] after the prompt; rows that hit EOS (`eos_id`, or any of a tuple of
  ids) continue as 0. `automaton`: only what it allows is generated (see `Automaton`).
  `beam_size` > 1 is beam search (temperature, top-k and top-p do not apply to it).

  A prompt longer than the context keeps its last `max_len - 1` tokens. Past the
  context, decoding slides: once the cache is full it restarts from the last
  `max_len // 2` tokens (as nanoGPT crops its context), so any N can be produced (beam
  search: within the context only).
  """
  max_len = model.cfg.max_len
  prompt_BP = np.asarray(prompt_BP, np.int32)
  if prompt_BP.shape[1] == 0:
    raise ValueError("the prompt must hold at least one token")
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}: allowed a positive integer")
  check_automaton(automaton, model.cfg.vocab_size, eos_id)
  if prompt_BP.shape[1] > max_len - 1:
    warnings.warn(
      f"prompt of {prompt_BP.shape[1]} tokens exceeds the context {max_len}; "
      f"keeping the prompt's last {max_len - 1} tokens",
      stacklevel=2,
    )
    prompt_BP = prompt_BP[:, -(max_len - 1) :]
  if beam_size > 1 and prompt_BP.shape[1] + num_tokens > max_len:
    raise ValueError(
      f"beam_size={beam_size}: beam search stays within the context, and {prompt_BP.shape[1]} "
      f"prompt + {num_tokens} new tokens exceed {max_len}"
    )
  if prompt_BP.shape[1] + num_tokens > max_len:
    warnings.warn(
      f"{prompt_BP.shape[1]} prompt + {num_tokens} new tokens exceed the context {max_len}: "
      f"decoding continues from the last {max_len // 2} tokens each time the context fills",
      stacklevel=2,
    )
  b = prompt_BP.shape[0]
  context_BP, done_B, state_B = prompt_BP, jnp.zeros(b, bool), jnp.zeros(b, jnp.int32)
  # LongRoPE changes every position's rotation once a position passes the pretraining
  # context: there the cache is rebuilt from the whole sequence, as transformers' Phi-3 does
  rope = model.cfg.rope
  boundary = rope.original_max_len + 1 if rope.scaling == "longrope" else 0
  pieces, made = [], 0
  while made < num_tokens:
    n = min(num_tokens - made, max_len - context_BP.shape[1])
    if context_BP.shape[1] < boundary:
      n = min(n, boundary - context_BP.shape[1])
    if beam_size > 1 and n < num_tokens:  # LongRoPE's boundary would split the search
      raise ValueError(
        f"beam_size={beam_size}: beam search runs in one piece, and this model rebuilds its "
        f"cache at position {boundary} (LongRoPE): ask for at most {n} new tokens"
      )
    new_BN, done_B, state_B = _generate(
      model,
      params,
      jnp.asarray(context_BP),
      done_B,
      jax.random.fold_in(rng, made),
      automaton,
      state_B,
      num_tokens=n,
      temperature=float(temperature),
      top_k=int(top_k),
      top_p=float(top_p),
      beam=int(beam_size),
      alpha=float(length_penalty),
      eos_id=eos_id,
    )
    pieces.append(np.asarray(new_BN))
    made += n
    if bool(jnp.all(done_B)):
      pieces.append(np.zeros((b, num_tokens - made), np.int32))
      break
    context_BP = np.concatenate([context_BP, pieces[-1]], axis=1)
    if context_BP.shape[1] >= max_len:
      context_BP = context_BP[:, -(max_len // 2) :]
  return np.concatenate(pieces, axis=1)


def check_automaton(automaton: Automaton | None, vocab: int, eos_id) -> None:
  """Refuses an automaton built for another vocabulary, or one with no stop id to end on."""
  if automaton is None:
    return
  if automaton.next_SV.shape[1] != vocab:
    raise ValueError(
      f"the constraint's table covers {automaton.next_SV.shape[1]} token ids, the model's "
      f"logits {vocab}: build it for the model's vocabulary"
    )
  if np.asarray(eos_id, np.int32).reshape(-1).size == 0:
    raise ValueError("constrained decoding needs a stop id (EOS) to end an accepted text")


def greedy_answers(
  model: nn.Module,
  params,
  prompts: list[np.ndarray],
  num_tokens: list[int],
  stop_ids: tuple[int, ...],
  progress=None,
) -> list[np.ndarray]:
  """Greedy continuations of prompts of any lengths, each cut before its first stop id:
  prompts of one length decode as one batch, for the most tokens any of them asks
  (`num_tokens[i]`). `progress(done, groups)` is called after each batch."""
  out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
  by_length: dict[int, list[int]] = {}
  for i, p in enumerate(prompts):
    by_length.setdefault(p.size, []).append(i)
  for done, rows in enumerate(by_length[n] for n in sorted(by_length)):
    new_BN = generate(
      model,
      params,
      np.stack([prompts[i] for i in rows]),
      max(num_tokens[i] for i in rows),
      jax.random.PRNGKey(0),
      temperature=0.0,
      eos_id=stop_ids,
    )
    for i, new_N in zip(rows, new_BN, strict=True):
      out[i] = until_stop(new_N, stop_ids)
    if progress is not None:
      progress(done + 1, len(by_length))
  return out


def prompt_ids(tokenizer, prompt: str) -> np.ndarray:
  """The prompt's ids, read as the start of a document (after BOS when the tokenizer's model
  starts documents with one)."""
  specials: Specials = tokenizer.specials
  ids = tokenizer.encode(prompt)
  if ids.size == 0:
    raise ValueError("--prompt must be non-empty: documents are modeled from their first token")
  if specials.add_bos:
    ids = np.concatenate([[specials.bos], ids]).astype(np.int32)
  return ids


def complete(model, params, tokenizer, prompt: str, num_tokens: int, rng, **kw) -> str:
  """Text in, text out: the prompt, read as the start of a document, and its continuation
  up to EOS."""
  ids = prompt_ids(tokenizer, prompt)
  stops = tokenizer.specials.stop_ids
  out = generate(model, params, ids[None], num_tokens, rng, eos_id=stops, **kw)[0]
  return prompt + text_of(tokenizer, out)


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "num_tokens",
    "temperature",
    "top_k",
    "top_p",
    "beam",
    "alpha",
    "start",
    "eos_id",
  ),
)
def _seq2seq(
  model,
  params,
  src_BS,
  seg_BS,
  rng,
  automaton,
  *,
  num_tokens,
  temperature,
  top_k,
  top_p,
  beam,
  alpha,
  start,
  eos_id,
):
  b, s = src_BS.shape
  pos_BS = jnp.cumsum(seg_BS, axis=1) - 1
  cache = init_encdec_cache(model.cfg, b, s, num_tokens)

  def decoder_call(tokens, tok_B1, pos_B1, cache):
    logits_B1V, cache = model.apply(
      {"params": params},
      tokens,
      pos_BS if tokens is not None else None,
      seg_BS if tokens is not None else None,
      cache,
      targets_in_BL=tok_B1,
      targets_positions_BL=pos_B1,
      targets_segment_ids_BL=jnp.ones_like(tok_B1),
    )
    return logits_B1V[:, 0], cache

  start_B1 = jnp.full((b, 1), start, jnp.int32)
  logits_BV, cache = decoder_call(src_BS, start_B1, jnp.zeros_like(start_B1), cache)  # the encoder

  def step(tok_B1, pos_B1, cache):  # the decoder alone, on the cached cross keys / values
    return decoder_call(None, tok_B1, pos_B1 + 1, cache)

  if beam > 1:
    return beam_search(step, logits_BV, cache, 0, num_tokens, beam, alpha, eos_id, automaton)[0]
  done_B = jnp.zeros((b,), bool)
  out_BN, _ = sample_loop(
    step,
    logits_BV,
    cache,
    0,
    num_tokens,
    done_B,
    rng,
    temperature,
    top_k,
    top_p,
    eos_id,
    automaton,
  )
  return out_BN


def seq2seq_generate(
  model: nn.Module,
  params,
  src_BS: np.ndarray,
  num_tokens: int,
  rng: jax.Array,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  beam_size: int = 1,
  length_penalty: float = 0.6,
  specials: Specials = FOURFOLD,
  src_lengths: np.ndarray | None = None,
  automaton: Automaton | None = None,
) -> np.ndarray:
  """Encoder-decoder output tokens [B, N] for source rows `src_BS`, padded on the right
  (each row's first `src_lengths` tokens are real; None: those that are not
  `specials.pad`); the decoder starts at `specials.decoder_start`, and after EOS (any of
  `specials.stop_ids`) a row holds 0. `beam_size` > 1 is beam search (temperature, top-k,
  top-p are for sampling and do not apply to it). `automaton`: only what it allows is
  generated (see `Automaton`)."""
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size}: allowed a positive integer")
  if num_tokens < 1:
    raise ValueError(f"num_tokens={num_tokens}: allowed a positive integer")
  check_automaton(automaton, model.cfg.vocab_size, specials.stop_ids)
  src_BS = np.asarray(src_BS, np.int32)
  if src_lengths is None:
    seg_BS = src_BS != specials.pad
  else:
    seg_BS = np.arange(src_BS.shape[1]) < np.asarray(src_lengths)[:, None]
  out = _seq2seq(
    model,
    params,
    jnp.asarray(src_BS),
    jnp.asarray(seg_BS, jnp.int32),
    rng,
    automaton,
    num_tokens=int(num_tokens),
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    beam=int(beam_size),
    alpha=float(length_penalty),
    start=specials.require("decoder_start", "an encoder-decoder's decoder"),
    eos_id=specials.stop_ids,
  )
  return np.asarray(out)


def until_stop(ids_N: np.ndarray, stop_ids) -> np.ndarray:
  """Generated ids before the first of `stop_ids` (all of them when none occurs)."""
  ids_N = np.asarray(ids_N)
  end = np.flatnonzero(np.isin(ids_N, stop_ids))
  return ids_N[: end[0]] if end.size else ids_N


def text_of(tokenizer, ids_N: np.ndarray, stop_ids=None) -> str:
  """Text of generated ids up to the first stop id (`stop_ids`; None: the tokenizer's);
  ids outside the tokenizer (sentinels, template rows) are dropped."""
  stop_ids = tokenizer.specials.stop_ids if stop_ids is None else stop_ids
  ids_N = until_stop(ids_N, stop_ids)
  return tokenizer.decode(ids_N[ids_N < tokenizer.vocab_size])


def seq2seq_texts(
  model,
  params,
  tokenizer,
  sources: list[np.ndarray],
  num_tokens: int,
  rng,
  batch_size: int = 32,
  src_len: int = 0,
  **options,
) -> list[str]:
  """Decoded text of every source (token ids), `batch_size` at a time, padded to `src_len`
  (0: the longest source), so one program serves every batch."""
  out = []
  specials: Specials = tokenizer.specials
  src_len = src_len or max(len(x) for x in sources)
  for i in range(0, len(sources), batch_size):
    chunk = sources[i : i + batch_size]
    src = np.full((batch_size, src_len), specials.pad, np.int32)
    lengths = np.ones(batch_size, np.int32)  # filler rows keep one real token
    for j, ids in enumerate(chunk):
      src[j, : len(ids)] = ids
      lengths[j] = len(ids)
    ids_BN = seq2seq_generate(
      model,
      params,
      src,
      num_tokens,
      jax.random.fold_in(rng, i),
      specials=specials,
      src_lengths=lengths,
      **options,
    )
    out += [text_of(tokenizer, ids_BN[j]) for j in range(len(chunk))]
  return out
