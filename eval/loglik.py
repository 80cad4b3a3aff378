"""Log-likelihoods of (context, continuation) requests under a checkpoint, for every family:
what multiple-choice benchmarks and lm-evaluation-harness (eval/harness.py) ask a model.

`Scorer.loglikelihood` returns, per request, (log p, is_greedy) of the continuation given
the context. What log p is depends on the family (`KINDS`, chosen from the family's
declared likelihood in train/families.py, its module and its head):

- decoder (`exact`): the sum of the continuation tokens' log-probs in one forward pass over
  context + continuation, the context left-truncated to the model's context
  (`model.max_len`) as lm-evaluation-harness truncates; is_greedy: every continuation token
  is the argmax of its prediction.
- encoder-decoder (`seq2seq`): the context is the encoder's input (ended with EOS, as
  seq2seq sources are), the continuation the teacher-forced decoder targets after the
  decoder start; the sum of their log-probs, is_greedy by argmax as above.
- masked diffusion (`bound`): a Monte Carlo estimate of the ELBO of the continuation given
  the context, a lower bound on log p (LLaDA's conditional likelihood, Nie et al. 2025,
  eq. 6): over `mc_samples` draws, k of the continuation's n tokens are masked (k uniform
  on 1..n, stratified across the draws, a uniformly random subset), the context stays
  visible, and the draw's value is n/k times the masked tokens' log-probs (weight 1 / the
  mask ratio). A time-conditioned denoiser instead draws t ~ U(0, 1), masks each
  continuation token with probability 1 - alpha(t) and weighs by w(t) (the NELBO of
  modeling/diffusion.py restricted to the continuation). The draws are keyed on the
  request's tokens and `seed`, so a request gets the same estimate whatever its batch or
  position. is_greedy: LLaDA's check: from the context with the whole continuation masked,
  each step predicts every masked position (argmax) and keeps the one it is most confident
  of (its sampler with low-confidence remasking, one token per step, temperature 0); True
  when that decodes the continuation exactly.
- encoder, MLM head (`pseudo`): the masked pseudo-log-likelihood (Salazar et al. 2020) of
  the continuation: [CLS] context continuation [SEP], each continuation token masked in
  turn with everything else visible, the sum of the masked tokens' log-probs. It is no
  log-probability of the continuation (the terms are not a chain rule); is_greedy: every
  masked token is the argmax of its prediction.

Tokens: `encode_pair` splits strings exactly as lm-evaluation-harness's
`TemplateLM.loglikelihood` does: trailing spaces of the context move to the continuation;
`causal` families encode context + continuation whole and split at len(encode(context)),
the encoder-decoder encodes each apart; an empty context is the prefix token (BOS where
the tokenizer's model starts documents with it, else EOS: eval/scoring.py's convention;
[CLS] for an encoder), unless the continuation already starts with that token.
`encode` frames a text's start as the model reads one (BOS where the tokenizer adds it,
[CLS] for an encoder; an encoder-decoder's source ends with EOS).

`loglikelihood_rolling` is eval/scoring.py's `score_text` (decoders: the exact
log-likelihood in strided windows of the context; diffusion: the ELBO); `generate_until`
goes through modeling/decoding.py's and modeling/diffusion.py's samplers.

Requests are sorted by length, cut into batches of `batch_size` rows and padded to a few
length buckets (powers of two up to the context), each compiled once; results come back in
request order and do not depend on the batch size or the order.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eval import constrain, scoring
from modeling import decoding, diffusion
from modeling.transformer import EncoderDecoder
from train import families
from train.objectives import shift_right, token_nll
from train.trainer import load_for_inference

MAX_GEN_TOKS = 256  # generate_until's max_gen_toks when a request gives none (lm_eval's)
SMALLEST_BUCKET = 16  # padded lengths: powers of two from here up to the context


# ---- batching


def bucket(n: int, cap: int) -> int:
  """The padded length of a batch whose longest row has `n` tokens: the next power of two
  (at least SMALLEST_BUCKET), at most `cap`."""
  return min(cap, max(SMALLEST_BUCKET, 1 << (n - 1).bit_length()))


def batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
  """Row indices in batches of `batch_size`, longest rows first (lm-evaluation-harness's
  Collator order), so each batch pads to a length close to its rows'."""
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  for start in range(0, len(order), batch_size):
    yield order[start : start + batch_size]


