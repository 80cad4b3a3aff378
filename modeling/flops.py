"""Training FLOPs of a model config, by the formula nanoGPT and PaLM use (6N + attention)."""

from __future__ import annotations

from modeling.layers import GATED
from modeling.transformer import TransformerConfig


def matmul_params(cfg: TransformerConfig) -> int:
  """Weights that take part in a matmul per token (the N of 6N).

  Embedding lookups are not matmuls; the output head is, tied or not. Shared layers
  (ALBERT) count once per application, since each application is a matmul. An
  encoder-decoder (`num_decoder_layers` > 0) adds its decoder blocks, each with a second
  (cross-)attention (`flops_per_token` weighs them by the target length). MoE layers
  (modeling/moe.py) count their active weights: the router, top_k routed and the shared
  experts.
  """
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  e = cfg.embed_dim or d
  attn = d * h * k * 2 + d * g * k * 2
  if cfg.attention == "mla":
    attn = cfg.mla.matmul_params(d, h)
  mlp = d * f * (3 if cfg.mlp in GATED else 2)
  head = {"lm": d * cfg.vocab_size, "mlm": d * e + e * cfg.vocab_size}.get(cfg.head, 0)
  proj = d * e if e != d else 0
  decoder = cfg.num_decoder_layers * (2 * attn + mlp)
  m = cfg.moe
  active = d * m.expert_d_ff * 3 * (m.top_k + m.num_shared_experts) + d * m.num_experts
  moe_layers = sum(m.is_moe(i) for i in range(cfg.num_layers))
  return cfg.num_layers * (attn + mlp) + moe_layers * (active - mlp) + decoder + head + proj


def flops_per_token(cfg: TransformerConfig, seq_len: int, target_len: int = 0) -> float:
  """Training FLOPs per (source) token: 6N + 12 * layers * heads * head_dim * seq_len (PaLM,
  nanoGPT). An encoder-decoder counts per source token, its decoder running on
  `target_len` targets (0: as many as sources): decoder blocks, cross-attention queries
  and the head scale by target_len / seq_len, cross-attention keys and values do not."""
  h, k = cfg.num_heads, cfg.head_dim
  if cfg.attention == "mla":  # scores over N + P features, values of V: 2 h k -> h (N + P + V)
    m = cfg.mla
    k = (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) / 2
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
