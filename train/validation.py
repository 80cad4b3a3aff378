"""Config validation, run before anything compiles.

Each error names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import ml_collections
import numpy as np
from etils import epath

from configs import base
from modeling import diffusion, lora
from modeling.attention import ATTENTION_IMPLS
from modeling.layers import GELUS, MLP_KINDS, NORMS
from modeling.moe import IMPLS as MOE_IMPLS
from modeling.quant import QUANT_KINDS, WARMUP_SHAPES
from modeling.rope import ROPE_SCALINGS
from modeling.transformer import (
  ATTENTIONS,
  BLOCKS,
  DTYPES,
  NORM_POSITIONS,
  POOLINGS,
  POSITIONS,
  REMAT_POLICIES,
  Transformer,
  TransformerConfig,
)
from modeling.vocab import FOURFOLD
from train import distill, families, objectives, preference, sharding
from train.data import chat, make_tokenizer, prepared, seq2seq, validate_source
from train.data.pipeline import check_shards
from train.data.sources import tfds_builder, tfds_dataset
from train.optim import SCHEDULES

# Each key's allowed values, defined once beside their implementation; configs/base.py's
# comment for the key lists the same values (tests/train/test_validation.py checks).
CHOICES = {
  "model.family": tuple(families.FAMILIES),
  "model.position": POSITIONS,
  "model.norm": NORMS,
  "model.mlp": MLP_KINDS,
  "model.attention_impl": ATTENTION_IMPLS,
  "model.dtype": tuple(DTYPES),
  "model.remat": tuple(REMAT_POLICIES),
  "model.quant": QUANT_KINDS,
  "model.norm_position": NORM_POSITIONS,
  "model.block": BLOCKS,
  "model.gelu": GELUS,
  "model.rope_scaling.type": ROPE_SCALINGS,
  "model.attention": ATTENTIONS,
  "task.pooling": POOLINGS,
  "task.schedule": diffusion.SCHEDULES,
  "task.estimator": diffusion.ESTIMATORS,
  "task.templates": seq2seq.TEMPLATE_STYLES,
  "task.template": chat.TEMPLATES,
  "task.loss": preference.LOSSES,
  "task.reference": objectives.REFERENCES,
  "task.distill_init": distill.INITS,
  "model.lora.base_quant": lora.BASE_QUANTS,
  "model.lora.base_dtype": ("float32", "bfloat16"),
  "model.moe.impl": MOE_IMPLS,
  "train.schedule": SCHEDULES,
  "train.quant_warmup_shape": WARMUP_SHAPES,
}
PROBABILITIES = (
  "task.mask_prob",
  "task.mask_token_prob",
  "task.random_token_prob",
  "train.cooldown_start",
  "task.noise_density",
)
POSITIVE = (
  "model.num_layers",
  "model.num_heads",
  "model.num_kv_heads",
  "model.d_model",
  "model.d_ff",
  "data.seq_len",
  "data.shards",
  "data.span_bytes",
  "train.steps",
  "train.batch_size",
  "train.grad_accum",
  "train.log_every",
  "task.eval_t_samples",
  "task.schedule_exponent",
  "task.mean_span_length",
  "task.num_sentinels",
  "task.beam_size",
  "model.rel_max_distance",
  "model.max_relative_positions",
  "model.lora.alpha",
  "task.beta",
  "model.mla.kv_lora_rank",
  "model.mla.qk_nope_head_dim",
  "model.mla.qk_rope_head_dim",
  "model.mla.v_head_dim",
  "task.distill_temperature",
)
NON_NEGATIVE = (
  "model.vocab_size",
  "model.neighbor_mix",
  "model.head_dim",
  "model.max_len",
  "model.sliding_window",
  "train.warmup_steps",
  "train.eval_every",
  "train.eval_steps",
  "train.eval_batch_size",
  "train.checkpoint_every",
  "train.num_samples",
  "train.sample_tokens",
  "train.learning_rate",
  "train.min_learning_rate",
  "train.weight_decay",
  "train.grad_clip",
  "model.dropout",
  "data.shuffle_window",
  "model.type_vocab_size",
  "model.embed_dim",
  "task.num_labels",
  "train.cooldown_learning_rate",
  "train.quant_warmup_steps",
  "data.target_len",
  "model.num_decoder_layers",
  "task.eval_decode",
  "task.length_penalty",
  "model.lora.rank",
  "task.simpo_gamma",
  "model.moe.num_experts",
  "model.moe.num_shared_experts",
  "model.moe.expert_d_ff",
  "model.moe.first_dense_layers",
  "model.moe.bias_update_rate",
  "model.moe.balance_loss",
  "model.mla.q_lora_rank",
  "model.rope_scaling.mscale",
  "model.rope_scaling.mscale_all_dim",
  "task.distill_kd_weight",
  "task.distill_task_weight",
  "task.distill_cos_weight",
)


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys |= _flat_keys(v, f"{prefix}{k}.")
    else:
      keys.add(f"{prefix}{k}")
  return keys


def get(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def fail(key: str, value, allowed: str) -> None:
  raise ValueError(f"{key}={value!r}: {allowed}")


def _validate_rope(m: ml_collections.ConfigDict, head_dim: int) -> None:
  r = m.rope_scaling
  rotary = int(head_dim * m.rope_fraction)
  if not 0 < m.rope_fraction <= 1 or rotary % 2:
    fail(
      "model.rope_fraction",
      m.rope_fraction,
      f"must be in (0, 1] and rotate an even number of the head's {head_dim} features",
    )
  if r.type in ("linear", "llama3", "yarn") and r.factor < 1:
    fail("model.rope_scaling.factor", r.factor, f"must be >= 1 with type={r.type!r}")
  if r.type in ("llama3", "longrope", "yarn") and r.original_max_len <= 0:
    fail(
      "model.rope_scaling.original_max_len", r.original_max_len, f"must be > 0 with type={r.type!r}"
    )
  if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
    fail(
      "model.rope_scaling.high_freq_factor",
      r.high_freq_factor,
      f"must be > low_freq_factor={r.low_freq_factor}",
    )
  if r.type == "yarn" and not 0 < r.beta_slow <= r.beta_fast:
    fail(
      "model.rope_scaling.beta_fast",
      r.beta_fast,
      f"must be >= beta_slow={r.beta_slow} > 0 (rotations within original_max_len)",
    )
  if r.type == "yarn" and r.attention_factor != 1.0:
    fail(
      "model.rope_scaling.attention_factor",
      r.attention_factor,
      "must be 1.0 with type='yarn', which derives cos and sin's factor from mscale and "
      "mscale_all_dim",
    )
  if r.type == "longrope":
    for key in ("short_factor", "long_factor"):
      if len(r[key]) != rotary // 2:
        fail(
          f"model.rope_scaling.{key}",
          r[key],
          f"needs rotary_dim / 2 = {rotary // 2} values (one per rotated frequency)",
        )


def _validate_mla(config: ml_collections.ConfigDict, wiring: families.Wiring) -> None:
  """MLA (modeling/mla.py): one Transformer stack with RoPE, the XLA attention path."""
  m = config.model
  if m.attention != "mla":
    if m.rope_scaling.mscale_all_dim:
      fail(
        "model.rope_scaling.mscale_all_dim",
        m.rope_scaling.mscale_all_dim,
        "must be 0 unless model.attention='mla' (DeepSeek scales MLA's softmax by it)",
      )
    return
  needs = {
    "model.position": ("rope", "MLA's decoupled key is rotary"),
    "model.rope_fraction": (1.0, "MLA rotates all qk_rope_head_dim features"),
    "model.attention_impl": ("xla", "MLA's value width differs from its query's"),
    "model.scale_attention": (True, "MLA scales by 1 / sqrt(qk_nope + qk_rope head dims)"),
    "model.lora.base_quant": ("none", "a quantized frozen base covers MHA's projections only"),
  }
  for key, (value, why) in needs.items():
    if get(config, key) != value:
      fail(key, get(config, key), f"must be {value!r} with model.attention='mla': {why}")
  if wiring.family.model is not Transformer:
    fail("model.attention", "mla", f"not supported with model.family={m.family!r}")
  if m.mla.qk_rope_head_dim % 2:
    fail("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim, "must be even (RoPE pairs)")


def _validate_specials(config, wiring: families.Wiring, tokenizer) -> None:
  """The special tokens the family and task frame and predict with, from data.tokenizer."""
  s, spec, fam = tokenizer.specials, config.data.tokenizer, config.model.family
  if fam == "diffusion" and s != FOURFOLD:
    fail(
      "data.tokenizer",
      spec,
      "model.family='diffusion' masks and stops with fourfold's ids 3 and 1: use 'byte' or "
      "an spm: model written by train.data.train_spm",
    )
  head = wiring.task.head
  needs = {"eos": "ending documents and generations"} if head == "lm" else {}
  if head == "mlm":
    needs = {"mask": "masked language modeling", "cls": "framing", "sep": "framing"}
  if head in ("classify", "tokens", "pool"):
    needs = {"cls": "framing examples", "sep": "framing examples"}
  if wiring.family.sentinels:
    needs["decoder_start"] = "an encoder-decoder's decoder"
  for name, why in needs.items():
    if getattr(s, name) is None:
      fail("data.tokenizer", spec, f"it has no {name} token, and {why} needs one")


def validate_config(config: ml_collections.ConfigDict) -> families.Wiring:
  """Raises ValueError on the first bad key; cheap, compiles nothing. Returns the config's
  family and task (`families.resolve`), for the caller to pass down."""
  unknown = sorted(_flat_keys(config) - _flat_keys(base.get_config()))
  if unknown:
    fail(
      unknown[0], get(config, unknown[0]), "unknown key; every key is declared in configs/base.py"
    )
  wiring = families.resolve(config)  # the family, then the task it allows
  fam = wiring.family
  for key, allowed in CHOICES.items():
    if get(config, key) not in allowed:
      fail(key, get(config, key), f"allowed {list(allowed)}")
  for key in POSITIVE:
    if get(config, key) <= 0:
      fail(key, get(config, key), "must be > 0")
  for key in NON_NEGATIVE:
    if get(config, key) < 0:
      fail(key, get(config, key), "must be >= 0")
  for key in PROBABILITIES:
    if not 0 <= get(config, key) <= 1:
      fail(key, get(config, key), "must be a probability in [0, 1]")
  if not 0 <= config.train.ema_decay < 1:
    fail("train.ema_decay", config.train.ema_decay, "must be in [0, 1); 0 turns the EMA off")
  if config.train.quant_warmup_steps and config.model.quant == "none":
    fail(
      "train.quant_warmup_steps",
      config.train.quant_warmup_steps,
      "blends float weights into quantized ones: set model.quant (bitnet158, bitnet1), or 0",
    )
  if config.train.quant_warmup_steps > config.train.steps:
    fail(
      "train.quant_warmup_steps",
      config.train.quant_warmup_steps,
      f"must be at most train.steps={config.train.steps}, so the run ends fully quantized",
    )
  if config.train.profile_steps < 0:
    fail("train.profile_steps", config.train.profile_steps, "must be >= 0; 0: no profile")
  if config.train.profile_steps and not 1 <= config.train.profile_start <= config.train.steps:
    fail(
      "train.profile_start",
      config.train.profile_start,
      f"must be a step of the run, 1 to train.steps={config.train.steps}",
    )
  task = config.task
  if task.mask_token_prob + task.random_token_prob > 1:
    fail(
      "task.random_token_prob",
      task.random_token_prob,
      f"task.mask_token_prob + task.random_token_prob must be <= 1 (mask_token_prob="
      f"{task.mask_token_prob})",
    )
  if task.name == "classify" and task.num_labels < 2:
    fail("task.num_labels", task.num_labels, "must be >= 2 with task.name='classify'")
  m, t = config.model, config.train
  if m.share_layers and m.scan_layers:
    fail("model.scan_layers", True, "must be False with model.share_layers=True (one block)")
  if m.share_layers and fam.autoregressive:
    fail(
      "model.share_layers",
      True,
      f"not supported with model.family={m.family!r} (the KV cache needs one block per layer)",
    )
  if m.embed_dim and m.embed_dim != m.d_model and wiring.task.head == "lm":
    if m.tie_embeddings:
      fail(
        "model.embed_dim",
        m.embed_dim,
        f"must be 0 or model.d_model={m.d_model} with a tied LM head (model.tie_embeddings)",
      )
  if not m.head_dim and m.d_model % m.num_heads:
    fail(
      "model.d_model",
      m.d_model,
      f"must be divisible by model.num_heads={m.num_heads} unless model.head_dim is set",
    )
  if m.num_heads % m.num_kv_heads:
    fail(
      "model.num_heads", m.num_heads, f"must be divisible by model.num_kv_heads={m.num_kv_heads}"
    )
  head_dim = m.head_dim or m.d_model // m.num_heads
  _validate_mla(config, wiring)
  if m.position == "rope" and head_dim % 2:
    fail("model.head_dim", head_dim, "must be even with model.position='rope'")
  if m.position == "rope":
    _validate_rope(m, m.mla.qk_rope_head_dim if m.attention == "mla" else head_dim)
  if m.position_offset < 0 or (m.position_offset and m.position != "learned"):
    fail(
      "model.position_offset", m.position_offset, "must be >= 0, and 0 unless position='learned'"
    )
  if m.max_len and m.max_len < config.data.seq_len:
    fail("model.max_len", m.max_len, f"must be 0 or >= data.seq_len={config.data.seq_len}")
  if m.attention_impl == "splash" and config.data.seq_len % 128:
    fail(
      "data.seq_len",
      config.data.seq_len,
      "must be a multiple of 128 with model.attention_impl='splash'",
    )
  if t.batch_size % t.grad_accum:
    fail("train.batch_size", t.batch_size, f"must be divisible by train.grad_accum={t.grad_accum}")
  if t.min_learning_rate > t.learning_rate:
    fail(
      "train.min_learning_rate",
      t.min_learning_rate,
      f"must be <= train.learning_rate={t.learning_rate}",
    )
  if t.schedule == "two_stage" and not (
    t.min_learning_rate <= t.cooldown_learning_rate <= t.learning_rate
  ):
    fail(
      "train.cooldown_learning_rate",
      t.cooldown_learning_rate,
      f"must lie between train.min_learning_rate={t.min_learning_rate} and "
      f"train.learning_rate={t.learning_rate} with train.schedule='two_stage'",
    )
  if m.position == "relative" and (m.rel_buckets < 4 or m.rel_buckets % 2):
    fail("model.rel_buckets", m.rel_buckets, "must be an even number >= 4 (T5: 32)")
  if m.position in ("relative", "alibi") and m.attention_impl == "splash":
    fail("model.position", m.position, "the splash kernel takes no bias; use attention_impl='xla'")
  if m.norm_position == "post" and m.block == "parallel":
    fail(
      "model.block", m.block, "needs model.norm_position='pre' (one norm feeding both sublayers)"
    )
  if m.norm_position == "post" and m.embed_norm:
    fail(
      "model.embed_norm",
      True,
      "is for pre-norm stacks; post-norm stacks always normalize the embeddings",
    )
  _validate_disentangled(config, fam)
  if m.neighbor_mix and (fam.mask_kind != "bidirectional" or fam.model is not Transformer):
    fail(
      "model.neighbor_mix",
      m.neighbor_mix,
      f"needs one bidirectional stack (encoder or diffusion), not model.family={m.family!r}: "
      "a causal stack would need the KV cache to keep the previous tokens' embeddings",
    )
  if m.neighbor_mix >= config.data.seq_len:
    fail("model.neighbor_mix", m.neighbor_mix, f"must be < data.seq_len={config.data.seq_len}")
  if task.estimator == "count" and m.time_conditioning:
    fail(
      "task.estimator",
      task.estimator,
      "'count' integrates the time out, so it needs model.time_conditioning=False",
    )
  _validate_post_training(config, wiring)
  if m.moe.num_experts:
    _validate_moe(config)
  tokenizer = make_tokenizer(config.data.tokenizer)
  _validate_specials(config, wiring, tokenizer)
  if wiring.task.teacher:
    _validate_distill(config, wiring, tokenizer.vocab_size)
  if wiring.task.template_rows:
    chat.token_ids(task.template, tokenizer)  # raises on a template token the tokenizer lacks
  if fam.sentinels:
    _validate_encdec(config, tokenizer)
  else:
    validate_source(config.data.name, "data.name")
  if config.data.eval_name:
    validate_source(config.data.eval_name, "data.eval_name")
  _validate_data(config.data, t.batch_size)
  for key in ("data.name", "data.eval_name"):
    if prepared.is_prepared(get(config, key)):
      _validate_prepared(config, wiring, tokenizer, key)
  if t.num_samples and fam.sample and not fam.autoregressive:  # one window: no sliding
    context = m.max_len or config.data.seq_len
    prompts = [p for p in t.sample_prompts.split("|") if p][: t.num_samples]
    longest = max((tokenizer.encode(p).size for p in prompts), default=0)
    if longest + t.sample_tokens > context:
      fail(
        "train.sample_tokens",
        t.sample_tokens,
        f"the end-of-run samples of model.family={m.family!r} must fit the context "
        f"({context}) with their longest prompt ({longest} tokens); lower it or set "
        "train.num_samples=0",
      )
  if m.vocab_size and m.vocab_size < tokenizer.vocab_size:
    fail(
      "model.vocab_size", m.vocab_size, f"must be 0 or >= the tokenizer's {tokenizer.vocab_size}"
    )
  return wiring


def _validate_data(d: ml_collections.ConfigDict, batch_size: int) -> None:
  """Sharding against the global batch; text-file options only where a text file is read."""
  check_shards(d.shards, batch_size)
  texts = [n for n in (d.name, d.eval_name) if n.startswith("text:")]
  for key in ("doc_separator", "span_bytes"):
    if not texts and d[key] != base.get_config().data[key]:
      fail(
        f"data.{key}",
        d[key],
        f"applies to text:<glob> sources only; data.name={d.name!r} and "
        f"data.eval_name={d.eval_name!r} are not; leave it at its default",
      )


def _validate_prepared(config, wiring: families.Wiring, tokenizer, key: str) -> None:
  """`arrayrecord:DIR` (train/data/prepared.py): rows packed for this tokenizer, length and
  frame, read by a task that trains on packed documents."""
  d, name = config.data, get(config, key)
  meta = prepared.read_metadata(name, key)
  if wiring.task.train_data is not families.packed_train:
    fail(
      key,
      name,
      f"holds packed pretraining rows; model.family={config.model.family!r} task.name="
      f"{config.task.name!r} reads its own examples: allowed with the tasks that pack documents "
      "(decoder, encoder and diffusion pretraining, distill)",
    )
  mine = prepared.tokenizer_identity(d.tokenizer, tokenizer)
  theirs = meta["tokenizer"]
  if (mine["vocab_size"], mine["sha256"]) != (theirs["vocab_size"], theirs["sha256"]):
    fail(
      "data.tokenizer",
      d.tokenizer,
      f"{key}={name!r} holds the ids of tokenizer {prepared.describe_tokenizer(theirs)}, not of "
      f"{prepared.describe_tokenizer(mine)}; allowed: that tokenizer, or shards prepared with this one",
    )
  if meta["seq_len"] != d.seq_len:
    fail(
      "data.seq_len",
      d.seq_len,
      f"{key}={name!r} holds rows of {meta['seq_len']} tokens; allowed: {meta['seq_len']}, or "
      "shards prepared with this length",
    )
  prefix, suffix = (list(ids) for ids in wiring.task.frame(tokenizer.specials))
  frame = meta["frame"]
  if [frame["prefix"], frame["suffix"]] != [prefix, suffix]:
    fail(
      key,
      name,
      f"its documents are framed {frame['prefix']} ... {frame['suffix']} (prepared with "
      f"--frame={frame['name']}); model.family={config.model.family!r} frames them {prefix} ... "
      f"{suffix}: prepare them again with the frame of this family",
    )
  if key == "data.name" and d.shards != 1:
    fail(
      "data.shards",
      d.shards,
      f"prepared rows ({key}={name!r}) are dealt from one global order, each process reading "
      "only its own: allowed 1",
    )


def _validate_post_training(config: ml_collections.ConfigDict, wiring: families.Wiring) -> None:
  """LoRA, its frozen base, SFT's and DPO's data and the DPO reference."""
  lo, t, m = config.model.lora, config.task, config.model
  if lo.rank:
    try:
      re.compile(lo.targets)
    except re.error as e:
      fail("model.lora.targets", lo.targets, f"must be a regular expression ({e})")
  if lo.base_quant != "none" and not lo.rank:
    fail("model.lora.base_quant", lo.base_quant, "quantizes a LoRA base: set model.lora.rank > 0")
  if lo.base_quant == "ternary" and m.quant != "bitnet158":
    fail(
      "model.lora.base_quant",
      lo.base_quant,
      f"packs a BitNet b1.58 base: needs model.quant='bitnet158', not {m.quant!r}",
    )
  if lo.base_quant == "nf4" and m.quant != "none":
    fail(
      "model.lora.base_quant", lo.base_quant, f"quantizes a float base, not model.quant={m.quant!r}"
    )
  if lo.base_dtype != "float32" and lo.base_quant != "none":
    fail("model.lora.base_dtype", lo.base_dtype, "applies to a float base (base_quant='none')")
  if (t.name in ("sft", "dpo")) and not config.data.name.startswith("jsonl:"):
    fail("data.name", config.data.name, f"task.name={t.name!r} reads jsonl:<glob> conversations")
  if not wiring.task.reference:
    return
  if not 0 <= t.label_smoothing < 0.5:
    fail("task.label_smoothing", t.label_smoothing, "must lie in [0, 0.5)")
  if t.loss in preference.REFERENCE_FREE:
    return
  if t.reference == "adapter_base" and not lo.rank:
    fail("task.reference", t.reference, "is the policy without its LoRA: set model.lora.rank > 0")
  if t.reference == "frozen" and lo.rank:
    fail(
      "task.reference",
      t.reference,
      "with LoRA the initial policy is the base itself: use 'adapter_base' (no second copy)",
    )


def _validate_moe(config: ml_collections.ConfigDict) -> None:
  """Routing sizes, and what MoE layers do not compose with (modeling/moe.py)."""
  moe, m = config.model.moe, config.model
  e = moe.num_experts
  if not 1 <= moe.top_k <= e:
    fail("model.moe.top_k", moe.top_k, f"must lie in [1, model.moe.num_experts={e}]")
  if moe.n_group < 1 or e % moe.n_group:
    fail("model.moe.n_group", moe.n_group, f"must be >= 1 and divide model.moe.num_experts={e}")
  if not 1 <= moe.topk_group <= moe.n_group:
    fail(
      "model.moe.topk_group", moe.topk_group, f"must lie in [1, model.moe.n_group={moe.n_group}]"
    )
  if moe.top_k > moe.topk_group * (e // moe.n_group):
    fail(
      "model.moe.top_k",
      moe.top_k,
      f"must be <= the experts in the kept groups, topk_group * num_experts / n_group = "
      f"{moe.topk_group * (e // moe.n_group)}",
    )
  if moe.routed_scaling_factor <= 0:
    fail("model.moe.routed_scaling_factor", moe.routed_scaling_factor, "must be > 0")
  if m.share_layers:
    fail("model.share_layers", True, "not with model.moe.num_experts > 0 (one block, one kind)")
  if m.lora.rank:
    fail(
      "model.lora.rank",
      m.lora.rank,
      "not with model.moe.num_experts > 0: routed experts take no adapters and the balancing "
      "bias would sit in the frozen base",
    )
  if m.quant != "none" and moe.capacity_factor <= 0 and moe.impl == "ragged":
    fail(
      "model.moe.impl",
      moe.impl,
      f"jax.lax.ragged_dot takes no quantized dot_general: with model.quant={m.quant!r} use "
      "impl='dense' or a capacity_factor > 0",
    )


# TransformerConfig fields a student may set apart from its teacher under
# task.distill_init='every_other' (the layer counts, and what changes no weight's shape)
DISTILL_FREE = (
  "num_layers",
  "num_decoder_layers",
  "quant",
  "lora",
  "dropout",
  "scan_layers",
  "remat",
  "dtype",
  "attention_impl",
)


def _validate_distill(config, wiring: families.Wiring, vocab_size: int) -> None:
  """task.name=distill: the teacher's run exists and shares the family, tokenizer, head and
  vocabulary; the cos term needs equal widths, every_other the same shapes."""
  t = config.task
  if not t.teacher:
    fail("task.teacher", t.teacher, "task.name='distill' needs the teacher run's workdir")
  saved = distill.run_config(t.teacher)
  for key in ("model.family", "data.tokenizer"):
    if get(saved, key) != get(config, key):
      fail(
        "task.teacher",
        t.teacher,
        f"the teacher's {key}={get(saved, key)!r} differs from the student's {get(config, key)!r}"
        " (the KD term compares their distributions over one vocabulary)",
      )
  if saved.model.lora.rank:
    fail("task.teacher", t.teacher, "is a LoRA run: its checkpoint holds the adapters alone")
  teacher_wiring = families.resolve(saved)
  if teacher_wiring.task.head != wiring.task.head:
    fail(
      "task.teacher",
      t.teacher,
      f"its head {teacher_wiring.task.head!r} is not the student's {wiring.task.head!r}",
    )
  student = wiring.transformer_config(config, vocab_size)
  teacher = teacher_wiring.transformer_config(saved, vocab_size)
  for field in ("vocab_size", "time_conditioning"):
    if getattr(teacher, field) != getattr(student, field):
      fail(
        f"model.{field}",
        getattr(student, field),
        f"must equal the teacher's {getattr(teacher, field)!r} (task.teacher={t.teacher!r})",
      )
  if teacher.position == "learned" and teacher.max_len < student.max_len:
    fail(
      "data.seq_len",
      config.data.seq_len,
      f"the teacher's learned positions stop at {teacher.max_len} (task.teacher={t.teacher!r})",
    )
  if t.distill_cos_weight and teacher.d_model != student.d_model:
    fail(
      "task.distill_cos_weight",
      t.distill_cos_weight,
      f"the cos term needs equal widths, and model.d_model={student.d_model} differs from the "
      f"teacher's {teacher.d_model}: set it to 0",
    )
  if t.distill_init == "none":
    return
  for field in dataclasses.fields(TransformerConfig):
    name = field.name
    if name not in DISTILL_FREE and getattr(teacher, name) != getattr(student, name):
      fail(
        f"model.{name}",
        getattr(student, name),
        f"task.distill_init={t.distill_init!r} copies the teacher's weights and needs its "
        f"{getattr(teacher, name)!r}; or set task.distill_init='none'",
      )
  for name in ("num_layers", "num_decoder_layers"):
    if getattr(student, name) > getattr(teacher, name):
      fail(
        f"model.{name}",
        getattr(student, name),
        f"task.distill_init={t.distill_init!r} needs at most the teacher's "
        f"{getattr(teacher, name)} layers",
      )


def validate_run(config: ml_collections.ConfigDict, workdir: str, num_devices: int) -> None:
  """The checks that need the run's processes and devices (after `jax.distributed`): the
  workdir, the mesh against the devices, the batch against the processes."""
  check_bucket("--workdir", workdir)
  check_bucket("data.tfds_data_dir", config.data.tfds_data_dir)
  dataset = tfds_dataset(config.data.name)
  if "://" in config.data.tfds_data_dir and dataset:  # read from the bucket, prepared there
    tfds_builder(dataset, config.data.tfds_data_dir, "data.name")
  shape = sharding.validate_mesh(config, num_devices)
  if config.model.attention_impl == "splash" and np.prod(shape) > 1:
    fail(
      "model.attention_impl",
      "splash",
      f"splash runs on one device so far, not a {int(np.prod(shape))}-device mesh (sharding "
      "it with shard_map is not built yet); use 'xla' on a mesh",
    )
  n_proc = jax.process_count()
  for key in ("batch_size", "eval_batch_size"):
    if config.train[key] % n_proc:
      fail(f"train.{key}", config.train[key], f"must be divisible by the {n_proc} processes")


def check_bucket(key: str, path: str) -> None:
  """A path in a bucket (gs://...) is reachable: its filesystem installed (gcsfs for gs://),
  the credentials accepted, the bucket there; else one line naming `key`. Local paths pass."""
  if "://" not in path:
    return
  scheme, rest = path.split("://", 1)
  bucket = epath.Path(f"{scheme}://{rest.split('/')[0]}")
  try:
    found = bucket.exists()
  except ImportError as e:
    fail(key, path, f"{scheme}:// paths need fsspec's filesystem for them: {e}")
  except Exception as e:  # an authentication or permission error, from the storage client
    cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    fail(
      key,
      path,
      f"the bucket {bucket} cannot be read ({cause[:200]}); give this machine credentials "
      "with access to it (`gcloud auth application-default login`, or the VM's service account)",
    )
  if not found:
    fail(key, path, f"the bucket {bucket} does not exist (or these credentials cannot see it)")


def _validate_disentangled(config: ml_collections.ConfigDict, fam) -> None:
  """DeBERTa: its buckets, and where disentangled attention and the EMD are defined."""
  m = config.model
  if m.position != "disentangled":
    if m.emd_layers:
      fail("model.emd_layers", m.emd_layers, "must be 0 unless model.position='disentangled'")
    return
  if fam.mask_kind != "bidirectional" or fam.model is not Transformer:
    fail(
      "model.position",
      m.position,
      f"'disentangled' needs one bidirectional stack (encoder or diffusion), not "
      f"model.family={m.family!r}: it has no KV cache",
    )
  if m.num_kv_heads != m.num_heads:
    fail(
      "model.num_kv_heads",
      m.num_kv_heads,
      f"must equal model.num_heads={m.num_heads} with "
      "model.position='disentangled' (DeBERTa projects positions through every head)",
    )
  if m.position_buckets < 0 or m.position_buckets == 1:
    fail("model.position_buckets", m.position_buckets, "must be 0 (exact distances) or >= 2")
  if m.position_buckets and m.max_relative_positions <= m.position_buckets // 2 + 1:
    fail(
      "model.max_relative_positions",
      m.max_relative_positions,
      f"must exceed model.position_buckets / 2 + 1 = {m.position_buckets // 2 + 1}: the log "
      "buckets start at half the buckets",
    )
  if m.emd_layers < 0:
    fail("model.emd_layers", m.emd_layers, "must be >= 0")
  if m.emd_layers and m.norm_position != "post":
    fail("model.emd_layers", m.emd_layers, "needs model.norm_position='post' (DeBERTa's blocks)")


def _validate_encdec(config: ml_collections.ConfigDict, tokenizer) -> None:
  """T5: positions, span corruption lengths, sentinels and the seq2seq sources."""
  m, t, d = config.model, config.task, config.data
  if m.position == "learned":
    fail(
      "model.position",
      m.position,
      "model.family='encdec' allows 'relative' (T5), 'rope' or 'none': no absolute table",
    )
  if not 0 < t.noise_density < 1:
    fail("task.noise_density", t.noise_density, "must lie strictly between 0 and 1")
  seq2seq.target_len(config)  # raises on a data.target_len too short for span corruption
  # span corruption's sentinels follow the tokenizer's ids; text-to-text needs none
  sentinels = t.num_sentinels if t.name == "pretrain" else 0
  if m.vocab_size and m.vocab_size < tokenizer.vocab_size + sentinels:
    fail(
      "model.vocab_size",
      m.vocab_size,
      f"must be 0 or >= the tokenizer's {tokenizer.vocab_size}"
      + (f" + task.num_sentinels={sentinels} (span corruption)" if sentinels else ""),
    )
  if t.name == "pretrain":
    seq2seq.span_rows_fn(config, tokenizer.vocab_size)  # raises on too few sentinels
    validate_source(d.name, "data.name")
  else:
    for name, _ in seq2seq.parse_mixture(config):
      validate_source(name, "task.mixture" if t.mixture else "data.name")