def _padded(rows: list[list[int]], batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, segment ids) [batch_size, length]: the rows on the left, padding segment 0;
  rows past `rows` are one-token filler."""
  tokens = np.zeros((batch_size, length), np.int32)
  seg = np.zeros((batch_size, length), np.int32)
  seg[len(rows) :, 0] = 1
  for j, row in enumerate(rows):
    tokens[j, : len(row)] = row
    seg[j, : len(row)] = 1
  return tokens, seg


def _target_logprobs(logits_BLV, targets_BL):
  """(log p of each target [B, L] in float32, whether it is the argmax [B, L])."""
  greedy_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
  return -token_nll(logits_BLV, targets_BL), greedy_BL


def _sum(logprobs: np.ndarray) -> float:
  return float(np.sum(np.asarray(logprobs, np.float64)))


# ---- decoders: one forward pass


@functools.partial(jax.jit, static_argnames="model")
def _causal_logprobs(model, params, inputs_BL, seg_BL, targets_BL):
  """log p(targets[:, i] | inputs[:, :i + 1]) and argmax flags, [B, L]."""
  pos_BL = jnp.broadcast_to(jnp.arange(inputs_BL.shape[1], dtype=jnp.int32), inputs_BL.shape)
  logits_BLV, _ = model.apply({"params": params}, inputs_BL, pos_BL, seg_BL)
  return _target_logprobs(logits_BLV, targets_BL)


def _score_causal(s: Scorer, requests: list[tuple[list[int], list[int]]]):
  c = s.context
  seqs = [(ctx + cont)[-(c + 1) :] for ctx, cont in requests]  # inputs seq[:-1], targets seq[1:]
  out: list[Any] = [None] * len(seqs)
  progress, total = scoring.progress_printer("loglikelihood requests"), len(seqs)
  for idx in batches([len(q) - 1 for q in seqs], s.batch_size):
    length = bucket(max(len(seqs[i]) - 1 for i in idx), c)
    inputs, seg = _padded([seqs[i][:-1] for i in idx], s.batch_size, length)
    targets, _ = _padded([seqs[i][1:] for i in idx], s.batch_size, length)
    logp, greedy = (
      np.asarray(x) for x in _causal_logprobs(s.model, s.params, inputs, seg, targets)
    )
    for j, i in enumerate(idx):
      end, n = len(seqs[i]) - 1, len(requests[i][1])
      out[i] = (_sum(logp[j, end - n : end]), bool(greedy[j, end - n : end].all()))
    progress(sum(x is not None for x in out), total)
  return out


# ---- encoder-decoders: teacher forcing


@functools.partial(jax.jit, static_argnames=("model", "start"))
def _seq2seq_logprobs(model, params, src_BS, src_seg_BS, targets_BT, tgt_seg_BT, *, start):
  """log p(targets[:, i] | source, targets[:, :i]) and argmax flags, [B, T]."""
  pos_BS = jnp.broadcast_to(jnp.arange(src_BS.shape[1], dtype=jnp.int32), src_BS.shape)
  pos_BT = jnp.broadcast_to(jnp.arange(targets_BT.shape[1], dtype=jnp.int32), targets_BT.shape)
  logits_BTV, _ = model.apply(
    {"params": params},
    src_BS,
    pos_BS,
    src_seg_BS,
    targets_in_BL=shift_right(targets_BT, pos_BT, start),
    targets_positions_BL=pos_BT,
    targets_segment_ids_BL=tgt_seg_BT,
  )
  return _target_logprobs(logits_BTV, targets_BT)


def _score_seq2seq(s: Scorer, requests):
  c = s.context
  start = s.specials.require("decoder_start", "an encoder-decoder's decoder")
  srcs = [ctx[-c:] for ctx, _ in requests]
  out: list[Any] = [None] * len(requests)
  progress, total = scoring.progress_printer("loglikelihood requests"), len(requests)
  lengths = [len(x) + len(cont) for x, (_, cont) in zip(srcs, requests, strict=True)]
  for idx in batches(lengths, s.batch_size):
    src, src_seg = _padded(
      [srcs[i] for i in idx], s.batch_size, bucket(max(len(srcs[i]) for i in idx), c)
    )
    conts = [requests[i][1] for i in idx]
    tgt, tgt_seg = _padded(conts, s.batch_size, bucket(max(map(len, conts)), c))
    logp, greedy = (
      np.asarray(x)
      for x in _seq2seq_logprobs(s.model, s.params, src, src_seg, tgt, tgt_seg, start=start)
    )
    for j, i in enumerate(idx):
      n = len(conts[j])
      out[i] = (_sum(logp[j, :n]), bool(greedy[j, :n].all()))
    progress(sum(x is not None for x in out), total)
  return out


# ---- masked diffusion: the ELBO of the continuation


def request_key(tokens: Sequence[int]) -> int:
  """A request's draws are keyed on its tokens (with the seed): the same estimate for the
  same request in any batch and at any position."""
  return zlib.crc32(np.asarray(tokens, np.int32).tobytes()) & 0x7FFFFFFF


@functools.partial(
  jax.jit, static_argnames=("model", "schedule", "mc_samples", "width", "by_count")
)
def _nelbo_draws(
  model, params, tokens_BL, seg_BL, cont_BL, keys_B, seed, *, schedule, mc_samples, width, by_count
):
  """[B, K] one-draw NELBOs of each row's continuation (`cont_BL`), its context visible.

  `by_count`: LLaDA's estimator (k ~ U{1..n} masked, stratified over the K draws, weight
  n/k); else the schedule's (t ~ U(0, 1) stratified, mask with 1 - alpha(t), weight w(t)).
  The masks are drawn at the fixed `width` (the model's context) and cut to the batch's
  length, so they do not depend on the padding."""
  sched = diffusion.make_schedule(*schedule)
  b, length = tokens_BL.shape
  k = mc_samples

  def draws(tokens_L, cont_L, key):  # the K masks of one row
    rng = jax.random.fold_in(jax.random.key(seed), key)
    pad = ((0, 0), (0, width - length))
    tokens_KW = jnp.pad(jnp.broadcast_to(tokens_L, (k, length)), pad)
    cont_KW = jnp.pad(jnp.broadcast_to(cont_L, (k, length)), pad)
    if by_count:
      _, masked_KW, k_K = diffusion.count_masks(rng, tokens_KW, cont_KW)
      n = jnp.sum(cont_L)
      t_K, w_K = k_K / jnp.maximum(n, 1), n / jnp.maximum(k_K, 1)
    else:
      r_time, r_mask = jax.random.split(rng)
      t_K = diffusion.antithetic_times(r_time, k)
      _, masked_KW = diffusion.corrupt(r_mask, tokens_KW, cont_KW, sched.alpha(t_K))
      w_K = sched.weight(t_K)
    return masked_KW[:, :length], t_K, w_K

  masked_BKL, t_BK, w_BK = jax.vmap(draws)(tokens_BL, cont_BL, keys_B)
  pos_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

  def one_draw(args):  # the network on B rows at a time
    masked_BL, t_B, w_B = args
    z_BL = jnp.where(masked_BL, diffusion.MASK_ID, tokens_BL)
    nll_BL = token_nll(diffusion.denoise(model, params, z_BL, pos_BL, seg_BL, t_B), tokens_BL)
    return jnp.sum(jnp.where(masked_BL, nll_BL, 0.0), axis=-1) * w_B

  return jax.lax.map(one_draw, (masked_BKL.swapaxes(0, 1), t_BK.T, w_BK.T)).T


@functools.partial(jax.jit, static_argnames="model")
def _greedy_unmask(model, params, tokens_BL, seg_BL, cont_BL, steps):
  """LLaDA's greedy check: every continuation position masked, then `steps` times: predict
  every masked position (argmax) and reveal the one predicted most confidently (the first
  of equals). Returns the tokens [B, L] so decoded (`diffusion.llada_sample` with
  low-confidence remasking, one token per step and temperature 0 decodes the same; rows
  here may be padded and have continuations of different lengths)."""
  pos_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
  real_B = jnp.sum(seg_BL > 0, axis=-1)

  def body(i, z_BL):
    masked_BL = z_BL == diffusion.MASK_ID
    t_B = jnp.sum(masked_BL, axis=-1) / real_B
    logits_BLV = diffusion.denoise(model, params, z_BL, pos_BL, seg_BL, t_B)
    x0_BL = jnp.argmax(logits_BLV, axis=-1).astype(jnp.int32)
    probs_BLV = jax.nn.softmax(logits_BLV, axis=-1)
    conf_BL = jnp.take_along_axis(probs_BLV, x0_BL[..., None], axis=-1)[..., 0]
    best_B = jnp.argmax(jnp.where(masked_BL, conf_BL, -jnp.inf), axis=-1)
    reveal_BL = masked_BL & (jnp.arange(z_BL.shape[1]) == best_B[:, None])
    return jnp.where(reveal_BL, x0_BL, z_BL)

  z_BL = jnp.where(cont_BL > 0, diffusion.MASK_ID, tokens_BL)
  return jax.lax.fori_loop(0, steps, body, z_BL)


def _score_bound(s: Scorer, requests):
  c = s.context
  seqs, conts = [], []
  for ctx, cont in requests:
    ctx = ctx[len(ctx) - min(len(ctx), c - len(cont)) :]
    seqs.append(ctx + cont)
    conts.append([0] * len(ctx) + [1] * len(cont))
  schedule = (str(s.config.task.schedule), float(s.config.task.schedule_exponent))
  by_count = not s.model.cfg.time_conditioning
  out: list[Any] = [None] * len(seqs)
  progress, total = scoring.progress_printer("loglikelihood requests"), len(seqs)
  for idx in batches([len(q) for q in seqs], s.batch_size):
    length = bucket(max(len(seqs[i]) for i in idx), c)
    tokens, seg = _padded([seqs[i] for i in idx], s.batch_size, length)
    cont, _ = _padded([conts[i] for i in idx], s.batch_size, length)
    keys = np.zeros(s.batch_size, np.int32)
    keys[: len(idx)] = [request_key(seqs[i]) for i in idx]
    draws = _nelbo_draws(
      s.model,
      s.params,
      tokens,
      seg,
      cont,
      keys,
      s.seed,
      schedule=schedule,
      mc_samples=s.mc_samples,
      width=c,
      by_count=by_count,
    )
    draws = np.asarray(draws, np.float64)
    if s.check_greedy:
      steps = max(len(requests[i][1]) for i in idx)
      decoded = np.asarray(_greedy_unmask(s.model, s.params, tokens, seg, cont, steps))
    for j, i in enumerate(idx):
      greedy = s.check_greedy and bool((decoded[j] == tokens[j]).all())
      out[i] = (-float(draws[j].mean()), greedy)
    progress(sum(x is not None for x in out), total)
  return out


# ---- encoders: the masked pseudo-log-likelihood


@functools.partial(jax.jit, static_argnames="model")
def _masked_logprobs(model, params, tokens_BL, seg_BL, at_B, mask_id):
  """log p(tokens[b, at[b]] | the row with that token masked) and its argmax flag, [B]."""
  rows_B = jnp.arange(tokens_BL.shape[0])
  targets_B = tokens_BL[rows_B, at_B]
  inputs_BL = tokens_BL.at[rows_B, at_B].set(mask_id)
  pos_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
  logits_BLV, _ = model.apply({"params": params}, inputs_BL, pos_BL, seg_BL)
  return _target_logprobs(logits_BLV[rows_B, at_B][:, None], targets_B[:, None])


def _score_pseudo(s: Scorer, requests):
  c = s.context
  mask_id = s.specials.require("mask", "an encoder's pseudo-log-likelihood")
  sep = s.specials.require("sep", "an encoder's [CLS] ... [SEP] framing")
  rows = []  # (request, sequence, masked position)
  for r, (ctx, cont) in enumerate(requests):
    ctx = ctx[len(ctx) - min(len(ctx), c - len(cont) - 1) :]
    seq = ctx + cont + [sep]
    rows += [(r, seq, len(ctx) + p) for p in range(len(cont))]
  sums = np.zeros(len(requests), np.float64)
  greedy = np.ones(len(requests), bool)
  progress, total = scoring.progress_printer("pseudo-log-likelihood rows"), len(rows)
  done = 0
  for idx in batches([len(seq) for _, seq, _ in rows], s.batch_size):
    length = bucket(max(len(rows[i][1]) for i in idx), c)
    tokens, seg = _padded([rows[i][1] for i in idx], s.batch_size, length)
    at = np.zeros(s.batch_size, np.int32)
    at[: len(idx)] = [rows[i][2] for i in idx]
    logp, top = (
      np.asarray(x) for x in _masked_logprobs(s.model, s.params, tokens, seg, at, mask_id)
    )
    for j, i in enumerate(idx):
      sums[rows[i][0]] += float(logp[j, 0])
      greedy[rows[i][0]] &= bool(top[j, 0])
    done += len(idx)
    progress(done, total)
  return [(float(x), bool(g)) for x, g in zip(sums, greedy, strict=True)]


# ---- generation through the project's samplers


@dataclasses.dataclass(frozen=True)
class Generation:
  """One request's generation settings, from lm-evaluation-harness's gen_kwargs."""

  until: tuple[str, ...] = ()  # the text is cut before the first of these
  max_gen_toks: int = MAX_GEN_TOKS
  temperature: float = 0.0  # 0: greedy (do_sample false)
  top_k: int = 0
  top_p: float = 1.0
  steps: int = 0  # diffusion: denoising steps; 0: one per generated token
  block_length: int = 0  # diffusion: LLaDA's semi-autoregressive blocks; 0: one block
  # constrained decoding (eval/constrain.py): a regex, a JSON schema file, or choices
  regex: str = ""
  json_schema: str = ""
  choices: tuple[str, ...] = ()

  def sampling(self) -> tuple:
    """What the requests of one batch must share (the cut strings need not)."""
    return dataclasses.astuple(dataclasses.replace(self, until=()))

  def constraint(self, s: Scorer, built: dict) -> constrain.Constraint | None:
    """The constraint asked for (None: none), built once per call (`built` caches it)."""
    key = (self.regex, self.json_schema, self.choices)
    if key not in built:
      built[key] = constrain.build(
        s.tokenizer,
        s.model.cfg.vocab_size,
        regex=self.regex or None,
        json_schema=self.json_schema or None,
        choices=list(self.choices) or None,
      )
    return built[key]

  def cut(self, text: str) -> str:
    for stop in self.until:
      text = text.split(stop)[0]
    return text


COMMON_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")


def generation_of(gen_kwargs: dict, allowed: tuple[str, ...], family: str) -> Generation:
  """`Generation` from lm_eval's gen_kwargs (until, max_gen_toks, do_sample, temperature,
  and the family's sampler options); a key the family's sampler does not read is refused."""
  kw = dict(gen_kwargs or {})
  unknown = sorted(set(kw) - {*COMMON_GEN_KWARGS, *allowed})
  if unknown:
    why = (
      ": a diffusion model unmasks positions in any order, and a constraint's automaton "
      "reads text left to right"
      if set(unknown) & set(families.CONSTRAINT_OPTIONS)
      else ""
    )
    raise ValueError(
      f"gen_kwargs {unknown}: model.family={family!r} reads {[*COMMON_GEN_KWARGS, *allowed]}{why}"
    )
  until = kw.pop("until", None) or ()
  until = (until,) if isinstance(until, str) else tuple(until)
  do_sample = bool(kw.pop("do_sample", False))
  temperature = float(kw.pop("temperature", 1.0))
  n = int(kw.pop("max_gen_toks", MAX_GEN_TOKS))
  if n < 1:
    raise ValueError(f"gen_kwargs max_gen_toks={n}: allowed a positive integer")
  choices = kw.pop("choices", ())
  choices = tuple(choices.split(",") if isinstance(choices, str) else choices)
  defaults = Generation()
  return Generation(
    until=tuple(u for u in until if u),
    max_gen_toks=n,
    temperature=temperature if do_sample else 0.0,
    choices=choices,
    **{k: type(getattr(defaults, k))(v) for k, v in kw.items()},
  )


def _groups(n: int, key) -> Iterator[list[int]]:
  """Indices 0..n-1 grouped by `key(i)`, in first-seen order."""
  by: dict[Any, list[int]] = {}
  for i in range(n):
    by.setdefault(key(i), []).append(i)
  yield from by.values()


Requests = list[tuple[list[int], Generation, Any]]  # (context ids, settings, constraint)


def _generate_causal(s: Scorer, requests: Requests) -> list[np.ndarray]:
  """decoding.generate on prompts of one length and settings at a time; each prompt keeps
  its last max_len - max_gen_toks tokens (at least one) as lm-evaluation-harness does."""
  prompts = [ids[-max(1, s.context - g.max_gen_toks) :] for ids, g, _ in requests]
  out: list[Any] = [None] * len(requests)
  keyed = lambda i: (len(prompts[i]), requests[i][1].sampling())  # noqa: E731
  for n, group in enumerate(_groups(len(requests), keyed)):
    _, g, constraint = requests[group[0]]
    for start in range(0, len(group), s.batch_size):
      rows = group[start : start + s.batch_size]
      new_BN = decoding.generate(
        s.model,
        s.params,
        np.stack([prompts[i] for i in rows]),
        g.max_gen_toks,
        jax.random.fold_in(jax.random.PRNGKey(s.seed), n),
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        eos_id=s.specials.stop_ids,
        automaton=None if constraint is None else constraint.automaton,
      )
      for j, i in enumerate(rows):
        out[i] = new_BN[j]
  return out


def _generate_seq2seq(s: Scorer, requests: Requests) -> list[np.ndarray]:
  """decoding.seq2seq_generate per settings, the encoder's inputs (the context's last
  max_len tokens) padded to a length bucket."""
  out: list[Any] = [None] * len(requests)
  for n, group in enumerate(_groups(len(requests), lambda i: requests[i][1].sampling())):
    _, g, constraint = requests[group[0]]
    sources = {i: requests[i][0][-s.context :] for i in group}
    length = bucket(max(map(len, sources.values())), s.context)
    for start in range(0, len(group), s.batch_size):
      rows = group[start : start + s.batch_size]
      src, seg = _padded([sources[i] for i in rows], s.batch_size, length)
      new_BN = decoding.seq2seq_generate(
        s.model,
        s.params,
        src,
        g.max_gen_toks,
        jax.random.fold_in(jax.random.PRNGKey(s.seed), n * len(requests) + start),
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        specials=s.specials,
        src_lengths=seg.sum(axis=1),
        automaton=None if constraint is None else constraint.automaton,
      )
      for j, i in enumerate(rows):
        out[i] = new_BN[j]
  return out


def _generate_diffusion(s: Scorer, requests: Requests) -> list[np.ndarray]:
  """diffusion.llada_sample (low-confidence remasking) on the context followed by
  max_gen_toks masks (at most the context - 1), the context left-truncated to fit; rows of
  one layout and settings share a batch."""
  out: list[Any] = [None] * len(requests)
  layouts = []
  for ids, g, _ in requests:
    n = min(g.max_gen_toks, s.context - 1)
    layouts.append((ids[-(s.context - n) :], n))
  keyed = lambda i: (len(layouts[i][0]), layouts[i][1], requests[i][1].sampling())  # noqa: E731
  for k, group in enumerate(_groups(len(requests), keyed)):
    g, n = requests[group[0]][1], layouts[group[0]][1]
    for start in range(0, len(group), s.batch_size):
      rows = group[start : start + s.batch_size]
      z_BL = np.array([[*layouts[i][0], *[diffusion.MASK_ID] * n] for i in rows], np.int32)
      tokens_BL, _ = diffusion.llada_sample(
        s.model,
        s.params,
        z_BL,
        jax.random.fold_in(jax.random.PRNGKey(s.seed), k * len(requests) + start),
        steps=g.steps or n,
        block_length=g.block_length,
        temperature=g.temperature,
        top_p=g.top_p,
      )
      for j, i in enumerate(rows):
        out[i] = tokens_BL[j, -n:]
  return out


# ---- what each family's log-likelihood is


def _frame_document(ids: list[int], specials) -> list[int]:
  return [specials.bos, *ids] if specials.add_bos else ids


def _frame_source(ids: list[int], specials) -> list[int]:
  return [*ids, specials.require("eos", "an encoder-decoder's source (it ends with EOS)")]


def _frame_encoder(ids: list[int], specials) -> list[int]:
  return [specials.require("cls", "an encoder's [CLS] ... [SEP] framing"), *ids]


@dataclasses.dataclass(frozen=True)
class Kind:
  """How a family scores and generates continuations."""

  means: str  # what `loglikelihood` returns, one line
  # causal: a pair is encoded whole and split; seq2seq: each part apart (lm_eval's backends)
  backend: str
  score: Callable  # (scorer, [(context ids, continuation ids)]) -> [(log p, is_greedy)]
  frame: Callable  # (text ids, specials) -> the ids as the model reads a text's start
  # (scorer, [(context ids, Generation, constraint)]) -> the generated ids of each; None:
  # the family generates no text
  generate: Callable | None
  gen_options: tuple[str, ...] = ()  # the gen_kwargs it reads besides COMMON_GEN_KWARGS


KINDS = {
  "exact": Kind(
    "the exact sum of the continuation's token log-probs",
    "causal",
    _score_causal,
    _frame_document,
    _generate_causal,
    ("top_k", "top_p", *families.CONSTRAINT_OPTIONS),
  ),
  "seq2seq": Kind(
    "the exact sum of the continuation's (decoder targets') log-probs given the context (encoder input)",
    "seq2seq",
    _score_seq2seq,
    _frame_source,
    _generate_seq2seq,
    ("top_k", "top_p", *families.CONSTRAINT_OPTIONS),
  ),
  "bound": Kind(
    "a Monte Carlo estimate of the ELBO of the continuation given the context (a lower bound)",
    "causal",
    _score_bound,
    _frame_document,
    _generate_diffusion,
    ("top_p", "steps", "block_length"),
  ),
  "pseudo": Kind(
    "the masked pseudo-log-likelihood of the continuation (each token masked in turn)",
    "causal",
    _score_pseudo,
    _frame_encoder,
    None,
  ),
}


def kind_of(config: ml_collections.ConfigDict) -> str:
  """The `KINDS` key of the config's family: its declared likelihood (exact, bound), else
  teacher forcing for an encoder-decoder, else the pseudo-log-likelihood of an MLM head."""
  wiring = families.resolve(config)
  if wiring.family.likelihood:
    return wiring.family.likelihood
  if wiring.family.model is EncoderDecoder:
    return "seq2seq"
  if wiring.task.head == "mlm":
    return "pseudo"
  raise ValueError(
    f"task.name={config.task.name!r}: a model.family={config.model.family!r} workdir scores "
    f"continuations only with its MLM head (task.name='pretrain'); this one has a "
    f"{wiring.task.head!r} head"
  )


@dataclasses.dataclass(frozen=True)
class Scorer:
  """A checkpoint that scores (context, continuation) requests; see the module docstring."""

  config: ml_collections.ConfigDict
  model: Any
  params: Any
  tokenizer: Any
  batch_size: int = 16  # rows per network call
  mc_samples: int = 16  # diffusion: Monte Carlo draws per request (and per rolling window)
  seed: int = 0  # diffusion draws; sampling
  stride: int = 0  # decoder loglikelihood_rolling: eval.score's --stride (0: half the context)
  # diffusion: run LLaDA's greedy check for is_greedy (one network call per continuation
  # token); False skips it and every is_greedy is False (LLaDA's is_check_greedy=False)
  check_greedy: bool = True

  def __post_init__(self):
    for name in ("batch_size", "mc_samples"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name}={getattr(self, name)}: allowed a positive integer")
    if self.stride < 0:
      raise ValueError(f"stride={self.stride}: allowed 0 (half the context) or a positive integer")
    kind_of(self.config)  # refuses an encoder without its MLM head before any work

  @classmethod
  def from_workdir(
    cls, workdir: str, *, batch_size: int = 16, mc_samples: int = 16, seed: int = 0
  ) -> Scorer:
    """The workdir's model (train/trainer.py's load_for_inference: the EMA params where the
    run kept them, LoRA merged)."""
    config, model, params, tokenizer = load_for_inference(workdir)
    return cls(config, model, params, tokenizer, batch_size, mc_samples, seed)

  @property
  def family(self) -> str:
    return self.config.model.family

  @functools.cached_property
  def kind(self) -> Kind:
    return KINDS[kind_of(self.config)]

  @property
  def specials(self):
    return self.tokenizer.specials

  @property
  def context(self) -> int:
    """The model's context in tokens (model.max_len)."""
    return self.model.cfg.max_len

  @property
  def prefix_token_id(self) -> int:
    """The context of a continuation with none: [CLS] for an encoder, else BOS where the
    tokenizer's model starts documents with it, else EOS (eval/scoring.py)."""
    if self.kind.frame is _frame_encoder:
      return self.specials.require("cls", "an encoder's [CLS] ... [SEP] framing")
    return scoring.prefix_token(self.specials)

  @property
  def eot_token_id(self) -> int:
    """The end of a text: EOS (an encoder's [SEP] where its tokenizer has no EOS)."""
    if self.specials.eos is not None:
      return self.specials.eos
    return self.specials.require("sep", "the end of an encoder's text")

  # ---- strings to tokens

  def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of `text`; unless `add_special_tokens` is False, framed as the model reads
    a text's start (BOS where the tokenizer adds it, [CLS] first for an encoder, EOS last
    for an encoder-decoder's source)."""
    ids = [int(x) for x in self.tokenizer.encode(text)]
    return ids if add_special_tokens is False else self.kind.frame(ids, self.specials)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness's
    TemplateLM.loglikelihood and _encode_pair split them (module docstring)."""
    if continuation == "":
      raise ValueError(f"continuation of context {context[-40:]!r} is empty: nothing to score")
    if context == "":
      cont = self.encode(continuation, add_special_tokens=False)
      prefix = self.prefix_token_id
      return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    if self.kind.backend == "causal":
      whole, ctx = self.encode(context + continuation), self.encode(context)
      return ctx, whole[len(ctx) :]
    return self.encode(context), self.encode(continuation, add_special_tokens=False)

  # ---- lm-evaluation-harness's requests

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(context, continuation) strings -> (log p of the continuation given the context,
    is_greedy); log p is the family's (`Kind.means`, module docstring)."""
    return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

  def loglikelihood_tokens(
    self, requests: Sequence[tuple[list[int], list[int]]]
  ) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) -> (log p, is_greedy). A context of no tokens reads
    the prefix token; a continuation must hold 1 to the model's context tokens."""
    most = self.context - (self.kind.frame is _frame_encoder)  # an encoder's row ends in [SEP]
    reqs = []
    for ctx, cont in requests:
      ctx, cont = [int(x) for x in ctx], [int(x) for x in cont]
      if not 1 <= len(cont) <= most:
        raise ValueError(
          f"a continuation of {len(cont)} tokens: allowed 1..{most} (the model's context, "
          "model.max_len, less an encoder's [SEP])"
        )
      reqs.append((ctx or [self.prefix_token_id], cont))
    return self.kind.score(self, reqs) if reqs else []

  def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
    """Each text's log-likelihood as `python -m eval.score` computes it (eval/scoring.py's
    `score_text`): a decoder's exact one in windows of its context with `stride`, a
    diffusion model's ELBO over `mc_samples` draws; other families are refused there."""
    scorer = scoring.scorer_of(self.config)
    options = {"stride": self.stride, "mc_samples": self.mc_samples, "seed": self.seed}
    progress, total = scoring.progress_printer("loglikelihood_rolling texts"), len(texts)
    out = []
    for text in texts:
      score = scoring.score_text(
        self.config,
        self.model,
        self.params,
        self.tokenizer,
        text,
        batch_size=self.batch_size,
        **{name: options[name] for name in scorer.options},
      )
      out.append(score.loglikelihood)
      progress(len(out), total)
    return out

  def generate_until(self, requests: Sequence[tuple[str, dict]]) -> list[str]:
    """lm_eval's (context, gen_kwargs) -> the generated text, cut before the first `until`
    string (and at the model's stop ids): greedy unless do_sample, at most max_gen_toks
    tokens. Decoders: decoding.generate; encoder-decoders: decoding.seq2seq_generate;
    diffusion: diffusion.llada_sample. Decoders and encoder-decoders also take gen_kwargs
    regex, json_schema (a file) or choices (a list, or commas), built by eval/constrain.py
    into the automaton the decoding loop follows (the text is then its tokens' bytes, what
    the regex matched). An encoder generates no text."""
    kind = self.kind
    if kind.generate is None:
      raise ValueError(
        f"model.family={self.family!r}: an MLM generates no text; generate_until needs a "
        "decoder, encdec or diffusion workdir"
      )
    reqs, built = [], {}
    for context, gen_kwargs in requests:
      ids = self.encode(context) if context else [self.prefix_token_id]
      g = generation_of(gen_kwargs, kind.gen_options, self.family)
      reqs.append((ids, g, g.constraint(self, built)))  # constraints refused before any work
    out = []
    stops = self.specials.stop_ids
    for new_N, (_, g, constraint) in zip(
      kind.generate(self, reqs) if reqs else [], reqs, strict=True
    ):
      text = (
        decoding.text_of(self.tokenizer, new_N)
        if constraint is None
        else constraint.text(new_N, stops)
      )
      out.append(g.cut(text))
    return out
