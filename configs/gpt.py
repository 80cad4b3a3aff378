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
GPT-2 as published (Radford et al. 2019; transformers' gpt2, gpt2-medium, gpt2-large,
gpt2-xl): the BPE vocabulary's 50257 rows (the tokenizer stays `data.tokenizer`), 1024
learned positions, tanh GELU, LayerNorm eps 1e-5, scanned layers, data.seq_len 1024.
Parameter counts equal GPT2LMHeadModel's (tests/test_presets.py):
  124M  12 x 768,  12 heads   124,439,808
  355M  24 x 1024, 16 heads   354,823,168
  774M  36 x 1280, 20 heads   774,030,080
  1.5B  48 x 1600, 25 heads   1,557,611,200
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
GPT2 = dict(scan_layers=True, vocab_size=50257, max_len=1024, gelu="tanh", norm_eps=1e-5)
PUBLISHED = {
  "124M": dict(num_layers=12, d_model=768, num_heads=12, **GPT2),
  "355M": dict(num_layers=24, d_model=1024, num_heads=16, **GPT2),
  "774M": dict(num_layers=36, d_model=1280, num_heads=20, **GPT2),
  "1.5B": dict(num_layers=48, d_model=1600, num_heads=25, **GPT2),
}  # not in SIZES: configs/mdlm.py reads SIZES, and the published vocabularies are GPT-2's


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.position = "learned"
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.update(base.choose("size", args["size"], {**SIZES, **PUBLISHED}))
  if args["size"] in PUBLISHED:
    c.data.seq_len = 1024
  base.post_training(c, args["task"])
  return c
