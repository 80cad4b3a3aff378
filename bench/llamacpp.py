"""Running a GGUF in llama.cpp (llama-cpp-python) next to fourfold: greedy continuations,
teacher-forced loss on a run's validation text. Used by bench.llamacpp_agreement and
bench.deploy; llama_cpp is imported only where a model is opened (the `llamacpp` extra)."""

from __future__ import annotations

import jax
import numpy as np

from modeling import decoding
from train.data.sources import load_documents


def open_gguf(path: str, n_ctx: int, logits_all: bool = True, threads: int | None = None):
  """A llama-cpp-python model (imported here: the `llamacpp` extra is optional)."""
  from llama_cpp import Llama

  return Llama(
    model_path=path,
    n_ctx=n_ctx,
    logits_all=logits_all,
    n_threads=threads,
    n_threads_batch=threads,
    verbose=False,
  )


def fourfold_greedy(model, params, prompt: np.ndarray, n: int) -> np.ndarray:
  return decoding.generate(
    model, params, prompt[None], n, jax.random.PRNGKey(0), temperature=0.0, eos_id=-1
  )[0]


def llamacpp_greedy(llm, prompt: np.ndarray, n: int) -> np.ndarray:
  llm.reset()
  out = []
  for tok in llm.generate(prompt.tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
    out.append(tok)
    if len(out) == n:
      break
  return np.asarray(out)


def agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, int]:
  """(tokens equal, length of the identical prefix)."""
  same = ours == theirs
  return int(same.sum()), int(np.argmin(same)) if not same.all() else int(same.size)


def validation_windows(config, tokenizer, n_tokens: int, length: int) -> np.ndarray:
  """[W, length] token ids: the run's evaluation text (data.eval_name, else data.name's
  validation split), documents encoded and concatenated, cut into whole windows."""
  name = config.data.eval_name or config.data.name
  split = "all" if config.data.eval_name else "validation"
  ids, total = [], 0
  for doc in load_documents(name, split, config.data):
    ids.append(tokenizer.encode(doc))
    total += ids[-1].size
    if total >= n_tokens:
      break
  flat = np.concatenate(ids)[: min(total, n_tokens)]
  w = flat.size // length
  if not w:
    raise ValueError(f"{name}: {flat.size} validation tokens, fewer than one window of {length}")
  return flat[: w * length].reshape(w, length).astype(np.int32)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Per-position negative log-likelihood of `targets` under `logits` [..., V], float64."""
  z = logits.astype(np.float64)
  z = z - z.max(-1, keepdims=True)
  logz = np.log(np.exp(z).sum(-1))
  return logz - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def fourfold_loss(model, params, windows: np.ndarray) -> tuple[float, np.ndarray]:
  """Mean next-token loss (nats) over the windows, each read from position 0, and the
  argmax predictions [W, length - 1]."""
  apply = jax.jit(lambda p, x, pos: model.apply({"params": p}, x, pos, jax.numpy.ones_like(pos)))
  losses, preds = [], []
  for w in windows:
    pos = np.arange(w.size, dtype=np.int32)[None]
    logits, _ = apply(params, w[None], pos)
    logits = np.asarray(logits[0, :-1], np.float32)
    losses.append(nll(logits, w[1:]))
    preds.append(logits.argmax(-1))
  return float(np.mean(losses)), np.stack(preds)


def llamacpp_loss(llm, windows: np.ndarray) -> tuple[float, np.ndarray]:
  """The same through llama.cpp's logits (the model opened with logits_all)."""
  losses, preds = [], []
  for w in windows:
    llm.reset()
    llm.eval(w.tolist())
    logits = np.asarray(llm.scores[: w.size - 1], np.float32)
    losses.append(nll(logits, w[1:]))
    preds.append(logits.argmax(-1))
  return float(np.mean(losses)), np.stack(preds)
