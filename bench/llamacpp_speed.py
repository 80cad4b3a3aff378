"""One GGUF's speed and memory in llama.cpp, in a process of its own (bench.deploy runs it).

python -m bench.llamacpp_speed MODEL.gguf THREADS PROMPT_TOKENS GEN_TOKENS

Prints one JSON line: prompt processing tokens/s (PROMPT_TOKENS ids in one batch, fresh
cache), generation tokens/s (GEN_TOKENS greedy tokens, one llama_decode each), the peak
resident set of this process (the weights llama.cpp mapped and touched, its buffers and
cache) and the same before the model was loaded, and the load average when it started.
Imports llama_cpp and NumPy only, so the baseline is small.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np


def measure(path: str, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
  from llama_cpp import Llama

  load = os.getloadavg()[0]
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  llm = Llama(
    model_path=path,
    n_ctx=prompt_tokens + gen_tokens + 8,
    n_batch=prompt_tokens,
    n_threads=threads,
    n_threads_batch=threads,
    verbose=False,
  )
  rng = np.random.default_rng(0)
  prompt = rng.integers(8, min(llm.n_vocab(), 264), prompt_tokens).tolist()  # byte ids
  llm.eval(prompt[:8])  # warm-up: first-touch of the weights, thread pool
  llm.reset()
  start = time.perf_counter()
  llm.eval(prompt)
  pp = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(gen_tokens):
    tok = llm.sample(top_k=1, top_p=1.0, min_p=0.0, temp=0.0)
    llm.eval([tok])
  tg = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {
    "threads": threads,
    "pp_tokens_per_s": prompt_tokens / pp,
    "tg_tokens_per_s": gen_tokens / tg,
    "peak_rss_mib": peak / 1024,
    "baseline_rss_mib": before / 1024,
    "load": load,
  }


if __name__ == "__main__":
  path, threads, prompt_tokens, gen_tokens = sys.argv[1], *map(int, sys.argv[2:5])
  print(json.dumps(measure(path, threads, prompt_tokens, gen_tokens)))
