"""The one place that maps `config.model.family` to a model and its objective."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections

from modeling.transformer import Transformer, TransformerConfig
from train import objectives


@dataclasses.dataclass(frozen=True)
class Family:
  mask_kind: str
  objective: objectives.Objective
  autoregressive: bool  # can be sampled token by token with a KV cache


FAMILIES: dict[str, Family] = {
  "decoder": Family("causal", objectives.causal_lm, autoregressive=True),
}


def family(config: ml_collections.ConfigDict) -> Family:
  name = config.model.family
  if name not in FAMILIES:
    raise ValueError(f"model.family={name!r}: allowed {sorted(FAMILIES)}")
  return FAMILIES[name]


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
  )


def build(
  config: ml_collections.ConfigDict, vocab_size: int
) -> tuple[nn.Module, objectives.Objective]:
  """(model, objective) for the configured family."""
  return Transformer(transformer_config(config, vocab_size)), family(config).objective


def matmul_params(cfg: TransformerConfig) -> int:
  """Weights that take part in a matmul per token (the N of 6N).

  Embedding lookups are not matmuls; the output head is, tied or not.
  """
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  attn = d * h * k * 2 + d * g * k * 2
  mlp = d * f * (3 if cfg.mlp == "swiglu" else 2)
  return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12 * layers * heads * head_dim * seq_len (PaLM, nanoGPT)."""
  return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
