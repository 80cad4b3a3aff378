"""The one place that maps `config.model.family` and `config.task.name` to a model
(its mask and head) and an objective, and says how pretraining documents are framed."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import ml_collections

from eval import decoding
from modeling import diffusion
from modeling.transformer import Transformer, TransformerConfig
from train import data, objectives
from train.data import labeled
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


def _sample_ar(config, model, params, tokenizer, prompt, num_tokens, rng, **opts):
  del config
  text = decoding.complete(model, params, tokenizer, prompt, num_tokens, rng, **opts)
  return text, num_tokens  # a prefill, then one call per further token


def _sample_diffusion(config, model, params, tokenizer, prompt, num_tokens, rng, **opts):
  schedule = diffusion.make_schedule(config.task.schedule, config.task.schedule_exponent)
  return diffusion.complete(
    model, params, tokenizer, prompt, num_tokens, rng, schedule=schedule, **opts
  )


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
  return TransformerConfig(
    vocab_size=m.vocab_size or vocab_size,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads,
    d_model=m.d_model,
    d_ff=m.d_ff,
    head_dim=m.head_dim or m.d_model // m.num_heads,
    max_len=m.max_len or config.data.seq_len,
    mask_kind=family(config).mask_kind,
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
  )


def build(
  config: ml_collections.ConfigDict, vocab_size: int
) -> tuple[nn.Module, objectives.Objective]:
  """(model, objective) for the configured family and task."""
  model = Transformer(transformer_config(config, vocab_size))
  return model, task(config).objective(config, vocab_size)


def matmul_params(cfg: TransformerConfig) -> int:
  """Weights that take part in a matmul per token (the N of 6N).

  Embedding lookups are not matmuls; the output head is, tied or not. Shared layers
  (ALBERT) count once per application, since each application is a matmul.
  """
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  e = cfg.embed_dim or d
  attn = d * h * k * 2 + d * g * k * 2
  mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
  head = {"lm": d * cfg.vocab_size, "mlm": d * e + e * cfg.vocab_size}.get(cfg.head, 0)
  proj = d * e if e != d else 0
  return cfg.num_layers * (attn + mlp) + head + proj


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12 * layers * heads * head_dim * seq_len (PaLM, nanoGPT)."""
  return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
