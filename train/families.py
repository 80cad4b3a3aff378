"""The one table that maps `model.family` and `task.name` to a model (its mask and head),
an objective, its data and its evaluation; `resolve(config)` reads it once per command.

Read top to bottom: the dataclasses, the data adapters and samplers they point to, the
table, then what a resolved `Wiring` builds (the frozen model config, the model and its
objective, batch shapes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modeling import decoding, diffusion
from modeling.lora import Lora
from modeling.mla import Mla
from modeling.moe import Moe
from modeling.rope import Rope
from modeling.transformer import EncoderDecoder, Transformer, TransformerConfig
from modeling.vocab import Specials
from train import distill, objectives, preference
from train.data import chat, labeled, pipeline, seq2seq, sources
from train.step import Trainable
from train.text_metrics import text_metrics

# A pretraining document is framed by (prefix ids, suffix ids) before packing; a task's
# frame is a function of the tokenizer's special ids.
Frame = pipeline.Frame
END_OF_DOCUMENT = pipeline.document_frame  # [BOS when the tokenizer adds one] ... EOS


cls_sep = pipeline.cls_sep  # an encoder's text: [CLS] ... [SEP]


# ---- packed documents, the data of every pretraining task


def packed_lengths(config) -> dict[str, int]:
  """A packed batch: tokens, positions and segment ids of `data.seq_len`."""
  return {k: config.data.seq_len for k in ("tokens", "positions", "segment_ids")}


def packed_train(config, tokenizer, frame: Frame, **kw):
  return pipeline.train_iterator(config.data, tokenizer, frame=frame, **kw)


def packed_eval(config, tokenizer, frame: Frame, **kw):
  return pipeline.eval_batches(config.data, tokenizer, frame=frame, **kw)


@dataclasses.dataclass(frozen=True)
class Task:
  head: str  # TransformerConfig.head
  # (task config, vocab size, special ids) -> the objective (train/objectives.py)
  objective: Callable[[ml_collections.ConfigDict, int, Specials], objectives.Objective]
  # (config, tokenizer, frame, **kw) -> training batches / evaluation batches
  train_data: Callable = packed_train
  eval_data: Callable = packed_eval
  summarize: Callable = objectives.summarize_lm  # (sums, rows, config, byte_level) -> metrics
  # (config, model, params, tokenizer) -> metrics of decoded text, added to each evaluation
  decode_metrics: Callable | None = None
  # config -> {batch key: row length}: the int32 [batch, length] arrays of a training batch
  # (ahead-of-time compiles build the batch from it); None: labeled rows, not described
  batch_lengths: Callable | None = packed_lengths
  # special ids -> how packed pretraining documents are framed
  frame: Callable[[Specials], Frame] = END_OF_DOCUMENT
  # a fourfold tokenizer gets the chat template's tokens as rows after its vocabulary
  template_rows: bool = False
  # compares the policy with a reference model (DPO): `task.reference` says which
  reference: bool = False
  # (config, model, initial params, tokenizer, to_global) -> (train data kwargs, eval data
  # kwargs): work done once on the initial weights before the data is read (DPO's
  # precomputed reference log-probs); None: nothing
  prepare: Callable | None = None
  # distills `task.teacher`'s frozen model into this one: `Wiring.build` wraps the objective
  # (train/distill.py) and the state keeps the teacher's weights as its `reference`
  teacher: bool = False

  def prepare_data(self, config, model, params, tokenizer, to_global) -> tuple[dict, dict]:
    """(training data kwargs, evaluation data kwargs) from `prepare`, or nothing."""
    if self.prepare is None:
      return {}, {}
    return self.prepare(config, model, params, tokenizer, to_global)

  def train_iterator(self, config, tokenizer, **kw):
    """The task's training batches (process-local rows)."""
    return self.train_data(config, tokenizer, self.frame(tokenizer.specials), **kw)

  def eval_batches(self, config, tokenizer, **kw):
    """The task's evaluation batches (process-local rows)."""
    return self.eval_data(config, tokenizer, self.frame(tokenizer.specials), **kw)


