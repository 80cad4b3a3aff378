"""BLOOM style decoder: ALiBi, a LayerNorm on the embeddings, GELU MLP, biases, tied embeddings.

`--config=configs/bloom.py:size=S` (BigScience, "BLOOM: A 176B-Parameter Open-Access
Multilingual Language Model", 2022): multi-head attention with ALiBi's linear biases in place
of position embeddings (Press et al. 2022), LayerNorm right after the token embedding and
before every sublayer, tanh GELU with d_ff = 4 x d_model, biases everywhere, the LM head tied
to the embedding. Sizes (parameters with the byte-level tokenizer's 264-token vocabulary):
  tiny  2 x 64,   8 heads              tests (legal with mesh.tensor=8)
  XS    4 x 128,  4 heads              CPU-sized
  S     6 x 384,  6 heads              six heads: ALiBi's slopes for a non-power of two
  M     12 x 768, 12 heads
  L     24 x 1024, 16 heads            bloom-560m's body
  1B    24 x 2048, 16 heads            bloom-1b7's body
As published (the tokenizer stays `data.tokenizer`; the model has the 250,880 rows of
BLOOM's vocabulary), scanned layers, data.seq_len 2048; parameter counts equal
BloomForCausalLM's (tests/test_presets.py):
  560m  24 x 1024,  16 heads          559,214,592
  7b1   30 x 4096,  32 heads        7,069,016,064
  176b  70 x 14336, 112 heads     176,247,271,424
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=8),
  "XS": dict(num_layers=4, d_model=128, num_heads=4),
  "S": dict(num_layers=6, d_model=384, num_heads=6),
  "M": dict(scan_layers=True, num_layers=12, d_model=768, num_heads=12),
  "L": dict(scan_layers=True, num_layers=24, d_model=1024, num_heads=16),
  "1B": dict(scan_layers=True, num_layers=24, d_model=2048, num_heads=16),
}  # num_kv_heads = num_heads and d_ff = 4 x d_model: base.py's derived defaults
BLOOM = dict(scan_layers=True, vocab_size=250880, max_len=2048, norm_eps=1e-5)
PUBLISHED = {
  "560m": dict(num_layers=24, d_model=1024, num_heads=16, **BLOOM),
  "7b1": dict(num_layers=30, d_model=4096, num_heads=32, **BLOOM),
  "176b": dict(num_layers=70, d_model=14336, num_heads=112, **BLOOM),
}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.position = "alibi"
  c.model.embed_norm = True
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.gelu = "tanh"
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.update(base.choose("size", args["size"], {**SIZES, **PUBLISHED}))
  if args["size"] in PUBLISHED:
    c.data.seq_len = 2048
  base.post_training(c, args["task"])
  return c
