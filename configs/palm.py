"""PaLM style decoder: parallel blocks, multi-query attention, SwiGLU, RoPE, no biases.

`--config=configs/palm.py:size=S` (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling
with Pathways", sec. 2): each block is x + attn(norm(x)) + mlp(norm(x)) with one LayerNorm
feeding both (`model.block=parallel`), one key/value head shared by all query heads
(num_kv_heads=1), SwiGLU with d_ff = 4 x d_model, RoPE, no biases in the dense layers or the
norms, the LM head tied to the embedding. Sizes (parameters with the byte-level tokenizer's
264-token vocabulary):
  tiny  2 x 64,   4 heads              tests
  XS    4 x 128,  4 heads              CPU-sized
  S     6 x 384,  6 heads
  M     12 x 768, 12 heads
  L     24 x 1024, 16 heads
  1B    16 x 2048, 16 heads
As published (Table 1: head size 256 whatever the width, the 256k-token SentencePiece
vocabulary's rows, context 2048), scanned layers, data.seq_len 2048; parameter counts equal
the paper's to its three significant digits (tests/test_presets.py):
  8B    32 x 4096,  16 heads    8,632,012,800 (8.63B)
  62B   64 x 8192,  32 heads   62,495,662,080 (62.50B)
  540B  118 x 18432, 48 heads 540,356,474,880 (540.35B)
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=4),
  "XS": dict(num_layers=4, d_model=128, num_heads=4),
  "S": dict(num_layers=6, d_model=384, num_heads=6),
  "M": dict(scan_layers=True, num_layers=12, d_model=768, num_heads=12),
  "L": dict(scan_layers=True, num_layers=24, d_model=1024, num_heads=16),
  "1B": dict(scan_layers=True, num_layers=16, d_model=2048, num_heads=16),
}  # d_ff = 4 x d_model: base.py's derived default
PALM = dict(scan_layers=True, head_dim=256, vocab_size=256000, max_len=2048)
PUBLISHED = {
  "8B": dict(num_layers=32, d_model=4096, num_heads=16, **PALM),
  "62B": dict(num_layers=64, d_model=8192, num_heads=32, **PALM),
  "540B": dict(num_layers=118, d_model=18432, num_heads=48, **PALM),
}
# the paper's Table 1 counts, for tests/test_presets.py
PAPER_PARAMS = {"8B": 8.63e9, "62B": 62.50e9, "540B": 540.35e9}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.block = "parallel"
  c.model.position = "rope"
  c.model.norm = "layernorm"
  c.model.mlp = "swiglu"
  c.model.use_bias = False
  c.model.tie_embeddings = True
  c.model.num_kv_heads = 1
  c.model.update(base.choose("size", args["size"], {**SIZES, **PUBLISHED}))
  if args["size"] in PUBLISHED:
    c.data.seq_len = 2048
  base.post_training(c, args["task"])
  return c
