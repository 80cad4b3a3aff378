"""Tiny training jobs, run in a process whose devices the caller chose.

`python -m tests.sharding.runner '<json>'` runs the jobs of a JSON list in order and
prints one line `RESULT <json>` with a result per job. The parent test sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` before this process starts,
which is the only way to give JAX simulated devices. `tiny_config` is also what the
single-device side of each comparison uses, so both sides run the same config.
"""

from __future__ import annotations

import dataclasses
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


SEPARATOR = "<|endoftext|>"  # between the corpus's documents, as TinyStories' text file


def write_corpus(path: str) -> str:
  """One text file of the repository's own Python paragraphs, separated by `SEPARATOR`:
  deterministic, no download."""
  docs = []
  for sub in ("modeling", "train"):
    for name in sorted(os.listdir(os.path.join(REPO, sub))):
      if name.endswith(".py"):
        with open(os.path.join(REPO, sub, name)) as f:
          docs += [p for p in f.read().split("\n\n") if p.strip()]
  with open(path, "w") as f:
    f.write(SEPARATOR.join(docs[:400]))
  return f"text:{path}"


def tiny_config(corpus: str, overrides: dict | None = None):
  """Tiny Llama (16 heads / 8 kv heads: legal on tensor=8), batch 16 of 32 tokens."""
  c = llama.get_config("size=tiny")
  c.data.name = corpus
  c.data.seq_len = 32
  c.data.shuffle_window = 16
  c.data.doc_separator = SEPARATOR  # no data.shards: global batches never depend on processes
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


def moe_dispatch_job(job: dict) -> dict:
  """One MoE layer (8 experts, top-2 of 2 groups, a shared expert) on mesh `job["mesh"]`
  (data, expert, fsdp, tensor) against no mesh, dropless and at capacity_factor `job["cf"]`:
  the outputs' and gradients' largest differences, the dropped counts, and the all-to-alls
  in the lowered program."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from modeling.moe import Moe, MoeMlp, route

  x = jax.random.normal(jax.random.key(0), (8, 6, 32))
  seg = jnp.ones((8, 6), jnp.int32)
  mesh = Mesh(np.array(jax.devices()).reshape(job["mesh"]), ("data", "expert", "fsdp", "tensor"))
  batch = ("data", "expert", "fsdp")
  rules = (("act_batch", batch), ("expert", "expert"), ("mlp", "tensor"), ("embed", "fsdp"))
  out = {}
  for name, cf in (("dropless", 0.0), ("capacity", job["cf"])):
    m = Moe(num_experts=8, top_k=2, n_group=2, topk_group=1, expert_d_ff=16, num_shared_experts=1)
    layer = MoeMlp(moe=dataclasses.replace(m, capacity_factor=cf))
    params = layer.init(jax.random.key(1), x, seg)

    def apply(p, x, layer=layer):
      y, sown = layer.apply(p, x, seg, mutable=["intermediates"])
      return y, sown["intermediates"]["dropped"][0], sown["intermediates"]["load"][0]

    grad = jax.grad(lambda p, x, apply=apply: jnp.sum(apply(p, x)[0] ** 2))
    ref, _, _ = jax.jit(apply)(params, x)
    ref_grad = jax.jit(grad)(params, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec(batch)))
      got, dropped, _ = jax.jit(apply)(params, xs)
      got_grad = jax.jit(grad)(params, xs)
      text = jax.jit(apply).lower(params, xs).as_text()
    out[name] = {
      "max_diff": float(jnp.max(jnp.abs(got - ref))),
      "max_ref": float(jnp.max(jnp.abs(ref))),
      "grad_diff": max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(ref_grad), strict=True)
      ),
      "dropped": float(dropped),
      "all_to_all": text.count("all_to_all"),
    }
  # What the capacity run must drop: each device's assignments to each expert shard beyond
  # C = ceil(cf * T_local * K / shards), from the same routing on one device.
  p = nn.unbox(params)["params"]
  experts_TK, _, _ = route(x.reshape(-1, 32) @ p["router"], p["expert_bias"], layer.moe)
  shards, devices = job["mesh"][1], job["mesh"][0] * job["mesh"][1] * job["mesh"][2]
  per_device = np.asarray(experts_TK).reshape(devices, -1) // (8 // shards)
  c = int(np.ceil(job["cf"] * per_device.shape[1] / shards))
  counts = np.stack([np.bincount(row, minlength=shards) for row in per_device])
  out["capacity"]["expected_dropped"] = float(np.maximum(counts - c, 0).sum())
  return out


JOBS = {
  "train": train_job,
  "memory": memory_job,
  "specs": specs_job,
  "moe_dispatch": moe_dispatch_job,
}


def main(spec: str) -> None:
  results = [JOBS[job["kind"]](job) for job in json.loads(spec)]
  print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
