"""The pure train and eval steps: functions of `(state, batch)`.

Randomness that keeps shapes static (dropout, masks) comes from
`fold_in(state.rng, state.step)`, so a resumed run draws the same numbers.
With `train.ema_decay` > 0 the state also keeps an exponential moving average of the
params (`ema_params`), which evaluation, samples and exported weights use.
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
  ema_params: dict | None = None  # train.ema_decay > 0 only


def eval_params(state: TrainState) -> dict:
  """The weights a run evaluates and exports: the EMA when the run keeps one."""
  return state.params if state.ema_params is None else state.ema_params


def ema_rate(ema_decay: float, step: jax.Array) -> jax.Array:
  """The decay used after update number `step` + 1: `ema_decay`, but at most
  (1 + step) / (10 + step), so early updates are not pinned to the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_init(
  model: nn.Module, tx: optax.GradientTransformation, example_batch: dict, ema: bool = False
) -> Callable:
  """rng -> TrainState; params keep their logical-axis boxes for sharding. `ema`: the state
  keeps a moving average of the params, starting at the init (same axes, same shardings)."""

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(
      init_rng, example_batch["tokens"], example_batch["positions"], example_batch["segment_ids"]
    )["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
      ema_params=params if ema else None,
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
  ema_decay: float = 0.0,
) -> Callable:
  """(state, batch) -> (state, metrics); gradients of the mean loss over all targets.
  `ema_decay` > 0 also updates `state.ema_params` (see `ema_rate`)."""

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
    if ema_decay > 0:
      if state.ema_params is None:
        raise ValueError("ema_decay > 0 needs a state made by make_init(..., ema=True)")
      d = ema_rate(ema_decay, state.step)
      ema = jax.tree.map(
        lambda e, p: (e + (1.0 - d) * (p - e)).astype(e.dtype), state.ema_params, params
      )
      new_state = new_state.replace(ema_params=ema)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module, objective: Objective) -> Callable:
  """(params, batch) -> sums over the batch, to be added over the split."""

  def eval_step(params, batch: dict) -> dict:
    return objective(model, params, batch, jax.random.PRNGKey(0), deterministic=True)

  return eval_step
