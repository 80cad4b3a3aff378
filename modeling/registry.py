"""The one place that maps `config.model.family` and `config.task.name` to a model
(its mask and head) and an objective, and says how pretraining documents are framed."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from eval import decoding
from modeling import diffusion
from modeling.layers import GATED
from modeling.transformer import EncoderDecoder, Transformer, TransformerConfig
from train import data, objectives
from train.data import labeled, seq2seq
from train.data.tokenizers import CLS_ID, EOS_ID, SEP_ID


def _packed_train(config, tokenizer, fam, **kw):
  frame = (fam.doc_prefix, fam.doc_suffix)
  return data.train_iterator(config.data, tokenizer, frame=frame, **kw)


def _packed_eval(config, tokenizer, fam, **kw):
  return data.eval_batches(config.data, tokenizer, frame=(fam.doc_prefix, fam.doc_suffix), **kw)


def _labeled_task(head: str, objective, load: Callable, summarize: Callable) -> Task:
  """A fine-tuning task on examples `load(config, tokenizer, split)` gives as row arrays."""

  def train_data(config, tokenizer, fam, **kw):
    return labeled.labeled_train_iterator(load(config, tokenizer, "train"), **kw)

  def eval_data(config, tokenizer, fam, **kw):
    split = "all" if config.data.eval_name else "validation"
    return labeled.labeled_eval_batches(load(config, tokenizer, split), **kw)

  return Task(head, objective, train_data, eval_data, summarize)


@dataclasses.dataclass(frozen=True)
class Task:
  head: str  # TransformerConfig.head
  objective: Callable[[ml_collections.ConfigDict, int], objectives.Objective]  # (config, vocab)
  train_data: Callable = _packed_train  # (config, tokenizer, family, **kw) -> iterator
  eval_data: Callable = _packed_eval  # (config, tokenizer, family, **kw) -> batches
  summarize: Callable = objectives.summarize_lm  # (sums, rows, byte_level) -> metrics
  # (config, model, params, tokenizer) -> metrics of decoded text, added to each evaluation
  decode_metrics: Callable | None = None
  # config -> {batch key: row length}: the int32 [batch, length] arrays of a training batch
  # (ahead-of-time compiles build the batch from it); None: labeled rows, not described
  batch_lengths: Callable | None = None


def packed_lengths(config) -> dict[str, int]:
  """A packed batch: tokens, positions and segment ids of `data.seq_len`."""
  return {k: config.data.seq_len for k in ("tokens", "positions", "segment_ids")}


def seq2seq_lengths(config) -> dict[str, int]:
  """An encoder-decoder batch: the packed source plus the targets' three arrays."""
  length = seq2seq.target_len(config)
  targets = {k: length for k in ("targets", "targets_positions", "targets_segment_ids")}
  return {**packed_lengths(config), **targets}


def _span_rows(config, tokenizer):
  return seq2seq.span_rows_fn(config, tokenizer.vocab_size)


def _span_train(config, tokenizer, fam, **kw):
  return _packed_train(config, tokenizer, fam, rows_fn=_span_rows(config, tokenizer), **kw)


def _span_eval(config, tokenizer, fam, **kw):
  return _packed_eval(config, tokenizer, fam, rows_fn=_span_rows(config, tokenizer), **kw)


def _seq2seq_train(config, tokenizer, fam, **kw):
  return seq2seq.seq2seq_train_iterator(config, tokenizer, **kw)


def _seq2seq_eval(config, tokenizer, fam, **kw):
  return seq2seq.seq2seq_eval_batches(config, tokenizer, **kw)


def decode_eval_metrics(config, model, params, tokenizer) -> dict[str, float]:
  """Exact match, ROUGE and BLEU of each evaluation source's first `task.eval_decode`
  examples, decoded greedily (or with `task.beam_size` beams) up to `data.target_len`
  tokens: over all of them, and for a mixture also per source (`eval/<metric>/<source>`)."""
  from eval.metrics import text_metrics

  t = config.task
  if not t.eval_decode:
    return {}
  per_source = seq2seq.decode_sources(config, tokenizer, t.eval_decode)
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


def _sample_ar(config, model, params, tokenizer, prompt, num_tokens, rng, **opts):
  del config
  text = decoding.complete(model, params, tokenizer, prompt, num_tokens, rng, **opts)
  return text, num_tokens  # a prefill, then one call per further token


def _sample_diffusion(config, model, params, tokenizer, prompt, num_tokens, rng, **opts):
  schedule = diffusion.make_schedule(config.task.schedule, config.task.schedule_exponent)
  return diffusion.complete(
    model, params, tokenizer, prompt, num_tokens, rng, schedule=schedule, **opts
  )