class Sampled(NamedTuple):
  """What a sampler made of one prompt."""

  text: str  # the generated text alone
  calls: int  # network calls
  before: str = ""  # the text shown before it: the prompt it continues
  after: str = ""  # and after it: a diffusion infill's clamped suffix
  accepted: bool | None = None  # whether a constraint accepts `text` (None: no constraint)


@dataclasses.dataclass(frozen=True)
class Family:
  mask_kind: str
  tasks: dict[str, Task]
  autoregressive: bool  # can be sampled token by token with a KV cache
  # (config, model, params, tokenizer, prompt, num_tokens, rng, *, constraint=None,
  # **options) -> Sampled; None: the family does not generate text. `constraint` is an
  # eval.constrain.Constraint (its device automaton, `.text` and `.accepts`)
  sampler: Callable | None = None
  # the eval.sample flags its sampler reads (regex, json_schema, choices reach it as one
  # `constraint`, which eval.sample builds)
  sample_options: tuple[str, ...] = ()
  model: type = Transformer  # the flax module: one stack, or encoder + decoder
  sentinels: bool = False  # task.num_sentinels ids follow the tokenizer's vocabulary (T5)
  # what eval.score reports for a text: "exact" (the chain rule, token by token), "bound"
  # (a Monte Carlo ELBO); None: the family models no distribution over texts
  likelihood: str | None = None

  @property
  def sample(self) -> Callable | None:
    """The sampler as a console shows it: (same arguments) -> (the generated text with the
    prompt it continues and any suffix around it, network calls); None without one."""
    if self.sampler is None:
      return None

    def shown(*args, **kw) -> tuple[str, int]:
      s = self.sampler(*args, **kw)
      return s.before + s.text + s.after, s.calls

    return shown


# ---- the other data adapters: (config, tokenizer, frame, **kw) -> batches


def seq2seq_lengths(config) -> dict[str, int]:
  """An encoder-decoder batch: the packed source plus the targets' three arrays."""
  length = seq2seq.target_len(config)
  targets = {k: length for k in ("targets", "targets_positions", "targets_segment_ids")}
  return {**packed_lengths(config), **targets}


def _span_train(config, tokenizer, frame: Frame, **kw):
  rows_fn = seq2seq.span_rows_fn(config, tokenizer.vocab_size, tokenizer.specials)
  return packed_train(config, tokenizer, frame, rows_fn=rows_fn, **kw)


def _span_eval(config, tokenizer, frame: Frame, **kw):
  rows_fn = seq2seq.span_rows_fn(config, tokenizer.vocab_size, tokenizer.specials)
  return packed_eval(config, tokenizer, frame, rows_fn=rows_fn, **kw)


def _seq2seq_train(config, tokenizer, frame: Frame, **kw):
  """Examples bring their own framing (the source and target each end at EOS)."""
  return seq2seq.seq2seq_train_iterator(config, tokenizer, **kw)


def _seq2seq_eval(config, tokenizer, frame: Frame, **kw):
  return seq2seq.seq2seq_eval_batches(config, tokenizer, **kw)


def _labeled_task(head: str, objective, load: Callable, summarize: Callable) -> Task:
  """A fine-tuning task on examples `load(config, tokenizer, split)` gives as row arrays
  (each row framed [CLS] ... [SEP] by the loader)."""

  def train_data(config, tokenizer, frame: Frame, **kw):
    rows = load(config, tokenizer, "train")
    return labeled.labeled_train_iterator(rows, shards=config.data.shards, **kw)

  def eval_data(config, tokenizer, frame: Frame, **kw):
    return labeled.labeled_eval_batches(load(config, tokenizer, sources.eval_split(config)), **kw)

  return Task(head, objective, train_data, eval_data, summarize, batch_lengths=None, frame=cls_sep)


