"""Encoders: BERT, RoBERTa, ALBERT and a modern pre-norm encoder, pretrained with MLM.

`--config=configs/bert.py:size=tiny,arch=roberta,task=pretrain`. Tasks: pretrain (MLM on
packed documents), classify (default glue/sst2), regress (default glue/stsb), ner (default
conll2003), embed (contrastive on glue/stsb pairs, scored by Spearman); fine-tune
from a pretrained workdir with `--config.init_from=<workdir>`. Any `jsonl:<glob>` source
works too: classify reads records {"text", "label"} (its field name follows `data.name`:
glue/sst2's 'sentence' applies only while it names glue/sst2), regress and embed
{"sentence1", "sentence2", "label"}, ner {"tokens", "ner"} (make_ner_task writes "tags":
`--config.task.label_field=tags`). Sizes (every size has d_ff =
4 x d_model and as many key/value heads as heads, both following overrides; see README
for parameter counts):
  tiny  2 x 64,   4 heads    tests, CPU
  XS    4 x 128,  4 heads    CPU-sized (default)
  S     6 x 384,  6 heads
  M     12 x 768, 12 heads   BERT-base's body
  L     24 x 1024, 16 heads  BERT-large's body
As published, with arch=bert (bert-base-uncased, bert-large-uncased) or arch=roberta
(roberta-base, roberta-large): the published vocabulary's rows (the tokenizer stays
`data.tokenizer`), 512 learned positions, exact (erf) GELU, scanned layers; bert has 2
token types and LayerNorm eps 1e-12, roberta 1 token type, eps 1e-5 and position ids
from 2 (514 position rows). MLM parameter counts equal BertForMaskedLM's /
RobertaForMaskedLM's (tests/test_presets.py; neither has BERT's pooler, nor has our MLM
model; classify adds it):
  base   12 x 768, 12 heads    bert 109,514,298   roberta 124,697,433
  large  24 x 1024, 16 heads   bert 335,174,458   roberta 355,412,057
Archs (default modern: it learns at CPU sizes; the others are the published recipes, whose
learned absolute positions sit on a long plateau at small budgets, see the README):
  bert     post-norm, learned positions, token-type embeddings, GELU, dropout 0.1
  roberta  bert without token types (masking is dynamic for every arch: drawn in the step)
  albert   bert with a factorized embedding (width d_model / 4, at most 128) and one set
           of weights shared by all layers
  modern   pre-norm, RMSNorm, RoPE, SwiGLU, no biases, no dropout (default)
  deberta  DeBERTa-v3: bert without token types or absolute positions in the input;
           disentangled attention over 256 log buckets per side up to 512, a relative
           table shared by all layers, and for MLM the enhanced mask decoder (2 passes of
           one block that sees absolute positions); see docs/deberta.md
"""

from configs import base

SIZES = {
  "tiny": dict(num_layers=2, d_model=64, num_heads=4),
  "XS": dict(num_layers=4, d_model=128, num_heads=4),
  "S": dict(num_layers=6, d_model=384, num_heads=6),
  "M": dict(num_layers=12, d_model=768, num_heads=12),
  "L": dict(num_layers=24, d_model=1024, num_heads=16),
}  # num_kv_heads = num_heads and d_ff = 4 x d_model: base.py's derived defaults
BERT = dict(
  norm_position="post",
  position="learned",
  norm="layernorm",
  norm_eps=1e-12,
  mlp="gelu",
  use_bias=True,
  type_vocab_size=2,
  dropout=0.1,
)
ARCHS = {
  "bert": BERT,
  "roberta": {**BERT, "type_vocab_size": 0},
  "albert": {**BERT, "share_layers": True},  # embed_dim follows d_model, below
  "deberta": {
    **BERT,
    "type_vocab_size": 0,
    "position": "disentangled",
    "position_buckets": 256,
    "max_relative_positions": 512,
    "emd_layers": 2,
    "norm_eps": 1e-7,
    "gelu": "erf",
  },
  "modern": dict(
    norm_position="pre",
    position="rope",
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="swiglu",
    use_bias=False,
    type_vocab_size=0,
    dropout=0.0,
  ),
}
BERT_RELEASE = dict(scan_layers=True, vocab_size=30522, max_len=512, gelu="erf")
ROBERTA_RELEASE = {
  **BERT_RELEASE,
  "vocab_size": 50265,
  "type_vocab_size": 1,
  "norm_eps": 1e-5,
  "position_offset": 2,  # position ids start after the padding id: 514 rows
}
PUBLISHED = {  # arch -> size -> its shape and release settings, set after the arch's
  "bert": {"base": {**SIZES["M"], **BERT_RELEASE}, "large": {**SIZES["L"], **BERT_RELEASE}},
  "roberta": {
    "base": {**SIZES["M"], **ROBERTA_RELEASE},
    "large": {**SIZES["L"], **ROBERTA_RELEASE},
  },
}
# task -> (task keys, data keys, fields): the defaults name a TFDS dataset; fields maps
# "section.key" to (its feature in that dataset, its name in any other source).
TASKS = {
  "pretrain": (dict(name="pretrain"), {}, {}),
  "classify": (
    dict(name="classify", num_labels=2, label_field="label"),
    dict(name="glue/sst2"),
    {"data.text_field": ("sentence", "text")},
  ),
  "ner": (dict(name="ner", label_field="ner", tokens_field="tokens"), dict(name="conll2003"), {}),
  "embed": (
    dict(name="embed", pooling="mean", label_field="label", text_pair_field="sentence2"),
    dict(name="glue/stsb", text_field="sentence1"),
    {},
  ),
  "regress": (
    dict(name="regress", label_field="label", text_pair_field="sentence2"),
    dict(name="glue/stsb", text_field="sentence1"),
    {},
  ),
}


def _albert_embed_dim(d_model: int) -> int:
  return min(128, d_model // 4)  # ALBERT's E is 128; CPU sizes narrower than 512 use d / 4


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "XS", "arch": "modern", "task": "pretrain"})
  c = base.get_config()
  c.model.family = "encoder"
  c.model.tie_embeddings = True
  c.model.update(base.choose("arch", args["arch"], ARCHS))
  published = PUBLISHED.get(args["arch"], {})
  if args["size"] not in published and any(args["size"] in p for p in PUBLISHED.values()):
    archs = sorted(a for a, p in PUBLISHED.items() if args["size"] in p)
    raise ValueError(
      f"config argument size={args['size']!r}: a published size of arch in {archs}, "
      f"not of arch={args['arch']!r}"
    )
  c.model.update(base.choose("size", args["size"], {**SIZES, **published}))
  if args["arch"] == "albert":
    c.model.embed_dim = base.derived(c.model, "d_model", _albert_embed_dim)
  task, data, fields = base.choose("task", args["task"], TASKS)
  c.task.update(task)
  c.data.update(data)
  for key, (there, elsewhere) in fields.items():
    section, _, leaf = key.partition(".")
    c[section][leaf] = base.source_field(c, data["name"], there, elsewhere)
  c.data.seq_len = 128
  c.train.update(
    dict(batch_size=32, learning_rate=1e-3, min_learning_rate=1e-4, eval_every=200, num_samples=0)
  )
  return c
