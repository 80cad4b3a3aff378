"""Autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p.

Prefill writes the prompt's keys and values into the cache; then a jitted
loop feeds one token per step and stops at EOS or after N tokens.
"""

from __future__ import annotations

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from modeling.transformer import TransformerConfig, init_cache
from train.data.tokenizers import EOS_ID


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


def choose_tokens(
  logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
  model, params, prompt_BP, done_B, rng, *, num_tokens, temperature, top_k, top_p, eos_id
):
  cfg: TransformerConfig = model.cfg
  b, p = prompt_BP.shape
  cache = init_cache(cfg, b, p + num_tokens)
  pos_BP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits_BPV, cache = model.apply(
    {"params": params}, prompt_BP, pos_BP, jnp.ones_like(prompt_BP), cache
  )
  rng, sub = jax.random.split(rng)
  first = jnp.where(done_B, 0, choose_tokens(logits_BPV[:, -1], sub, temperature, top_k, top_p))
  out_BN = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)
  done_B = done_B | (first == eos_id)

  def body(i, carry):
    out_BN, cache, done_B, rng = carry
    tok_B1 = jax.lax.dynamic_slice_in_dim(out_BN, i - 1, 1, axis=1)
    pos_B1 = jnp.full((b, 1), p + i - 1, jnp.int32)
    logits_B1V, cache = model.apply(
      {"params": params}, tok_B1, pos_B1, jnp.ones_like(tok_B1), cache
    )
    rng, sub = jax.random.split(rng)
    nxt_B = choose_tokens(logits_B1V[:, 0], sub, temperature, top_k, top_p)
    nxt_B = jnp.where(done_B, 0, nxt_B)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, nxt_B[:, None], i, axis=1)
    return out_BN, cache, done_B | (nxt_B == eos_id), rng

  out_BN, _, done_B, _ = jax.lax.fori_loop(1, num_tokens, body, (out_BN, cache, done_B, rng))
  return out_BN, done_B


def generate(
  model: nn.Module,
  params,
  prompt_BP: np.ndarray,
  num_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int = EOS_ID,
) -> np.ndarray:
  """New tokens [B, N] after the prompt; rows that hit EOS continue as 0 (PAD).

  A prompt longer than the context keeps its last `max_len - 1` tokens. Past the
  context, decoding slides: once the cache is full it restarts from the last
  `max_len // 2` tokens (as nanoGPT crops its context), so any N can be produced.
  """
  max_len = model.cfg.max_len
  prompt_BP = np.asarray(prompt_BP, np.int32)
  if prompt_BP.shape[1] == 0:
    raise ValueError("the prompt must hold at least one token")
  if prompt_BP.shape[1] > max_len - 1:
    warnings.warn(
      f"prompt of {prompt_BP.shape[1]} tokens exceeds the context {max_len}; "
      f"keeping the prompt's last {max_len - 1} tokens",
      stacklevel=2,
    )
    prompt_BP = prompt_BP[:, -(max_len - 1) :]
  if prompt_BP.shape[1] + num_tokens > max_len:
    warnings.warn(
      f"{prompt_BP.shape[1]} prompt + {num_tokens} new tokens exceed the context {max_len}: "
      f"decoding continues from the last {max_len // 2} tokens each time the context fills",
      stacklevel=2,
    )
  context_BP, done_B = prompt_BP, jnp.zeros(prompt_BP.shape[0], bool)
  pieces, made = [], 0
  while made < num_tokens:
    n = min(num_tokens - made, max_len - context_BP.shape[1])
    new_BN, done_B = _generate(
      model,
      params,
      jnp.asarray(context_BP),
      done_B,
      jax.random.fold_in(rng, made),
      num_tokens=n,
      temperature=float(temperature),
      top_k=int(top_k),
      top_p=float(top_p),
      eos_id=eos_id,
    )
    pieces.append(np.asarray(new_BN))
    made += n
    if bool(jnp.all(done_B)):
      pieces.append(np.zeros((prompt_BP.shape[0], num_tokens - made), np.int32))
      break
    context_BP = np.concatenate([context_BP, pieces[-1]], axis=1)[:, -(max_len // 2) :]
  return np.concatenate(pieces, axis=1)


def complete(model, params, tokenizer, prompt: str, num_tokens: int, rng, **kw) -> str:
  """Text in, text out: the prompt, read as the start of a document, and its continuation."""
  ids = tokenizer.encode(prompt)
  if ids.size == 0:
    raise ValueError("--prompt must be non-empty: documents are modeled from their first token")
  out = generate(model, params, ids[None], num_tokens, rng, eos_id=EOS_ID, **kw)[0]
  end = np.flatnonzero(out == EOS_ID)
  if end.size:
    out = out[: end[0]]
  return prompt + tokenizer.decode(out)
