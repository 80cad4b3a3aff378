"""The pure train and eval steps: functions of `(state, batch)`.

Randomness that keeps shapes static (dropout, masks) comes from
`fold_in(state.rng, state.step)`, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from train.objectives import Objective, accuracy_name


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def make_init(model: nn.Module, tx: optax.GradientTransformation, example_batch: dict) -> Callable:
  """rng -> TrainState; params keep their logical-axis boxes for sharding."""

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(
      init_rng, example_batch["tokens"], example_batch["positions"], example_batch["segment_ids"]
    )["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )

  return init


def _split_microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [B/n, n, ...]: microbatch i is rows i, i+n, ...; each keeps the batch
  dimension's data-parallel sharding, so splitting moves no data between devices."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]), batch)


def make_train_step(
  model: nn.Module,
  objective: Objective,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  grad_accum: int = 1,
) -> Callable:
  """(state, batch) -> (state, metrics); gradients of the mean loss over all targets."""

  def sums_and_grads(params, batch, rng):
    def loss_fn(p):
      sums = objective(model, p, batch, rng, deterministic=False)
      return sums["loss_sum"], sums

    return jax.grad(loss_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum == 1:
      grads, sums = sums_and_grads(state.params, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum)

      def body(carry, i):
        g, s = sums_and_grads(
          state.params, jax.tree.map(lambda x: x[:, i], micro), jax.random.fold_in(rng, i)
        )
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.eval_shape(
        sums_and_grads, state.params, jax.tree.map(lambda x: x[:, 0], micro), rng
      )
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))
    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "train/loss": sums["loss_sum"] / denom,
      **{f"train/{accuracy_name(k)}": v / denom for k, v in sums.items() if k.endswith("correct")},
      "train/grad_norm": optax.tree.norm(grads),
      "train/learning_rate": schedule(state.step),
      "train/tokens": sums["weight"],
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective) -> Callable:
  """(params, batch) -> sums over the batch, to be added over the split."""

  def eval_step(params, batch: dict) -> dict:
    return objective(model, params, batch, jax.random.PRNGKey(0), deterministic=True)

  return eval_step
