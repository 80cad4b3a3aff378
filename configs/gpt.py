"""GPT-2 style decoder: learned positions, LayerNorm, GELU MLP, tied embeddings.

`--config=configs/gpt.py:size=S`. Every size has as many key/value heads as heads and
d_ff = 4 x d_model; both follow `--config.model.num_heads` / `--config.model.d_model`
unless set themselves. Sizes (parameters with the byte-level tokenizer's 264-token
vocabulary and the preset's context; see README):
  tiny  2 x 64,   4 heads              tests
  XS    4 x 128,  4 heads              the Quickstart default, CPU-sized
  S     6 x 384,  6 heads, d_ff 1536   nanoGPT's Shakespeare char model
  M     12 x 768, 12 heads             GPT-2 small's body
  L     24 x 1024, 16 heads            GPT-2 medium's body
  1B    24 x 2048, 16 heads
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=4),
  "XS": dict(num_layers=4, d_model=128, num_heads=4),
  "S": dict(num_layers=6, d_model=384, num_heads=6),
  "M": dict(scan_layers=True, num_layers=12, d_model=768, num_heads=12),
  "L": dict(scan_layers=True, num_layers=24, d_model=1024, num_heads=16),
  "1B": dict(scan_layers=True, num_layers=24, d_model=2048, num_heads=16),
}  # num_kv_heads = num_heads and d_ff = 4 x d_model: base.py's derived defaults


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.update(base.choose("size", args["size"], SIZES))
  return c
