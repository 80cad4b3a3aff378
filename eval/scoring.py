"""The log-likelihood of a text under a checkpoint (`python -m eval.score`).

Decoders (`score_causal`): the exact log-likelihood of the text's tokens. The scored
sequence is `[prefix] + tokenizer.encode(text)`, with one prefix token as context for the
text's first token: the tokenizer's BOS when its model starts documents with one
(`specials.add_bos`: Llama), else its EOS, the token that ends every training document
(GPT-2's <|endoftext|>; fourfold's own tokenizers' EOS). That is lm-evaluation-harness's
`loglikelihood_rolling` convention (its prefix token is BOS where the tokenizer has one,
GPT-2's EOT otherwise). Every text token is scored once, the prefix never, and no EOS is
appended: `tokens` = len(tokenizer.encode(text)).

Long texts go through the model in windows of C tokens (`model.cfg.max_len`, or a smaller
`context`; C >= 2) with a stride s (1 <= s <= C - 1). A window of C tokens makes C - 1
predictions, from its first C - 1 positions, as a training row of C tokens does (its last
position never learns to predict, and is never asked to). Over the T = N + 1 tokens of the
sequence, window k ends at e_k = min(C + k s, T), holds seq[e_k - C:e_k] (seq[0:e_k] while
e_k <= C), and keeps its predictions of seq[e_{k-1}:e_k] (e_{-1} = 1). So the tokens of the
first window are scored with their whole left context, and every later one is predicted
from at least C - s tokens and at most C - 1: the strided evaluation of the Hugging Face
perplexity guide (plus the prefix token), except that the last window too takes a full C
tokens. With s = C - 1 the windows are exactly lm-evaluation-harness's
`loglikelihood_rolling` ones for a max length of C - 1 (each window's first kept token
sees one token). Every window is min(C, T) tokens long, so one program serves them all.
Windows start at position 0, as documents do.

Masked diffusion (`score_diffusion`): the NELBO (modeling/diffusion.py) of non-overlapping
windows of C tokens, each modeled as its own sequence (positions from 0; a short last window
padded with segment 0), averaged over `mc_samples` Monte Carlo draws. Its negative is an
estimate of a lower bound (the ELBO) on the log-likelihood of the text as those windows,
never the log-likelihood itself. No framing tokens are added: the text's tokens are
scored, all of them.

Bits per byte, both: -loglikelihood / ln 2 / (UTF-8 bytes of the text).

Encoders and encoder-decoders are refused: an MLM's masked-token predictions are no
distribution over texts, and an encoder-decoder models targets given a source.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from modeling import diffusion
from modeling.vocab import Specials
from train import families
from train.objectives import token_nll

Progress = Callable[[int, int], None]  # (windows scored, windows in all)


def progress_printer(what: str = "windows", every_s: float = 5.0) -> Progress:
  """A Progress callback printing `<what> i/n` to stderr at most every `every_s` seconds, and
  once at the end of more than one."""
  last = [time.monotonic()]

  def show(done: int, total: int) -> None:
    now = time.monotonic()
    if (done == total and total > 1) or now - last[0] >= every_s:
      print(f"{what} {done}/{total}", file=sys.stderr, flush=True)
      last[0] = now

  return show


MC_SAMPLES = 8  # diffusion: Monte Carlo draws per window, by default


@dataclasses.dataclass(frozen=True)
class Score:
  """What `eval.score` prints: the log-likelihood (or its ELBO bound), in nats."""

  loglikelihood: float  # nats, summed over the scored tokens
  tokens: int  # tokens scored
  bytes: int  # UTF-8 bytes of the text
  windows: int  # windows through the model (diffusion: each once per draw)
  notes: tuple[str, ...]  # how it was scored, one line each
  bound: bool = False  # diffusion: `loglikelihood` estimates the ELBO, a lower bound
  # decoders: log p of each scored token (float64, in text order); diffusion: None
  token_logprobs: np.ndarray | None = None
  # diffusion: standard deviation of one draw's estimate of `loglikelihood`; else None
  draw_std: float | None = None

  @property
  def bits_per_byte(self) -> float:
    return -self.loglikelihood / math.log(2) / self.bytes

  def summary(self) -> str:
    """The command's last line."""
    return (
      f"loglikelihood={self.loglikelihood:.6f} tokens={self.tokens} "
      f"bits_per_byte={self.bits_per_byte:.6f}"
    )


