"""Does llama.cpp run the exported BitNet model as fourfold does? Greedy tokens and logits.

pip install -e '.[llamacpp]'   # llama-cpp-python, which compiles llama.cpp
python -m bench.llamacpp_agreement --workdir=runs/bitnet --prompt="ROMEO:" --num_tokens=100

Exports the workdir to GGUF (eval/gguf_export.py), loads it with llama-cpp-python, and
compares, from the same token ids (fourfold's byte tokenizer; llama.cpp's tokenization of
the prompt is checked too):
  1. greedy continuations: how many of the first --num_tokens agree, and where they split;
  2. teacher-forced next-token argmax along fourfold's greedy sequence: the share of
     positions where both pick the same token, and the largest logit difference.
Numbers differ a little by design: llama.cpp quantizes activations to 8 bits per block of
256 values (Q8_K) and accumulates in integers; fourfold quantizes per token (here one block
when the width is 256) and accumulates in float32.
"""

from __future__ import annotations

import os
import tempfile

import jax
import numpy as np
from absl import app, flags

from eval.gguf_export import write_gguf
from modeling import decoding
from train import console
from train.trainer import load_for_inference

flags.DEFINE_string("workdir", None, "a BitNet run (configs/bitnet.py)", required=True)
flags.DEFINE_string("prompt", "ROMEO:", "the prompt both continue")
flags.DEFINE_integer("num_tokens", 100, "greedy tokens to compare")
flags.DEFINE_string("gguf", "", "where to write the GGUF; empty: a temporary file")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  console.setup(FLAGS.workdir)
  from llama_cpp import Llama  # optional dependency: pip install -e '.[llamacpp]'

  config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  path = FLAGS.gguf or os.path.join(tempfile.mkdtemp(), "model.gguf")
  write_gguf(FLAGS.workdir, path)
  prompt = tokenizer.encode(FLAGS.prompt)
  n = min(FLAGS.num_tokens, model.cfg.max_len - prompt.size)
  ours = decoding.generate(
    model, params, prompt[None], n, jax.random.PRNGKey(0), temperature=0.0, eos_id=-1
  )[0]
  llm = Llama(model_path=path, n_ctx=model.cfg.max_len, logits_all=True, verbose=False)
  theirs_prompt = llm.tokenize(FLAGS.prompt.encode(), add_bos=False, special=False)
  print(f"prompt tokens equal: {list(theirs_prompt) == prompt.tolist()} ({prompt.size} tokens)")
  theirs = []
  for tok in llm.generate(prompt.tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
    theirs.append(tok)
    if len(theirs) == n:
      break
  theirs = np.asarray(theirs)
  same = ours == theirs
  split = int(np.argmin(same)) if not same.all() else n
  print(f"greedy: {int(same.sum())}/{n} tokens equal; identical prefix {split} tokens")
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


if __name__ == "__main__":
  app.run(main)
