"""BitNet b1.58 decoder in the architecture llama.cpp runs (its BITNET graph), so the trained
model exports to GGUF (`python -m eval.export --format=gguf`) and runs there unchanged.

`--config=configs/bitnet.py:size=S`. Llama-style: RMSNorm, SwiGLU, RoPE (rotate-half, as
llama.cpp's NEOX mode), no biases, plus BitNet's SubLN before the attention output and MLP
down projections, ternary weights with 8-bit activations (`model.quant=bitnet158`), and the
LM head tied to the token embedding (llama.cpp's BITNET graph reads its logits from the
embedding). Widths are multiples of 256, the block size of llama.cpp's ternary tensor types.
Trained with the two-stage BitNet recipe (`train.schedule=two_stage`).
  tiny  2 x 256,  8 heads, d_ff 512    tests, CPU
  S     6 x 512,  8 heads, d_ff 1536
  M     12 x 768, 12 heads, d_ff 2048
  L     24 x 1536, 16 heads, d_ff 4096
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=256, num_heads=8, d_ff=512),
  "S": dict(num_layers=6, d_model=512, num_heads=8, d_ff=1536),
  "M": dict(num_layers=12, d_model=768, num_heads=12, d_ff=2048),
  "L": dict(scan_layers=True, num_layers=24, d_model=1536, num_heads=16, d_ff=4096),
}  # num_kv_heads follows num_heads (base.py)


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "tiny", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "decoder"
  c.model.update(
    dict(
      position="rope",
      norm="rmsnorm",
      norm_eps=1e-5,
      mlp="swiglu",
      use_bias=False,
      tie_embeddings=True,
      quant="bitnet158",
    )
  )
  c.model.update(base.choose("size", args["size"], SIZES))
  c.train.update(
    dict(
      schedule="two_stage", learning_rate=2e-3, cooldown_learning_rate=5e-4, min_learning_rate=1e-4
    )
  )
  if args["task"] != "pretrain":  # post-training: LoRA over the packed ternary base fits here
    c.train.schedule = "cosine"
  base.post_training(c, args["task"])
  return c