def decode_eval_metrics(config, model, params, tokenizer, pair_sets=None) -> dict[str, float]:
  """Exact match, ROUGE and BLEU of each evaluation source's first `task.eval_decode`
  examples, decoded greedily (or with `task.beam_size` beams) up to `data.target_len`
  tokens: over all of them, and for a mixture also per source (`eval/<metric>/<source>`).
  `pair_sets`: the text pairs decoded, in place of the config's sources."""
  t = config.task
  if not t.eval_decode:
    return {}
  per_source = seq2seq.decode_sources(config, tokenizer, t.eval_decode, pair_sets)
  preds = decoding.seq2seq_texts(
    model,
    params,
    tokenizer,
    [ids for _, source_ids, _, _ in per_source for ids in source_ids],
    seq2seq.target_len(config),
    jax.random.PRNGKey(config.seed),
    batch_size=config.train.eval_batch_size or config.train.batch_size,
    src_len=config.data.seq_len,
    temperature=0.0,
    beam_size=t.beam_size,
    length_penalty=t.length_penalty,
  )
  refs = [r for _, _, _, source_refs in per_source for r in source_refs]
  out = text_metrics(preds, refs)
  if len(per_source) > 1:
    start = 0
    for label, _, _, source_refs in per_source:
      n = len(source_refs)
      for key, value in text_metrics(preds[start : start + n], source_refs).items():
        out[f"{key}/{label}"] = value
      start += n
  return out


# ---- supervised fine-tuning on conversations (train/data/chat.py)


def _sft_train(config, tokenizer, frame: Frame, **kw):
  return chat.sft_train_iterator(config, tokenizer, **kw)


def _sft_eval(config, tokenizer, frame: Frame, **kw):
  return chat.sft_eval_batches(config, tokenizer, **kw)


def sft_decode_metrics(config, model, params, tokenizer) -> dict[str, float]:
  """Exact match, ROUGE and BLEU of the first `task.eval_decode` evaluation conversations'
  last assistant turn, decoded greedily after the conversation up to that turn's header and
  stopped at the template's end of turn, for as many tokens as the reference plus the end
  token (an exact match must stop there)."""
  t = config.task
  if not t.eval_decode:
    return {}
  prompts, refs = chat.decode_prompts(config, tokenizer, t.eval_decode)
  ids = chat.token_ids(t.template, tokenizer)
  stops = chat.answer_stops(t.template, tokenizer, ids)
  room = [config.data.seq_len - p.size for p in prompts]
  need = [min(tokenizer.encode(r).size + 1, n) for r, n in zip(refs, room, strict=True)]
  answers = decoding.greedy_answers(model, params, prompts, need, stops)
  preds = [tokenizer.decode(a) for a in answers]
  return text_metrics([p.strip() for p in preds], [r.strip() for r in refs])


def _chat_pairs(config, split: str) -> chat.ChatPairs:
  return chat.ChatPairs(config, split if split == "train" else sources.eval_split(config))


def _sft_seq2seq_train(config, tokenizer, frame: Frame, **kw):
  pairs = [(_chat_pairs(config, "train"), 1.0)]
  return seq2seq.seq2seq_train_iterator(config, tokenizer, pair_sources=pairs, **kw)


def _sft_seq2seq_eval(config, tokenizer, frame: Frame, **kw):
  pairs = [_chat_pairs(config, "validation")]
  return seq2seq.seq2seq_eval_batches(config, tokenizer, pair_sets=pairs, **kw)


def _sft_seq2seq_decode(config, model, params, tokenizer) -> dict[str, float]:
  pairs = [_chat_pairs(config, "validation")]
  return decode_eval_metrics(config, model, params, tokenizer, pairs)


# ---- preference optimization: one (chosen, rejected) pair per row


def _dpo_rows(config, tokenizer, split: str, reference_logps=None) -> dict[str, np.ndarray]:
  rows = chat.preference_rows(config, tokenizer, split)
  if reference_logps is not None:  # task.reference=precomputed: [pairs, 2] from the trainer
    rows["ref_logps"] = np.asarray(reference_logps, np.float32)
  return rows


def _dpo_train(config, tokenizer, frame: Frame, reference_logps=None, **kw):
  rows = _dpo_rows(config, tokenizer, "train", reference_logps)
  return labeled.labeled_train_iterator(rows, shards=config.data.shards, **kw)


def _dpo_eval(config, tokenizer, frame: Frame, reference_logps=None, **kw):
  rows = _dpo_rows(config, tokenizer, sources.eval_split(config), reference_logps)
  return labeled.labeled_eval_batches(rows, **kw)


