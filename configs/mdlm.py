"""Masked diffusion LM (MDLM / MD4): the decoder presets' dimensions on a bidirectional stack.

`--config=configs/mdlm.py:size=S`. The sizes are configs/gpt.py's (same layers, widths,
heads, context), so an AR-vs-diffusion comparison is one `--config=` apart:
  tiny  2 x 64,   4 heads    tests
  XS    4 x 128,  4 heads    CPU-sized (default)
  S     6 x 384,  6 heads
  M     12 x 768, 12 heads   GPT-2 small's body (MDLM's OpenWebText model is this size)
  L     24 x 1024, 16 heads
  1B    24 x 2048, 16 heads
The block is GPT-2's (pre-LayerNorm, GELU MLP, biases, tied embeddings) with RoPE instead of
learned positions, as in MDLM's DiT backbone: with no causal mask to infer order from, a
bidirectional stack needs positions it can use at once (see the README's encoder section).
The model is time-independent by default (`model.time_conditioning`, MDLM shows masked
diffusion needs no time input); the loss is the log-linear schedule's NELBO
(`task.schedule`). Sample with `python -m eval.sample --workdir=... --steps=...`.
"""

from configs import base, gpt


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS"})
  c = base.get_config()
  c.model.family = "diffusion"
  c.model.position = "rope"
  c.model.norm = "layernorm"
  c.model.mlp = "gelu"
  c.model.use_bias = True
  c.model.tie_embeddings = True
  c.model.update(base.choose("size", args["size"], gpt.SIZES))
  c.task.schedule = "loglinear"
  c.train.sample_tokens = 100  # prompt + generated tokens must fit the context
  return c