def _sample_seq2seq(config, model, params, tokenizer, prompt, num_tokens, rng, **opts):
  """The prompt is the encoder's input; the text returned is the decoder's output."""
  del config
  ids = tokenizer.encode(prompt)
  if ids.size == 0:
    raise ValueError("--prompt must be non-empty: it is the encoder's input")
  src = np.concatenate([ids, [EOS_ID]])[None].astype(np.int32)
  out = decoding.seq2seq_generate(model, params, src, num_tokens, rng, **opts)[0]
  text = decoding.text_of(tokenizer, out)
  return text, 1 + int(np.count_nonzero(out))  # the encoder and first step, then one per token


@dataclasses.dataclass(frozen=True)
class Family:
  mask_kind: str
  tasks: dict[str, Task]
  autoregressive: bool  # can be sampled token by token with a KV cache
  doc_prefix: tuple[int, ...]  # token ids before each pretraining document
  doc_suffix: tuple[int, ...]  # and after it
  # (config, model, params, tokenizer, prompt, num_tokens, rng, **options) -> (text, network
  # calls); None: the family does not generate text
  sample: Callable | None = None
  sample_options: tuple[str, ...] = ()  # the eval.sample flags its sampler reads
  model: type = Transformer  # the flax module: one stack, or encoder + decoder
  sentinels: bool = False  # task.num_sentinels ids follow the tokenizer's vocabulary (T5)


ENCODER_TASKS = {
  "pretrain": Task("mlm", objectives.make_mlm),
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
    {"pretrain": Task("lm", lambda config, vocab: objectives.causal_lm)},
    autoregressive=True,
    doc_prefix=(),
    doc_suffix=(EOS_ID,),
    sample=_sample_ar,
    sample_options=("temperature", "top_k", "top_p"),
  ),
  "encoder": Family(
    "bidirectional",
    ENCODER_TASKS,
    autoregressive=False,
    doc_prefix=(CLS_ID,),
    doc_suffix=(SEP_ID,),
  ),
  # T5: a bidirectional encoder and a causal decoder with cross-attention; pretraining is
  # span corruption (in the data pipeline), fine-tuning text-to-text, both teacher-forced.
  "encdec": Family(
    "bidirectional",
    {
      "pretrain": Task(
        "lm", objectives.make_seq2seq, _span_train, _span_eval, batch_lengths=seq2seq_lengths
      ),
      "seq2seq": Task(
        "lm",
        objectives.make_seq2seq,
        _seq2seq_train,
        _seq2seq_eval,
        decode_metrics=decode_eval_metrics,
        batch_lengths=seq2seq_lengths,
      ),
    },
    autoregressive=True,
    doc_prefix=(),
    doc_suffix=(EOS_ID,),
    sample=_sample_seq2seq,
    sample_options=("temperature", "top_k", "top_p", "beam_size", "length_penalty"),
    model=EncoderDecoder,
    sentinels=True,
  ),
  # masked diffusion (MDLM / MD4 / LLaDA): the encoder's bidirectional stack with an LM head,
  # trained on the NELBO, sampled by unmasking (modeling/diffusion.py)
  "diffusion": Family(
    "bidirectional",
    {"pretrain": Task("lm", objectives.make_diffusion, summarize=objectives.summarize_diffusion)},
    autoregressive=False,
    doc_prefix=(),
    doc_suffix=(EOS_ID,),
    sample=_sample_diffusion,
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
  ),
}


def target_len(config: ml_collections.ConfigDict) -> int:
  """The decoder's length of an encoder-decoder, 0 for the one-stack families."""
  return seq2seq.target_len(config) if family(config).model is EncoderDecoder else 0


def batch_lengths(config: ml_collections.ConfigDict) -> dict[str, int]:
  """{key: row length} of the task's training batches (packed, unless the task says)."""
  t = task(config)
  if t.batch_lengths is None and t.train_data is not _packed_train:
    raise ValueError(
      f"task.name={config.task.name!r}: its labeled batches are not described for "
      "ahead-of-time compiles; compile the pretraining task"
    )
  return (t.batch_lengths or packed_lengths)(config)


def family(config: ml_collections.ConfigDict) -> Family:
  name = config.model.family
  if name not in FAMILIES:
    raise ValueError(f"model.family={name!r}: allowed {sorted(FAMILIES)}")
  return FAMILIES[name]


