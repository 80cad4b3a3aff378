"""Llama 2 style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head.

`--config=configs/llama.py:size=S`. Sizes (parameters with the byte-level
tokenizer's 264-token vocabulary; see README):
  tiny  2 x 64,   16 heads / 8 kv heads  tests (legal with mesh.tensor=8)
  XS    4 x 128,  4 heads / 2 kv heads   CPU-sized
  S     6 x 384,  6 heads / 2 kv heads
  M     12 x 768, 12 heads / 4 kv heads
  L     24 x 1024, 16 heads / 4 kv heads
  1B    16 x 2048, 32 heads / 8 kv heads  Llama 3.2 1B's body
As published (the tokenizer stays `data.tokenizer`; the model has the published
vocabulary's rows), scanned layers, data.seq_len 2048; parameter counts equal
LlamaForCausalLM's (tests/test_presets.py):
  llama2-7B  32 x 4096, 32 heads (MHA), d_ff 11008, vocab 32000, context 4096,
             rope theta 10000                                   6,738,415,616
  llama3-8B  32 x 4096, 32 heads / 8 kv heads, d_ff 14336, vocab 128256, context 8192,
             rope theta 500000, no RoPE scaling (Llama 3; 3.1 adds
             --config.model.rope_scaling.type=llama3 with factor 8,
             original_max_len 8192 and model.max_len 131072)    8,030,261,248
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=16, num_kv_heads=8, d_ff=192),
  "XS": dict(num_layers=4, d_model=128, num_heads=4, num_kv_heads=2, d_ff=352),
  "S": dict(num_layers=6, d_model=384, num_heads=6, num_kv_heads=2, d_ff=1024),
  "M": dict(scan_layers=True, num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, d_ff=2048),
  "L": dict(scan_layers=True, num_layers=24, d_model=1024, num_heads=16, num_kv_heads=4, d_ff=2816),
  "1B": dict(
    scan_layers=True, num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, d_ff=8192
  ),
}
PUBLISHED_COMMON = dict(scan_layers=True, norm_eps=1e-5)
PUBLISHED = {
  "llama2-7B": dict(
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=32,
    d_ff=11008,
    vocab_size=32000,
    max_len=4096,
    rope_theta=10000.0,
    **PUBLISHED_COMMON,
  ),
  "llama3-8B": dict(
    num_layers=32,
    d_model=4096,
    num_heads=32,
    num_kv_heads=8,
    d_ff=14336,
    vocab_size=128256,
    max_len=8192,
    rope_theta=500000.0,
    **PUBLISHED_COMMON,
  ),
}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.position = "rope"
  c.model.norm = "rmsnorm"
  c.model.mlp = "swiglu"
  c.model.use_bias = False
  c.model.tie_embeddings = False
  c.model.update(base.choose("size", args["size"], {**SIZES, **PUBLISHED}))
  if args["size"] in PUBLISHED:
    c.data.seq_len = 2048
  base.post_training(c, args["task"])
  return c
