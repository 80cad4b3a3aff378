"""DeepSeek-V3 style decoder: multi-head latent attention (docs/mla.md), fine-grained
mixture of experts with a shared expert and auxiliary-loss-free balancing (docs/moe.md),
RMSNorm, SwiGLU, RoPE, untied head (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report").

`--config=configs/deepseek.py:size=S`. Sizes (layers x width, heads; MLA ranks q / kv and
per-head nope + rope / v; routed experts of their width, top-k, shared experts, leading
dense layers): parameters with the byte-level tokenizer's 264-token vocabulary, total and
active per token (the balancing biases, buffers in transformers, left out):
  tiny  2 x 64, 8 heads; q -, kv 32, 16 + 8 / 16; 8 x 32, top 2, 1 shared, 1 dense
                                                              170,880 / 134,016
  XS    4 x 128, 4 heads; q -, kv 64, 32 + 16 / 32; 16 x 64, top 2, 1 shared, 1 dense
                                                              1,672,576 / 640,384
  S     6 x 384, 6 heads; q 192, kv 128, 64 + 32 / 64; 32 x 128, top 4 in 2 of 4 groups,
        1 shared, 1 dense                                     28,287,744 / 7,643,904
  M     12 x 768, 12 heads; q 384, kv 256, 64 + 32 / 64; 64 x 256, top 6 in 4 of 8
        groups, 2 shared, 1 dense                             457,201,920 / 80,894,208
  1B    12 x 1024, 16 heads; q 512, kv 256, 64 + 32 / 64; 64 x 384, top 6 in 4 of 8
        groups, 2 shared, 1 dense                             905,299,968 / 152,684,544
The sizes balance experts with a bias update of 1e-3 per step and no sequence-wise loss.

As published (the tokenizer stays `data.tokenizer`; the model has the published
vocabulary's rows), scanned layers, remat full, bfloat16 compute, seq_len 4096, for ahead-of-time
compiles (`launch.aot`, docs/results/moe.md). The multi-token-prediction module is not
built, so the counts are those of the main model, equal to transformers'
DeepseekV3ForCausalLM's (tests/test_presets.py):
  deepseek_v3  61 x 7168, 128 heads; q 1536, kv 512, 128 + 64 / 128; 256 x 2048, top 8 in
               4 of 8 groups, 1 shared, 3 dense layers of 18432, scaling 2.5; vocab
               129280; YaRN x40 from 4096 (mscale_all_dim 1)  671,026,404,352 / 37,552,282,624
  kimi_k2      the same body with 64 heads; 384 x 2048, top 8, no groups, 1 shared, 1 dense
               layer, scaling 2.827; vocab 163840; rope theta 50000, YaRN x32 from 4096
               (beta_fast 1, beta_slow 1)                     1,026,408,209,408 / 32,861,477,888
"""

from configs import base


def _size(model: dict, mla: tuple, moe: tuple) -> dict:
  """One size: model keys, the MLA ranks (q, kv, nope, rope, v) and the MoE layout
  (experts, expert width, top_k, shared, leading dense layers, groups, groups kept,
  scaling)."""
  q, kv, nope, rope, v = mla
  experts, expert_d_ff, top_k, shared, dense, groups, kept, scaling = moe
  return dict(
    model=model,
    mla=dict(
      q_lora_rank=q, kv_lora_rank=kv, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v
    ),
    moe=dict(
      num_experts=experts,
      expert_d_ff=expert_d_ff,
      top_k=top_k,
      num_shared_experts=shared,
      first_dense_layers=dense,
      n_group=groups,
      topk_group=kept,
      routed_scaling_factor=scaling,
    ),
  )


def _body(layers: int, width: int, heads: int, d_ff: int, **more) -> dict:
  return dict(num_layers=layers, d_model=width, num_heads=heads, d_ff=d_ff, **more)


SIZES = {
  "tiny": _size(_body(2, 64, 8, 96), (0, 32, 16, 8, 16), (8, 32, 2, 1, 1, 1, 1, 1.0)),
  "XS": _size(_body(4, 128, 4, 192), (0, 64, 32, 16, 32), (16, 64, 2, 1, 1, 1, 1, 1.0)),
  "S": _size(_body(6, 384, 6, 640), (192, 128, 64, 32, 64), (32, 128, 4, 1, 1, 4, 2, 1.0)),
  "M": _size(
    _body(12, 768, 12, 2048, scan_layers=True),
    (384, 256, 64, 32, 64),
    (64, 256, 6, 2, 1, 8, 4, 1.0),
  ),
  "1B": _size(
    _body(12, 1024, 16, 3072, scan_layers=True),
    (512, 256, 64, 32, 64),
    (64, 384, 6, 2, 1, 8, 4, 1.0),
  ),
}
PUBLISHED_BODY = dict(norm_eps=1e-6, scan_layers=True, dtype="bfloat16", remat="full")
PUBLISHED_MLA = (1536, 512, 128, 64, 128)
YARN = dict(type="yarn", original_max_len=4096, mscale=1.0, mscale_all_dim=1.0)
PUBLISHED = {
  "deepseek_v3": _size(
    _body(61, 7168, 128, 18432, vocab_size=129280, max_len=163840, **PUBLISHED_BODY),
    PUBLISHED_MLA,
    (256, 2048, 8, 1, 3, 8, 4, 2.5),
  )
  | dict(rope=dict(rope_theta=10000.0, rope_scaling=dict(factor=40.0, beta_fast=32.0, **YARN))),
  "kimi_k2": _size(
    _body(61, 7168, 64, 18432, vocab_size=163840, max_len=131072, **PUBLISHED_BODY),
    PUBLISHED_MLA,
    (384, 2048, 8, 1, 1, 1, 1, 2.827),
  )
  | dict(
    rope=dict(
      rope_theta=50000.0, rope_scaling=dict(factor=32.0, beta_fast=1.0, beta_slow=1.0, **YARN)
    )
  ),
}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.attention = "mla"
  c.model.position = "rope"
  c.model.norm = "rmsnorm"
  c.model.mlp = "swiglu"
  c.model.use_bias = False
  c.model.tie_embeddings = False
  c.model.moe.bias_update_rate = 1e-3
  size = base.choose("size", args["size"], {**SIZES, **PUBLISHED})
  c.model.update(size["model"])
  c.model.mla.update(size["mla"])
  c.model.moe.update(size["moe"])
  if "rope" in size:
    c.model.rope_theta = size["rope"]["rope_theta"]
    c.model.rope_scaling.update(size["rope"]["rope_scaling"])
  if args["size"] in PUBLISHED:
    c.data.seq_len = 4096
  base.post_training(c, args["task"])
  return c