def task(config: ml_collections.ConfigDict) -> Task:
  tasks = family(config).tasks
  if config.task.name not in tasks:
    raise ValueError(
      f"task.name={config.task.name!r}: model.family={config.model.family!r} allows {sorted(tasks)}"
    )
  return tasks[config.task.name]


def num_labels(config: ml_collections.ConfigDict) -> int:
  """Outputs of the task head: one for regression, the tags for NER, else task.num_labels."""
  if config.task.name == "regress":
    return 1
  if config.task.name == "ner":
    return len(labeled.tag_names(config))
  return config.task.num_labels


def transformer_config(config: ml_collections.ConfigDict, vocab_size: int) -> TransformerConfig:
  """The frozen model config; layers see only this, never the whole config."""
  m = config.model
  fam = family(config)
  return TransformerConfig(
    vocab_size=m.vocab_size or vocab_size + (config.task.num_sentinels if fam.sentinels else 0),
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads,
    d_model=m.d_model,
    d_ff=m.d_ff,
    head_dim=m.head_dim or m.d_model // m.num_heads,
    max_len=m.max_len or config.data.seq_len,
    mask_kind=fam.mask_kind,
    position=m.position,
    rope_theta=m.rope_theta,
    norm=m.norm,
    norm_eps=m.norm_eps,
    mlp=m.mlp,
    use_bias=m.use_bias,
    tie_embeddings=m.tie_embeddings,
    dropout=m.dropout,
    sliding_window=m.sliding_window,
    attention_impl=m.attention_impl,
    dtype=m.dtype,
    scan_layers=m.scan_layers,
    remat=m.remat,
    norm_position=m.norm_position,
    type_vocab_size=m.type_vocab_size,
    embed_dim=m.embed_dim,
    share_layers=m.share_layers,
    head=task(config).head,
    num_labels=num_labels(config),
    pooling=config.task.pooling,
    time_conditioning=m.time_conditioning,
    quant=m.quant,
    num_decoder_layers=(m.num_decoder_layers or m.num_layers) if fam.model is EncoderDecoder else 0,
    rel_buckets=m.rel_buckets,
    rel_max_distance=m.rel_max_distance,
    neighbor_mix=m.neighbor_mix,
  )


def build(
  config: ml_collections.ConfigDict, vocab_size: int
) -> tuple[nn.Module, objectives.Objective]:
  """(model, objective) for the configured family and task."""
  model = family(config).model(transformer_config(config, vocab_size))
  return model, task(config).objective(config, vocab_size)


def matmul_params(cfg: TransformerConfig) -> int:
  """Weights that take part in a matmul per token (the N of 6N).

  Embedding lookups are not matmuls; the output head is, tied or not. Shared layers
  (ALBERT) count once per application, since each application is a matmul. An
  encoder-decoder (`num_decoder_layers` > 0) adds its decoder blocks, each with a second
  (cross-)attention (`flops_per_token` weighs them by the target length).
  """
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  e = cfg.embed_dim or d
  attn = d * h * k * 2 + d * g * k * 2
  mlp = d * f * (3 if cfg.mlp in GATED else 2)
  head = {"lm": d * cfg.vocab_size, "mlm": d * e + e * cfg.vocab_size}.get(cfg.head, 0)
  proj = d * e if e != d else 0
  decoder = cfg.num_decoder_layers * (2 * attn + mlp)
  return cfg.num_layers * (attn + mlp) + decoder + head + proj


def flops_per_token(cfg: TransformerConfig, seq_len: int, target_len: int = 0) -> float:
  """Training FLOPs per (source) token: 6N + 12 * layers * heads * head_dim * seq_len (PaLM,
  nanoGPT). An encoder-decoder counts per source token, its decoder running on
  `target_len` targets (0: as many as sources): decoder blocks, cross-attention queries
  and the head scale by target_len / seq_len, cross-attention keys and values do not."""
  h, k = cfg.num_heads, cfg.head_dim
  if not cfg.num_decoder_layers:
    return 6 * matmul_params(cfg) + 12 * cfg.num_layers * h * k * seq_len
  r = (target_len or seq_len) / seq_len
  d, g = cfg.d_model, cfg.num_kv_heads
  q_o, kv = d * h * k * 2, d * g * k * 2
  mlp = d * cfg.d_ff * (3 if cfg.mlp in GATED else 2)
  encoder = cfg.num_layers * (q_o + kv + mlp)
  decoder = cfg.num_decoder_layers * (r * (q_o + kv + q_o + mlp) + kv)
  scores = cfg.num_layers * seq_len + cfg.num_decoder_layers * r * (r * seq_len + seq_len)
  return 6 * (encoder + decoder + r * d * cfg.vocab_size) + 12 * h * k * scores
