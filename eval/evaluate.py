"""Evaluating a trained workdir outside of training (used by `python -m eval.main`)."""

from __future__ import annotations

import flax.linen as nn
import jax

from modeling import registry
from train import sharding
from train.step import make_eval_step
from train.trainer import load_for_inference, run_eval


def evaluate_workdir(
  workdir: str,
  tasks: list[str],
  eval_name: str = "",
  eval_steps: int = 0,
  batch_size: int = 0,
  beam_size: int = 0,
  eval_decode: int = -1,
) -> dict[str, dict[str, float]]:
  """{task: metrics} for the checkpoint's task on its evaluation split (or `eval_name`).

  A checkpoint carries one head, so the tasks it can be evaluated on are its own.
  Seq2seq decoding: `beam_size` (0: the run's task.beam_size) and `eval_decode` examples
  decoded (-1: the run's task.eval_decode).
  """
  config, model, params, tokenizer = load_for_inference(workdir)
  own = config.task.name
  for name in tasks:
    if name != own:
      raise ValueError(
        f"--tasks={','.join(tasks)}: {workdir} holds a {config.model.family} trained for "
        f"task.name={own!r}; it can be evaluated on ['{own}'] only"
      )
  config.data.eval_name = eval_name or config.data.eval_name
  config.train.eval_steps = eval_steps
  if beam_size:
    config.task.beam_size = beam_size
  if eval_decode >= 0:
    config.task.eval_decode = eval_decode
  if batch_size:
    config.train.eval_batch_size = batch_size
  _, objective = registry.build(config, tokenizer.vocab_size)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  rows = config.train.eval_batch_size or config.train.batch_size
  if rows % jax.device_count():
    raise ValueError(f"--batch_size={rows}: must be divisible by the {jax.device_count()} devices")
  batch_sh = sharding.batch_sharding(mesh)
  eval_step = jax.jit(make_eval_step(model, objective), out_shardings=sharding.replicated(mesh))

  def to_global(local):
    return sharding.to_global(local, batch_sh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return {own: run_eval(config, tokenizer, params, eval_step, to_global, model)}