def _dpo_prepare(config, model, params, tokenizer, to_global) -> tuple[dict, dict]:
  """task.reference=precomputed: the initial model's (chosen, rejected) log-probs of every
  training and evaluation pair, computed once, as the data adapters' `reference_logps`
  ([pairs, 2] in row order). Every process computes all rows (each feeds its part of each
  global batch); the result is the same everywhere."""
  t = config.task
  if t.reference != "precomputed" or t.loss in preference.REFERENCE_FREE:
    return {}, {}

  @jax.jit
  def logps(params, batch):
    c, r, _, _ = objectives.pair_logps(model, params, batch, jax.random.PRNGKey(0), True)
    return jnp.stack([c, r], axis=-1)

  n_proc = jax.process_count()
  rows_per_batch = (config.train.eval_batch_size or config.train.batch_size) // n_proc
  out = []
  for split in ("train", sources.eval_split(config)):
    rows = chat.preference_rows(config, tokenizer, split)
    batches = labeled.labeled_eval_batches(
      rows, batch_size=rows_per_batch, process_index=jax.process_index(), process_count=n_proc
    )
    values = [np.asarray(jax.device_get(logps(params, to_global(b)))) for b in batches]
    out.append({"reference_logps": np.concatenate(values)[: len(rows["weight"])]})
    what = "training" if split == "train" else "evaluation"
    print(f"task.reference=precomputed: {len(rows['weight'])} {what} pairs scored", flush=True)
  return out[0], out[1]


def sft_lengths(config) -> dict[str, int]:
  """A packed SFT batch: the packed arrays plus the loss mask."""
  return {**packed_lengths(config), "loss_mask": config.data.seq_len}


# ---- samplers: (config, model, params, tokenizer, prompt, num_tokens, rng, *, constraint,
# **options) -> Sampled


def _sample_ar(
  config, model, params, tokenizer, prompt, num_tokens, rng, *, constraint=None, **opts
) -> Sampled:
  """The prompt is read as a document's start, and continued. `chat=True`: the prompt is one
  user turn in the run's `task.template`; the text is the assistant's answer, up to its end
  of turn."""
  if opts.pop("chat", False):
    template = config.task.template
    turn = [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]
    ids, _ = chat.prompt_and_answer(turn, template, tokenizer)
    stops, before = chat.answer_stops(template, tokenizer), ""
  else:
    ids, before = decoding.prompt_ids(tokenizer, prompt), prompt
    stops = tokenizer.specials.stop_ids
  automaton = None if constraint is None else constraint.automaton
  out = decoding.generate(
    model, params, ids[None], num_tokens, rng, eos_id=stops, automaton=automaton, **opts
  )[0]
  text, accepted = _generated(tokenizer, out, stops, constraint)
  return Sampled(text, num_tokens, before, "", accepted)  # a prefill, then a call per token


def _sample_diffusion(
  config, model, params, tokenizer, prompt, num_tokens, rng, *, constraint=None, **opts
) -> Sampled:
  if constraint is not None:
    raise ValueError(
      f"{constraint.source}: a diffusion model unmasks positions in any order, and a "
      "constraint's automaton reads text left to right; constrain a decoder or an encdec model"
    )
  schedule = diffusion.make_schedule(config.task.schedule, config.task.schedule_exponent)
  text, calls = diffusion.complete(
    model, params, tokenizer, prompt, num_tokens, rng, schedule=schedule, **opts
  )
  suffix = opts.get("suffix", "")  # complete's text is prompt + the span + suffix
  return Sampled(text[len(prompt) : len(text) - len(suffix)], calls, prompt, suffix)


def _sample_seq2seq(
  config, model, params, tokenizer, prompt, num_tokens, rng, *, constraint=None, **opts
) -> Sampled:
  """The prompt is the encoder's input (ended with EOS, as seq2seq sources are); the text
  is the decoder's output."""
  ids = tokenizer.encode(prompt)
  if ids.size == 0:
    raise ValueError("--prompt must be non-empty: it is the encoder's input")
  specials = tokenizer.specials
  src = np.concatenate([ids, [specials.require("eos", "an encoder's input")]])[None]
  automaton = None if constraint is None else constraint.automaton
  out = decoding.seq2seq_generate(
    model,
    params,
    src.astype(np.int32),
    num_tokens,
    rng,
    specials=specials,
    automaton=automaton,
    **opts,
  )[0]
  calls = 1 + int(np.count_nonzero(out))  # the encoder and first step, then one per token
  text, accepted = _generated(tokenizer, out, specials.stop_ids, constraint)
  return Sampled(text, calls, "", "", accepted)


