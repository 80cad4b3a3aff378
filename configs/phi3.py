"""Phi-3 mini (Abdin et al. 2024), as published: a Llama-style decoder with full multi-head
attention.

`--config=configs/phi3.py:size=mini-4k`. RMSNorm (eps 1e-5), SwiGLU, RoPE (theta 10000,
no scaling), no biases, untied output head, the 32064-row vocabulary of Phi-3's tokenizer
(the tokenizer stays `data.tokenizer`), a 2047-key sliding window (the published
config.json's `sliding_window`, which transformers applies), scanned layers, data.seq_len
2048, remat full (the train step then fits a v5e-8's 16 GiB per chip on the default mesh,
15.5 GiB; without it, 99.7: docs/results/default_mesh.md). Its parameter count equals
Phi3ForCausalLM's (tests/test_presets.py; transformers fuses q/k/v and gate/up into one
matrix each, which changes no count):
  mini-4k  32 x 3072, 32 heads, d_ff 8192, context 4096   3,821,079,552
Phi-3 mini 128k (LongRoPE, `model.rope_scaling.type=longrope`) is not a preset: its
per-frequency factors are only in the checkpoint's config.json, which changed between
releases.
"""

from configs import base

SIZES = {
  "mini-4k": dict(
    num_layers=32,
    d_model=3072,
    num_heads=32,
    num_kv_heads=32,
    d_ff=8192,
    vocab_size=32064,
    max_len=4096,
    sliding_window=2047,
  ),
}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "mini-4k", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.update(
    dict(
      position="rope",
      rope_theta=10000.0,
      norm="rmsnorm",
      norm_eps=1e-5,
      mlp="swiglu",
      use_bias=False,
      tie_embeddings=False,
      scan_layers=True,
    )
  )
  c.model.update(base.choose("size", args["size"], SIZES))
  c.data.seq_len = 2048
  c.model.remat = "full"  # 3.8B at 16 x 2048 tokens: the activations would not fit a v5e-8
  base.post_training(c, args["task"])
  return c
