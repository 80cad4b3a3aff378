"""nanoGPT's published CPU Shakespeare-char setting (val loss 1.88 nats/char).

python -m train.main --config=configs/repro/shakespeare_char_cpu.py --workdir=runs/shakespeare

4 layers, 4 heads, d_model 128 (d_ff 512), context 64, batch 12, 2000 steps,
learning rate 1e-3 (100 warmup steps, cosine decay to 1e-4), AdamW betas
(0.9, 0.99), weight decay 0.1, clip 1.0, no dropout; byte-level tokens, which
are characters for this ASCII file.

Data: TFDS `tiny_shakespeare` (downloaded on first use), whose splits cut the text where
nanoGPT does: `train` is its first int(0.9 n) = 1,003,854 characters, `validation` and `test`
(55,770 each) together its last 111,540, so evaluation reads `validation+test`, whole (two
documents, so one more end-of-document token is scored than in one text).
Offline, the same file (char-rnn's input.txt, 1,115,394 bytes) as a local text source:

python -m train.main --config=configs/repro/shakespeare_char_cpu.py --workdir=runs/shakespeare \
    --config.data.name=text:path/to/input.txt

A local text source holds out its last n // 10 = 111,539 bytes, so its training text is
1,003,855 bytes: one character more than nanoGPT's (and TFDS's), its validation one less.
"""

from configs import gpt


def get_config(arg: str | None = None):
  c = gpt.get_config("size=XS")
  c.data.name = "tiny_shakespeare"  # offline: text:<input.txt> (see above)
  c.data.eval_split = "validation+test"  # nanoGPT's validation text: the last 10%
  c.data.seq_len = 64
  c.data.shuffle_window = 16384  # > the 15.7k rows of an epoch: batches drawn from the whole text
  c.model.dropout = 0.0
  c.train.steps = 2000
  c.train.batch_size = 12
  c.train.learning_rate = 1e-3
  c.train.min_learning_rate = 1e-4
  c.train.warmup_steps = 100
  c.train.schedule = "cosine"
  c.train.b1, c.train.b2 = 0.9, 0.99
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.eval_every = 250
  c.train.eval_steps = 0
  c.train.eval_batch_size = 64
  c.train.checkpoint_every = 500
  c.train.sample_prompts = "ROMEO:|JULIET:|First Citizen:"
  return c
