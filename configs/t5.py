"""T5 encoder-decoder: span-corruption pretraining, then text-to-text fine-tuning.

`--config=configs/t5.py:size=tiny,variant=v1_1,task=pretrain`. Variants:
  v1_1      T5 v1.1: RMSNorm without biases, gated-GELU MLP, untied output head, no
            dropout in pretraining; relative position bias (32 log buckets up to 128),
            shared by the layers of each stack
  original  T5 (2019): ReLU MLP, tied embeddings (output rescaled by d_model^-0.5)
Sizes (encoder = decoder layers; parameters with the byte tokenizer plus 100 sentinels,
v1_1; see the README's table):
  tiny  2 x 64,   4 heads, d_ff 128      tests
  XS    4 x 128,  4 heads, d_ff 256      CPU-sized
  S     8 x 512,  6 heads of 64, d_ff 1024   T5 v1.1 small's body
  M     12 x 768, 12 heads, d_ff 2048   T5 v1.1 base's body
  L     24 x 1024, 16 heads, d_ff 2816  T5 v1.1 large's body
As published (google/t5-v1_1-small, -base, -large with variant=v1_1; t5-small, t5-base
with variant=original): heads of 64, the SentencePiece vocabulary's 32128 rows (sentinels
included; the tokenizer stays `data.tokenizer`), unscaled attention logits, tanh GELU,
RMSNorm eps 1e-6, 32 relative buckets up to 128, scanned layers, data.seq_len 512.
Parameter counts equal T5ForConditionalGeneration's (tests/test_presets.py; v1_1's as
transformers loads the checkpoints, lm_head apart from the embedding):
  v1_1      small  8 x 512,   6 heads, d_ff 1024    76,961,152
            base   12 x 768,  12 heads, d_ff 2048   247,577,856
            large  24 x 1024, 16 heads, d_ff 2816   783,150,080
  original  small  6 x 512,   8 heads, d_ff 2048    60,506,624
            base   12 x 768,  12 heads, d_ff 3072   222,903,552
Tasks: pretrain (span corruption of data.name's documents; the embedded corpus by
default) or seq2seq (data.name / task.mixture as text-to-text pairs).
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=4, d_ff=128),
  "XS": dict(num_layers=4, d_model=128, num_heads=4, d_ff=256),
  "S": dict(num_layers=8, d_model=512, num_heads=6, head_dim=64, d_ff=1024),
  "M": dict(scan_layers=True, num_layers=12, d_model=768, num_heads=12, d_ff=2048),
  "L": dict(scan_layers=True, num_layers=24, d_model=1024, num_heads=16, d_ff=2816),
}
T5_RELEASE = dict(
  scan_layers=True,
  head_dim=64,
  vocab_size=32128,
  scale_attention=False,
  gelu="tanh",
  norm_eps=1e-6,
  rel_buckets=32,
  rel_max_distance=128,
)
PUBLISHED = {  # variant -> size -> its shape and release settings
  "v1_1": {
    "small": dict(num_layers=8, d_model=512, num_heads=6, d_ff=1024, **T5_RELEASE),
    "base": dict(num_layers=12, d_model=768, num_heads=12, d_ff=2048, **T5_RELEASE),
    "large": dict(num_layers=24, d_model=1024, num_heads=16, d_ff=2816, **T5_RELEASE),
  },
  "original": {
    "small": dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048, **T5_RELEASE),
    "base": dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072, **T5_RELEASE),
  },
}
VARIANTS = {
  "v1_1": dict(mlp="geglu", tie_embeddings=False),
  "original": dict(mlp="relu", tie_embeddings=True, dropout=0.1),
}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "variant": "v1_1", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "encdec"
  c.model.position = "relative"
  c.model.norm = "rmsnorm"
  c.model.norm_eps = 1e-6
  c.model.use_bias = False
  c.model.update(base.choose("variant", args["variant"], VARIANTS))
  published = PUBLISHED.get(args["variant"], {})
  c.model.update(base.choose("size", args["size"], {**SIZES, **published}))
  tasks = {"pretrain": "pretrain", "seq2seq": "seq2seq", "sft": "sft"}
  c.task.name = base.choose("task", args["task"], tasks)
  # encoder tokens; span corruption's targets then take 114 / 29
  c.data.seq_len = 512 if args["size"] in published else 128
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 100
  c.train.num_samples = 0  # span-corruption inputs hold sentinels no prompt can type
  if c.task.name in ("seq2seq", "sft"):
    c.data.target_len = 128
    c.model.dropout = 0.1
    c.train.learning_rate = 1e-3
  if c.task.name == "sft":  # inputs = the prompt, targets = the answer (docs/post_training.md)
    base.post_training(c, "sft")
  return c