def _generated(tokenizer, out_N, stops, constraint) -> tuple[str, bool | None]:
  """The text of generated ids up to the first stop id, and whether the constraint accepts
  them (None without one). A constraint's text is its tokens' bytes joined: what its regex
  matched (a SentencePiece decode would drop a leading space)."""
  if constraint is None:
    return decoding.text_of(tokenizer, out_N, stops), None
  return constraint.text(out_N, stops), constraint.accepts(out_N, stops)


# ---- distillation: a family's pretraining task, with a teacher (train/distill.py)


def distilled(pretrain: Task) -> Task:
  """The family's pretraining data and objective, distilled from `task.teacher`; evaluation
  reports the student's own metrics and the distillation terms."""
  return dataclasses.replace(
    pretrain, summarize=distill.summarize(pretrain.summarize), teacher=True
  )


# ---- the table

# eval.sample's constraint flags (eval/constrain.py builds the `constraint` from them): the
# left-to-right samplers read them; diffusion's unmask in any order and cannot
CONSTRAINT_OPTIONS = ("regex", "json_schema", "choices")

ENCODER_TASKS = {
  "pretrain": Task("mlm", objectives.make_mlm, frame=cls_sep),
  "distill": distilled(Task("mlm", objectives.make_mlm, frame=cls_sep)),
  "classify": _labeled_task(
    "classify",
    objectives.make_classify,
    functools.partial(labeled.load_labeled, regression=False),
    objectives.summarize_classify,
  ),
  "regress": _labeled_task(
    "classify",
    objectives.make_regress,
    functools.partial(labeled.load_labeled, regression=True),
    objectives.summarize_regress,
  ),
  "ner": _labeled_task(
    "tokens", objectives.make_ner, labeled.load_tagged, objectives.summarize_ner
  ),
  "embed": _labeled_task(
    "pool", objectives.make_embed, labeled.load_pairs, objectives.summarize_embed
  ),
}
FAMILIES: dict[str, Family] = {
  "decoder": Family(
    "causal",
    {
      "pretrain": Task("lm", objectives.make_causal_lm),
      "distill": distilled(Task("lm", objectives.make_causal_lm)),
      "dpo": Task(
        "lm",
        objectives.make_dpo,
        _dpo_train,
        _dpo_eval,
        summarize=objectives.summarize_dpo,
        batch_lengths=None,
        template_rows=True,
        reference=True,
        prepare=_dpo_prepare,
      ),
      "sft": Task(
        "lm",
        objectives.make_sft,
        _sft_train,
        _sft_eval,
        decode_metrics=sft_decode_metrics,
        batch_lengths=sft_lengths,
        template_rows=True,
      ),
    },
    autoregressive=True,
    sampler=_sample_ar,
    sample_options=(
      "temperature",
      "top_k",
      "top_p",
      "beam_size",
      "length_penalty",
      "chat",
      *CONSTRAINT_OPTIONS,
    ),
    likelihood="exact",
  ),
  "encoder": Family("bidirectional", ENCODER_TASKS, autoregressive=False),
  # T5: a bidirectional encoder and a causal decoder with cross-attention; pretraining is
  # span corruption (in the data pipeline), fine-tuning text-to-text, both teacher-forced.
  "encdec": Family(
    "bidirectional",
    {
      "pretrain": Task(
        "lm", objectives.make_seq2seq, _span_train, _span_eval, batch_lengths=seq2seq_lengths
      ),
      "distill": distilled(
        Task("lm", objectives.make_seq2seq, _span_train, _span_eval, batch_lengths=seq2seq_lengths)
      ),
      "seq2seq": Task(
        "lm",
        objectives.make_seq2seq,
        _seq2seq_train,
        _seq2seq_eval,
        decode_metrics=decode_eval_metrics,
        batch_lengths=seq2seq_lengths,
      ),
      "sft": Task(
        "lm",
        objectives.make_seq2seq,
        _sft_seq2seq_train,
        _sft_seq2seq_eval,
        decode_metrics=_sft_seq2seq_decode,
        batch_lengths=seq2seq_lengths,
      ),
    },
    autoregressive=True,
    sampler=_sample_seq2seq,
    sample_options=(
      "temperature",
      "top_k",
      "top_p",
      "beam_size",
      "length_penalty",
      *CONSTRAINT_OPTIONS,
    ),
    model=EncoderDecoder,
    sentinels=True,
  ),
  # masked diffusion (MDLM / MD4 / LLaDA): the encoder's bidirectional stack with an LM head,
  # trained on the NELBO, sampled by unmasking (modeling/diffusion.py)
  "diffusion": Family(
    "bidirectional",
    {
      "pretrain": Task("lm", objectives.make_diffusion, summarize=objectives.summarize_diffusion),
      "distill": distilled(
        Task("lm", objectives.make_diffusion, summarize=objectives.summarize_diffusion)
      ),
    },
    autoregressive=False,
    sampler=_sample_diffusion,
    sample_options=(
      "temperature",
      "top_p",
      "steps",
      "sampler",
      "block_length",
      "grid",
      "cache",
      "suffix",
      "remasking",
    ),
    likelihood="bound",
  ),
}
SAMPLE_OPTIONS = tuple(sorted({o for fam in FAMILIES.values() for o in fam.sample_options}))


