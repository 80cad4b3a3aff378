"""Does llama.cpp run the exported model as fourfold does? Greedy tokens, logits and loss.

pip install -e '.[llamacpp]'   # llama-cpp-python, which compiles llama.cpp
python -m bench.llamacpp_agreement --workdir=runs/bitnet --prompt="ROMEO:" --num_tokens=100
python -m bench.llamacpp_agreement --workdir=runs/llama --gguf_type=Q4_0

Exports the workdir to GGUF (eval/gguf_export.py: a BitNet run as llama.cpp's bitnet
architecture, a float Llama / GPT preset as its llama / gpt2), loads it with
llama-cpp-python, and compares, from the same token ids (fourfold's tokenizer; llama.cpp's
tokenization of the prompt is checked too):
  1. greedy continuations: how many of the first --num_tokens agree, and where they split;
  2. teacher-forced next-token argmax along fourfold's greedy sequence: the share of
     positions where both pick the same token, and the largest logit difference;
  3. the loss (nats per token) of both on --loss_tokens tokens of the run's validation
     text, teacher-forced in windows of the model's context, and how often their
     next-token argmax agrees there.
Numbers differ a little by design. BitNet: llama.cpp quantizes activations to 8 bits per
block of 256 values (Q8_K) and accumulates in integers; fourfold quantizes per token and
accumulates in float32. Float models: llama.cpp sums in its own order (and F16 / Q8_0 /
Q4_0 round the weights; Q8_0 and Q4_0 also round the activations to 8 bits per block of 32).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import app, flags

from bench.llamacpp import (
  agreement,
  fourfold_greedy,
  fourfold_loss,
  llamacpp_greedy,
  llamacpp_loss,
  open_gguf,
  validation_windows,
)
from eval.gguf_export import GGUF_TYPES, write_gguf
from train import console
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a decoder run (BitNet, Llama or GPT preset)")
flags.DEFINE_string("prompt", "ROMEO:", "the prompt both continue")
flags.DEFINE_integer("num_tokens", 100, "greedy tokens to compare")
flags.DEFINE_enum("gguf_type", "", ["", *GGUF_TYPES], "empty: TQ2_0 for BitNet, F16 otherwise")
flags.DEFINE_integer("loss_tokens", 4096, "validation tokens for the loss; 0: skip it")
flags.DEFINE_string("gguf", "", "where to write the GGUF; empty: a temporary file")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup(FLAGS.workdir)
  config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  path = FLAGS.gguf or os.path.join(tempfile.mkdtemp(), "model.gguf")
  out = write_gguf(FLAGS.workdir, path, FLAGS.gguf_type)
  print(f"{path}: {out['file_bytes'] / 2**20:.3f} MiB, {out['bits_per_weight']:.4f} bits/weight")
  prompt = tokenizer.encode(FLAGS.prompt)
  n = min(FLAGS.num_tokens, model.cfg.max_len - prompt.size)
  ours = fourfold_greedy(model, params, prompt, n)
  llm = open_gguf(path, model.cfg.max_len)
  theirs_prompt = llm.tokenize(FLAGS.prompt.encode(), add_bos=False, special=False)
  print(f"prompt tokens equal: {list(theirs_prompt) == prompt.tolist()} ({prompt.size} tokens)")
  theirs = llamacpp_greedy(llm, prompt, n)
  equal, split = agreement(ours, theirs)
  print(f"greedy: {equal}/{n} tokens equal; identical prefix {split} tokens")
  print(f"fourfold : {FLAGS.prompt + tokenizer.decode(ours)!r}")
  print(f"llama.cpp: {FLAGS.prompt + tokenizer.decode(theirs)!r}")

  # teacher forcing along fourfold's sequence: both models see the same tokens
  seq = np.concatenate([prompt, ours]).astype(np.int32)
  llm.reset()
  llm.eval(seq.tolist())
  theirs_logits = np.asarray(llm.scores[: seq.size], np.float32)
  pos = np.arange(seq.size, dtype=np.int32)[None]
  ours_logits, _ = model.apply({"params": params}, seq[None], pos, np.ones_like(pos))
  ours_logits = np.asarray(ours_logits[0], np.float32)
  agree = ours_logits.argmax(-1) == theirs_logits.argmax(-1)
  diff = np.abs(ours_logits - theirs_logits)
  print(
    f"teacher-forced argmax: {int(agree.sum())}/{seq.size} positions agree; logits max abs "
    f"diff {diff.max():.4f}, mean {diff.mean():.5f} (logit std {ours_logits.std():.3f})"
  )
  if FLAGS.loss_tokens:
    windows = validation_windows(config, tokenizer, FLAGS.loss_tokens, model.cfg.max_len)
    ours_loss, ours_pred = fourfold_loss(model, params, windows)
    theirs_loss, theirs_pred = llamacpp_loss(llm, windows)
    print(
      f"validation text, {windows.size} tokens in {len(windows)} windows of {windows.shape[1]}: "
      f"loss fourfold {ours_loss:.4f}, llama.cpp {theirs_loss:.4f} nats/token; next-token "
      f"argmax equal at {int((ours_pred == theirs_pred).sum())}/{ours_pred.size} positions"
    )


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
