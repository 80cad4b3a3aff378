"""Tiny training jobs, run in a process whose devices the caller chose.

`python -m tests.sharding.runner '<json>'` runs the jobs of a JSON list in order and
prints one line `RESULT <json>` with a result per job. The parent test sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` before this process starts,
which is the only way to give JAX simulated devices. `tiny_config` is also what the
single-device side of each comparison uses, so both sides run the same config.
"""

from __future__ import annotations

import json
import os
import sys

from configs import llama

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_env(devices: int) -> dict[str, str]:
  """This process's environment for a child with `devices` simulated CPU devices: the count
  appended to XLA_FLAGS, so flags set already (tests/conftest.py's) carry over."""
  count = f"--xla_force_host_platform_device_count={devices}"
  flags = f"{os.environ.get('XLA_FLAGS', '')} {count}".strip()
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


def write_corpus(path: str) -> str:
  """A JSONL corpus of the repository's own Python paragraphs: deterministic, no download."""
  docs = []
  for sub in ("modeling", "train"):
    for name in sorted(os.listdir(os.path.join(REPO, sub))):
      if name.endswith(".py"):
        with open(os.path.join(REPO, sub, name)) as f:
          docs += [p for p in f.read().split("\n\n") if p.strip()]
  with open(path, "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs[:400])
  return f"jsonl:{path}"


def tiny_config(corpus: str, overrides: dict | None = None):
  """Tiny Llama (16 heads / 8 kv heads: legal on tensor=8), batch 16 of 32 tokens."""
  c = llama.get_config("size=tiny")
  c.data.name = corpus
  c.data.seq_len = 32
  c.data.shuffle_window = 16
  c.data.shards = 2  # global batches independent of the process count (1 or 2 here)
  c.train.update(
    dict(
      steps=4,
      batch_size=16,
      learning_rate=3e-3,
      warmup_steps=0,
      schedule="constant",
      log_every=1,
      eval_every=0,
      eval_steps=2,
      checkpoint_every=100,
      num_samples=0,
      peak_tflops=1.0,
    )
  )
  c.update_from_flattened_dict(overrides or {})
  return c


def losses(workdir: str) -> dict[int, float]:
  from train.metrics import read_metrics

  by_step = {}
  for r in read_metrics(workdir):
    if "train/loss" in r:
      by_step[r["step"]] = r["train/loss"]
  return by_step


def train_job(job: dict) -> dict:
  from train import trainer

  last = trainer.run(tiny_config(job["corpus"], job.get("overrides")), job["workdir"])
  return {"losses": losses(job["workdir"]), "last": last}


def memory_job(job: dict) -> dict:
  """Bytes of params + optimizer state per device after the sharded init, and in all."""
  import flax.linen as nn
  import jax

  from train import families, sharding
  from train.data.tokenizers import ByteTokenizer
  from train.optim import make_optimizer
  from train.trainer import abstract_state

  c = tiny_config(job["corpus"], job.get("overrides"))
  model, _ = families.resolve(c).build(c, ByteTokenizer())
  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules(c)
  abstract, shardings, init_fn = abstract_state(c, model, make_optimizer(c.train), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = sharding.sharded_init(init_fn, jax.random.PRNGKey(0), shardings)
  held = sharding.bytes_per_device({"params": state.params, "opt_state": state.opt_state})
  total = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
  return {"per_device": sorted(held.values()), "total": total, "devices": len(held)}


def specs_job(job: dict) -> dict:
  """The mesh partition spec of every parameter, by path (no init: the abstract state)."""
  import jax

  from train import families, sharding
  from train.data.tokenizers import ByteTokenizer
  from train.optim import make_optimizer
  from train.trainer import abstract_state

  c = tiny_config(job["corpus"], job.get("overrides"))
  model, _ = families.resolve(c).build(c, ByteTokenizer())
  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules(c)
  _, shardings, _ = abstract_state(c, model, make_optimizer(c.train), mesh, rules)
  flat = jax.tree_util.tree_leaves_with_path(shardings.params)
  return {jax.tree_util.keystr(k): [a for a in s.spec] for k, s in flat}


JOBS = {"train": train_job, "memory": memory_job, "specs": specs_job}


def main(spec: str) -> None:
  results = [JOBS[job["kind"]](job) for job in json.loads(spec)]
  print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
