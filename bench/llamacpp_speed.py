"""One GGUF's speed and memory in llama.cpp, in a process of its own (bench.deploy runs it).

python -m bench.llamacpp_speed MODEL.gguf THREADS PROMPT_TOKENS GEN_TOKENS

Prints one JSON line: prompt processing tokens/s (PROMPT_TOKENS ids in one batch, fresh
cache), generation tokens/s (GEN_TOKENS greedy tokens, one llama_decode each), the resident
set of this process before the model is loaded (Python, NumPy, llama_cpp) and its peak from
then on (the weights llama.cpp mapped and touched, its buffers and cache: the high-water
mark is reset through /proc/self/clear_refs after the imports), and the load average when
it started.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def status_mib(key: str) -> float:
  """VmRSS / VmHWM of this process, MiB (Linux)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024
  raise KeyError(key)


def measure(path: str, threads: int, prompt_tokens: int, gen_tokens: int) -> dict:
  from llama_cpp import Llama

  load = os.getloadavg()[0]
  before = status_mib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
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
  peak = status_mib("VmHWM")
  return {
    "threads": threads,
    "pp_tokens_per_s": prompt_tokens / pp,
    "tg_tokens_per_s": gen_tokens / tg,
    "peak_rss_mib": peak,
    "baseline_rss_mib": before,
    "load": load,
  }


if __name__ == "__main__":
  path, threads, prompt_tokens, gen_tokens = sys.argv[1], *map(int, sys.argv[2:5])
  print(json.dumps(measure(path, threads, prompt_tokens, gen_tokens)))