def read_text(path: str) -> str:
  """The file's text; a missing, empty or non-UTF-8 file is refused naming it."""
  if not os.path.isfile(path):
    raise ValueError(f"--text_file={path!r}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError(f"--text_file={path!r}: the file is empty; there is nothing to score")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"--text_file={path!r}: not UTF-8 text ({e})") from e


def encode_text(tokenizer, text: str) -> np.ndarray:
  """The text's token ids (no framing); a text of no tokens is refused."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  if ids.size == 0:
    raise ValueError("the text encodes to no tokens; there is nothing to score")
  return ids


def prefix_token(specials: Specials) -> int:
  """The context of a text's first token: BOS where the model's documents start with it,
  else EOS (the end of the document before)."""
  if specials.add_bos:
    return specials.require("bos", "a tokenizer that adds BOS")
  return specials.require("eos", "scoring a text's first token (it is read after EOS)")


def check_context(context: int, model_len: int, smallest: int = 1) -> int:
  """The window length: `context`, or the model's context `model_len` when 0."""
  if context == 0:
    return model_len
  if not smallest <= context <= model_len:
    raise ValueError(
      f"--max_len={context}: allowed {smallest}..{model_len} (the model's context, "
      "model.max_len), or 0 for the model's context"
    )
  return context


# ---- decoders


def causal_windows(t: int, context: int, stride: int) -> list[tuple[int, int, int]]:
  """(begin, first kept, end) of each window over a sequence of t tokens: seq[begin:end]
  goes in, and its predictions of seq[first:end] are kept (see the module docstring)."""
  if not 1 <= stride <= context - 1:
    raise ValueError(f"--stride={stride}: allowed 1..{context - 1} (the window length - 1)")
  length = min(context, t)
  out, first, end = [], 1, length
  while True:
    out.append((end - length, first, end))
    if end == t:
      return out
    first, end = end, min(end + stride, t)


@functools.partial(jax.jit, static_argnames="model")
def _next_token_logprobs(model, params, tokens_BL):
  """[B, L - 1] log p(tokens[i + 1] | tokens[..i]) of each row, one document from position
  0 (the last position predicts nothing, as in training)."""
  pos_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
  logits_BLV, _ = model.apply({"params": params}, tokens_BL, pos_BL, jnp.ones_like(tokens_BL))
  return -token_nll(logits_BLV[:, :-1], tokens_BL[:, 1:])


def score_causal(
  model,
  params,
  tokenizer,
  text: str,
  context: int = 0,
  stride: int = 0,
  batch_size: int = 8,
  progress: Progress | None = None,
) -> Score:
  """The exact log-likelihood of `text` under a decoder, in strided windows of `context`
  tokens (0: the model's); `stride` 0 is half the window."""
  c = check_context(context, model.cfg.max_len, smallest=2)
  stride = stride or c // 2
  ids = encode_text(tokenizer, text)
  prefix = prefix_token(tokenizer.specials)
  seq = np.concatenate([[prefix], ids]).astype(np.int32)  # seq[t] is text token t - 1
  windows = causal_windows(seq.size, c, stride)
  length = min(c, seq.size)
  logprobs = np.full(ids.size, np.nan)  # of text token t - 1 = seq[t]
  for i in range(0, len(windows), batch_size):
    chunk = windows[i : i + batch_size]
    rows = np.zeros((batch_size, length), np.int32)  # rows past the chunk: filler
    for row, (begin, _, end) in enumerate(chunk):
      rows[row] = seq[begin:end]
    out = np.asarray(_next_token_logprobs(model, params, rows), np.float64)
    for row, (begin, first, end) in enumerate(chunk):
      logprobs[first - 1 : end - 1] = out[row, first - begin - 1 :]
    if progress:
      progress(min(i + batch_size, len(windows)), len(windows))
  assert not np.isnan(logprobs).any(), "every token is kept from one window"
  prefix_name = "BOS" if tokenizer.specials.add_bos else "EOS"
  if len(windows) == 1:
    how = f"one window of {length} tokens: every token sees all the tokens before it"
  else:
    how = (
      f"windows of {length} tokens, stride {stride}: {len(windows)} windows; after the first "
      f"window every token is predicted from at least {length - stride} of the tokens before it"
    )
  notes = (
    f"scored {ids.size} tokens of {len(text.encode('utf-8'))} bytes: each text token once, "
    f"the first given the {prefix_name} token (id {prefix}) before it; no EOS after the text",
    how,
    f"first token: {logprobs[0]:.4f} nats; nats per token: {-logprobs.mean():.4f}",
  )
  return Score(
    loglikelihood=float(logprobs.sum()),
    tokens=ids.size,
    bytes=len(text.encode("utf-8")),
    windows=len(windows),
    notes=notes,
    token_logprobs=logprobs,
  )


# ---- masked diffusion


def window_key(seed: int, window: int) -> jax.Array:
  """The rng of one window's draws: the same for a window whatever the batch it is in."""
  return jax.random.fold_in(jax.random.key(seed), window)


@functools.partial(jax.jit, static_argnames=("model", "schedule", "mc_samples"))
def _nelbo_draws(model, params, tokens_BL, seg_BL, seed, windows_B, *, schedule, mc_samples):
  """[B, K] one-draw NELBOs of each row (nats): `diffusion.nelbo_sum` of the row repeated
  K times with its window's key (K times stratified as `antithetic_times`), kept per draw."""
  sched = diffusion.make_schedule(*schedule)
  b, length = tokens_BL.shape
  k = mc_samples
  keys_B = jax.vmap(lambda w: window_key(seed, w))(windows_B)

  def draws(tokens_L, seg_L, rng):  # nelbo_sum's draws of one row, K copies
    r_time, r_mask = jax.random.split(rng)
    t_K = diffusion.antithetic_times(r_time, k)
    tokens_KL, seg_KL = (jnp.broadcast_to(x, (k, length)) for x in (tokens_L, seg_L))
    z_KL, masked_KL = diffusion.corrupt(r_mask, tokens_KL, seg_KL, sched.alpha(t_K))
    return z_KL, masked_KL, t_K

  z_BKL, masked_BKL, t_BK = jax.vmap(draws)(tokens_BL, seg_BL, keys_B)
  pos_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

  def one_draw(args):  # the network on B rows at a time
    z_BL, masked_BL, t_B = args
    logits_BLV = diffusion.denoise(model, params, z_BL, pos_BL, seg_BL, t_B)
    nll_BL = token_nll(logits_BLV, tokens_BL)
    return jnp.sum(jnp.where(masked_BL, nll_BL, 0.0), axis=-1) * sched.weight(t_B)

  per_draw = (z_BKL.swapaxes(0, 1), masked_BKL.swapaxes(0, 1), t_BK.T)
  return jax.lax.map(one_draw, per_draw).T


def score_diffusion(
  model,
  params,
  tokenizer,
  text: str,
  schedule: tuple[str, float] = ("loglinear", 1.0),
  context: int = 0,
  mc_samples: int = MC_SAMPLES,
  seed: int = 0,
  batch_size: int = 8,
  progress: Progress | None = None,
) -> Score:
  """The ELBO of `text` under a masked diffusion model (`schedule`: task.schedule and
  task.schedule_exponent), in non-overlapping windows of `context` tokens (0: the
  model's), averaged over `mc_samples` draws per window keyed on (`seed`, window)."""
  if mc_samples < 1:
    raise ValueError(f"--mc_samples={mc_samples}: allowed a positive integer")
  c = check_context(context, model.cfg.max_len)
  ids = encode_text(tokenizer, text)
  n = ids.size
  length = min(c, n)
  starts = list(range(0, n, length))
  draws = np.zeros((len(starts), mc_samples), np.float64)  # NELBO of window w, draw k
  for i in range(0, len(starts), batch_size):
    chunk = starts[i : i + batch_size]
    tokens = np.zeros((batch_size, length), np.int32)
    seg = np.ones((batch_size, length), np.int32)  # rows past the chunk: filler
    for row, start in enumerate(chunk):
      piece = ids[start : start + length]
      tokens[row], seg[row] = 0, 0
      tokens[row, : piece.size], seg[row, : piece.size] = piece, 1
    out = _nelbo_draws(
      model,
      params,
      tokens,
      seg,
      seed,
      np.arange(i, i + batch_size, dtype=np.int32),
      schedule=(str(schedule[0]), float(schedule[1])),
      mc_samples=int(mc_samples),
    )
    draws[i : i + len(chunk)] = np.asarray(out, np.float64)[: len(chunk)]
    if progress:
      progress(min(i + batch_size, len(starts)), len(starts))
  per_draw = -draws.sum(axis=0)  # one-draw estimates of the ELBO of the whole text
  draw_std = float(per_draw.std(ddof=1)) if mc_samples > 1 else float("nan")
  notes = (
    f"scored {n} tokens of {len(text.encode('utf-8'))} bytes: all of the text's tokens, "
    "no framing tokens",
    f"non-overlapping windows of {length} tokens: {len(starts)} windows, each modeled as its "
    f"own sequence; {mc_samples} Monte Carlo draws per window (seed {seed}, schedule "
    f"{schedule[0]})",
    "diffusion: loglikelihood is the ELBO (minus the NELBO), an estimate of a lower bound on "
    "the log-likelihood; bits_per_byte is then an upper bound",
    f"one draw's standard deviation: {draw_std:.4f} nats (the mean of {mc_samples} draws is "
    "printed)"
    if mc_samples > 1
    else "one draw: no spread to report (--mc_samples > 1 gives one)",
  )
  return Score(
    loglikelihood=float(per_draw.mean()),
    tokens=n,
    bytes=len(text.encode("utf-8")),
    windows=len(starts),
    notes=notes,
    bound=True,
    draw_std=draw_std,
  )


# ---- what each family scores


def _decoder(config, model, params, tokenizer, text, **kw):
  return score_causal(model, params, tokenizer, text, **kw)


def _diffusion(config, model, params, tokenizer, text, **kw):
  schedule = (config.task.schedule, config.task.schedule_exponent)
  return score_diffusion(model, params, tokenizer, text, schedule, **kw)


@dataclasses.dataclass(frozen=True)
class Scorer:
  # (config, model, params, tokenizer, text, *, context, batch_size, progress, **options)
  score: Callable[..., Score]
  options: tuple[str, ...]  # the eval.score flags it reads besides --max_len, --batch_size


# Keyed by the likelihood a family declares (train/families.py `Family.likelihood`).
SCORERS = {
  "exact": Scorer(_decoder, ("stride",)),
  "bound": Scorer(_diffusion, ("mc_samples", "seed")),
}
SCORE_OPTIONS = tuple(sorted({o for s in SCORERS.values() for o in s.options}))


def scorer_of(config) -> Scorer:
  """The scorer of the config's family; the others are refused, naming the supported."""
  family = config.model.family
  kind = families.resolve(config).family.likelihood
  if kind is None:
    scored = sorted(n for n, f in families.FAMILIES.items() if f.likelihood)
    raise ValueError(
      f"model.family={family!r}: eval.score scores a text's likelihood under a model of "
      f"text, model.family in {scored}; an encoder's masked-token predictions are no "
      "distribution over texts, and an encoder-decoder models a target given a source"
    )
  return SCORERS[kind]


def score_text(
  config,
  model,
  params,
  tokenizer,
  text: str,
  context: int = 0,
  batch_size: int = 8,
  progress: Progress | None = None,
  **options,
) -> Score:
  """`text` scored by the config's family; `options` (the flags given) must be its
  scorer's (`SCORERS`): one the family does not read is refused, not ignored."""
  scorer = scorer_of(config)
  for name in options:
    if name not in scorer.options:
      raise ValueError(
        f"--{name}: model.family={config.model.family!r} scoring reads only "
        f"{['--' + o for o in scorer.options]} besides --max_len and --batch_size"
      )
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size}: allowed a positive integer")
  return scorer.score(
    config,
    model,
    params,
    tokenizer,
    text,
    context=context,
    batch_size=batch_size,
    progress=progress,
    **options,
  )