# ---- a config's family and task, resolved once


def rope_of(m: ml_collections.ConfigDict) -> Rope:
  """The frozen RoPE settings of `config.model`."""
  r = m.rope_scaling
  return Rope(
    theta=m.rope_theta,
    fraction=m.rope_fraction,
    scaling=r.type,
    factor=r.factor,
    low_freq_factor=r.low_freq_factor,
    high_freq_factor=r.high_freq_factor,
    original_max_len=r.original_max_len,
    short_factor=tuple(float(x) for x in r.short_factor),
    long_factor=tuple(float(x) for x in r.long_factor),
    attention_factor=r.attention_factor,
    beta_fast=r.beta_fast,
    beta_slow=r.beta_slow,
    mscale=r.mscale,
    mscale_all_dim=r.mscale_all_dim,
  )


@dataclasses.dataclass(frozen=True)
class Wiring:
  """What `resolve(config)` found in the table; commands resolve once and pass it down."""

  family: Family
  task: Task

  def num_labels(self, config: ml_collections.ConfigDict) -> int:
    """Outputs of the task head: one for regression, the tags for NER, else task.num_labels."""
    if config.task.name == "regress":
      return 1
    if config.task.name == "ner":
      return len(labeled.tag_names(config))
    return config.task.num_labels

  def target_len(self, config: ml_collections.ConfigDict) -> int:
    """The decoder's length of an encoder-decoder, 0 for the one-stack families."""
    return seq2seq.target_len(config) if self.family.model is EncoderDecoder else 0

  def batch_lengths(self, config: ml_collections.ConfigDict) -> dict[str, int]:
    """{key: row length} of the task's training batches."""
    if self.task.batch_lengths is None:
      raise ValueError(
        f"task.name={config.task.name!r}: its labeled batches are not described for "
        "ahead-of-time compiles; compile the pretraining task"
      )
    return self.task.batch_lengths(config)

  def trainable(self, config: ml_collections.ConfigDict) -> Trainable:
    """Which weights train (LoRA's adapters or all) and what stays frozen beside them."""
    lo = config.model.lora
    return Trainable(
      adapters=lo.rank > 0,
      base_quant=lo.base_quant,
      base_dtype=lo.base_dtype,
      reference=self.task.reference and config.task.reference == "frozen",
    )

  def extra_rows(self, config: ml_collections.ConfigDict) -> int:
    """Rows after the tokenizer's vocabulary: T5's sentinels, a chat template's tokens."""
    rows = config.task.num_sentinels if self.family.sentinels else 0
    if self.task.template_rows and not config.data.tokenizer.startswith("hf:"):
      rows += len(chat.TEMPLATE_TOKENS[config.task.template])
    return rows

  def transformer_config(
    self, config: ml_collections.ConfigDict, vocab_size: int
  ) -> TransformerConfig:
    """The frozen model config; layers see only this, never the whole config."""
    m, fam = config.model, self.family
    return TransformerConfig(
      vocab_size=m.vocab_size or vocab_size + self.extra_rows(config),
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads,
      d_model=m.d_model,
      d_ff=m.d_ff,
      head_dim=m.head_dim or m.d_model // m.num_heads,
      max_len=m.max_len or config.data.seq_len,
      mask_kind=fam.mask_kind,
      position=m.position,
      rope=rope_of(m),
      position_offset=m.position_offset,
      norm=m.norm,
      norm_eps=m.norm_eps,
      mlp=m.mlp,
      gelu=m.gelu,
      scale_attention=m.scale_attention,
      use_bias=m.use_bias,
      tie_embeddings=m.tie_embeddings,
      dropout=m.dropout,
      sliding_window=m.sliding_window,
      attention_impl=m.attention_impl,
      dtype=m.dtype,
      scan_layers=m.scan_layers,
      remat=m.remat,
      norm_position=m.norm_position,
      block=m.block,
      embed_norm=m.embed_norm,
      type_vocab_size=m.type_vocab_size,
      embed_dim=m.embed_dim,
      share_layers=m.share_layers,
      head=self.task.head,
      num_labels=self.num_labels(config),
      pooling=config.task.pooling,
      time_conditioning=m.time_conditioning,
      quant=m.quant,
      num_decoder_layers=(m.num_decoder_layers or m.num_layers)
      if fam.model is EncoderDecoder
      else 0,
      rel_buckets=m.rel_buckets,
      rel_max_distance=m.rel_max_distance,
      neighbor_mix=m.neighbor_mix,
      lora=Lora(m.lora.rank, m.lora.alpha, m.lora.targets, m.lora.base_quant),
      moe=Moe(**{**m.moe.to_dict(), "expert_d_ff": m.moe.expert_d_ff or m.d_ff}),
      attention=m.attention,
      mla=Mla(**m.mla),
      position_buckets=m.position_buckets,
      max_relative_positions=m.max_relative_positions,
      emd_layers=m.emd_layers,
    )

  def build(
    self, config: ml_collections.ConfigDict, tokenizer
  ) -> tuple[nn.Module, objectives.Objective]:
    """(model, objective) for the configured family and task, sized for the tokenizer
    (`tokenizer.vocab_size`) and using its special ids (`tokenizer.specials`)."""
    model = self.family.model(self.transformer_config(config, tokenizer.vocab_size))
    objective = self.task.objective(config.task, tokenizer.vocab_size, tokenizer.specials)
    if self.task.teacher:
      teacher = self.teacher(config, model.cfg.vocab_size)
      cos = teacher.cfg.d_model == model.cfg.d_model
      objective = distill.make_distill(objective, teacher, config.task, cos)
    return model, objective

  def teacher(self, config: ml_collections.ConfigDict, vocab_size: int) -> nn.Module:
    """The frozen teacher of a distillation run: its own model, built from its saved config
    (`task.teacher`) with the student's vocabulary of `vocab_size` rows (the same tokenizer)."""
    saved = distill.run_config(config.task.teacher)
    wiring = resolve(saved)
    cfg = wiring.transformer_config(saved, vocab_size)
    return wiring.family.model(dataclasses.replace(cfg, vocab_size=vocab_size))


def resolve(config: ml_collections.ConfigDict) -> Wiring:
  """The config's family and task; an unknown name is refused naming its key."""
  name = config.model.family
  if name not in FAMILIES:
    raise ValueError(f"model.family={name!r}: allowed {sorted(FAMILIES)}")
  tasks = FAMILIES[name].tasks
  if config.task.name not in tasks:
    raise ValueError(
      f"task.name={config.task.name!r}: model.family={name!r} allows {sorted(tasks)}"
    )
  return Wiring(FAMILIES[name], tasks[config.task.name])
