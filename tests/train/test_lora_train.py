"""LoRA in the training loop: only the adapters train and hold optimizer state, the frozen
base (float, NF4 or packed ternary) stays bit for bit, checkpoints hold the adapters alone
and resume exactly, DPO's adapter_base reference is the base, and bad targets are named."""

from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.tiny_models import tiny_config
from train import families, sharding, trainer
from train.data import chat
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics


def conversation(i: int) -> dict:
  word = "".join("abcdefgh"[(i * 7 + k * 3) % 8] for k in range(3 + i % 4))
  return {"prompt": f"reverse: {word}", "response": word[::-1], "chosen": word[::-1]}


def write(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return f"jsonl:{path}"


@pytest.fixture(scope="module")
def data_name(tmp_path_factory):
  rows = [conversation(i) | {"rejected": conversation(i + 1)["response"]} for i in range(40)]
  return write(tmp_path_factory.mktemp("lora") / "chat.jsonl", rows)


def lora_config(data_name, task="sft", base_quant="none", **train):
  c = tiny_config("llama", f"task={task}", name=data_name, seq_len=48)
  c.model.lora.rank, c.model.lora.base_quant = 4, base_quant
  c.model.lora.targets = "(attn/(query|value)|mlp/down)$"
  if base_quant == "ternary":
    c.model.quant = "bitnet158"
  if task == "dpo":
    c.task.reference = "adapter_base"
  c.train.update(
    dict(batch_size=4, steps=4, warmup_steps=0, schedule="constant", log_every=1)
    | dict(eval_every=0, checkpoint_every=2, peak_tflops=1.0, learning_rate=1e-2)
  )
  c.train.update(train)
  return c


def start(config):
  """(model, objective, state at step 0, jitted step, a batch) for a config."""
  tok = ByteTokenizer()
  model, objective = families.resolve(config).build(config, tok)
  tx = trainer.make_optimizer(config.train)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  abstract, shardings, _ = trainer.abstract_state(config, model, tx, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = trainer.initial_state(config, model, tx, shardings, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh)
  step = sharding.jit_train_step(
    trainer.config_train_step(config, model, objective, tx), shardings, batch_sh
  )
  task = families.resolve(config).task
  local = next(task.train_iterator(config, tok, batch_size=4, seed=0))
  return model, objective, state, step, sharding.to_global(local, batch_sh), (mesh, rules)


@pytest.mark.parametrize("base_quant", ["none", "nf4", "ternary"])
def test_only_adapters_train_and_the_base_stays_bit_for_bit(data_name, base_quant):
  """(The float base is held in bfloat16 here: model.lora.base_dtype.)"""
  config = lora_config(data_name, base_quant=base_quant)
  if base_quant == "none":
    config.model.lora.base_dtype = "bfloat16"
  _, _, state, step, batch, (mesh, rules) = start(config)
  if base_quant == "none":
    assert state.frozen["block_0"]["attn"]["query"]["kernel"].dtype == jax.numpy.bfloat16
  names = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert names == {"lora_a", "lora_b"}
  # the optimizer holds Adam's two moments of the adapters, nothing of the base
  opt_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert opt_sizes == 2 * sum(x.size for x in jax.tree.leaves(state.params))
  base = jax.tree.map(np.asarray, state.frozen)
  adapters = jax.tree.map(np.asarray, state.params)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(6):
      state, metrics = step(state, batch)
      losses.append(float(metrics["train/loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), base)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, adapters)
  assert all(jax.tree.leaves(changed))
  assert losses[-1] < losses[0] - 0.1, losses
  if base_quant == "nf4":
    assert {k for p, _ in jax.tree_util.tree_flatten_with_path(base)[0] for k in [p[-1].key]} >= {
      "kernel_nf4",
      "kernel_absmax",
    }


def test_checkpoints_hold_the_adapters_alone_and_resume_exactly(data_name, tmp_path):
  config = lora_config(data_name)
  trainer.run(config, str(tmp_path / "straight"))
  half = config.copy_and_resolve_references()
  half.train.steps = 2
  trainer.run(half, str(tmp_path / "resumed"))
  trainer.run(config, str(tmp_path / "resumed"))
  straight, resumed = (read_metrics(str(tmp_path / d)) for d in ("straight", "resumed"))
  assert [m["step"] for m in resumed] == [1, 2, 3, 4]
  assert [m["train/loss"] for m in resumed] == [m["train/loss"] for m in straight]
  state_dir = tmp_path / "straight" / "checkpoints" / "4" / "state"
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(str(state_dir)).item_metadata.tree
  saved = {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}
  assert saved == {"lora_a", "lora_b"} and not tree.get("frozen")
  # what a reader gets: the base rebuilt and the adapters, as the run ended
  _, model, params, _ = trainer.load_for_inference(str(tmp_path / "straight"))
  assert {"kernel", "lora_a", "lora_b"} <= set(params["block_0"]["attn"]["query"])
  size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(state_dir) for f in fs)
  assert size < 200_000  # the adapters and their Adam moments, not the base's megabyte


def test_dpo_adapter_base_reference_is_the_base_at_step_zero(data_name):
  """At init B = 0, so the policy is the base: DPO's loss is ln 2 and every reward 0, with
  the reference computed by the same model without its adapters."""
  config = lora_config(data_name, task="dpo")
  model, objective, state, _, batch, (mesh, rules) = start(config)
  params = trainer.model_params(state.params, state.frozen)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sums = jax.jit(lambda p, b: objective(model, p, b, jax.random.key(0), True))(params, batch)
  assert abs(float(sums["loss_sum"]) / float(sums["weight"]) - math.log(2)) < 1e-6
  assert float(sums["rewards/margin"]) == 0.0 and float(sums["rewards/accuracy"]) == 0.0


def test_targets_that_match_nothing_list_the_layers(data_name):
  config = lora_config(data_name)
  config.model.lora.targets = "attn/nothing$"
  tok = ByteTokenizer()
  model, _ = families.resolve(config).build(config, tok)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  with pytest.raises(ValueError, match=r"matches no layer.*block_0/attn/query.*mlp/down"):
    trainer.abstract_state(config, model, trainer.make_optimizer(config.train), mesh, rules)


def test_chat_data_for_lora_reads_prompt_response_rows(data_name):
  c = lora_config(data_name)
  convs = chat.conversations(c, "train")
  assert convs[0] == [
    {"role": "user", "content": conversation(0)["prompt"]},
    {"role": "assistant", "content": conversation(0)["response"]},
  ]
