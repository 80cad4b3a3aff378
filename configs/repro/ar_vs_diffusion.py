"""AR against masked diffusion on the same data, backbone and budget (MDLM's comparison).

python -m train.main --config=configs/repro/ar_vs_diffusion.py:side=ar --workdir=runs/cmp_ar
python -m train.main --config=configs/repro/ar_vs_diffusion.py:side=diffusion --workdir=runs/cmp_mdlm

Offline, add `--config.data.name=text:path/to/input.txt` (see configs/repro/shakespeare_char_cpu.py
for how the two routes split the text).

Both sides: 4 layers, 4 heads, d_model 128, d_ff 512, context 128, batch 32, 1500 steps on
Tiny Shakespeare (TFDS `tiny_shakespeare`; byte-level tokens = characters), learning rate
1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW (0.9, 0.99), weight decay 0.1, no
dropout. The last 10% of the text (TFDS's validation+test) is evaluated whole. The AR side is `configs/gpt.py:size=tiny`
widened to these dimensions; the diffusion side is `configs/mdlm.py:size=tiny` likewise, and
its eval/loss is the NELBO bound in nats per token, so the two eval/loss values compare.
"""

from configs import base

SIDES = {"ar": "gpt", "diffusion": "mdlm"}


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"side": "ar"})
  preset = base.choose("side", args["side"], SIDES)
  module = __import__(f"configs.{preset}", fromlist=["get_config"])
  c = module.get_config("size=tiny")
  c.model.update(dict(num_layers=4, num_heads=4, d_model=128, d_ff=512))
  c.model.dropout = 0.0
  c.data.name = "tiny_shakespeare"  # offline: text:<input.txt>
  c.data.eval_split = "validation+test"  # the last 10% of the text, as nanoGPT's validation
  c.data.seq_len = 128
  c.data.shuffle_window = 16384  # more than an epoch's rows: batches drawn from the whole text
  c.train.update(
    dict(
      steps=1500,
      batch_size=32,
      learning_rate=1e-3,
      min_learning_rate=1e-4,
      warmup_steps=100,
      schedule="cosine",
      b1=0.9,
      b2=0.99,
      weight_decay=0.1,
      grad_clip=1.0,
      eval_every=250,
      eval_steps=0,
      eval_batch_size=64,
      checkpoint_every=500,
      sample_prompts="ROMEO:|JULIET:|First Citizen:",
    )
  )
  return c
