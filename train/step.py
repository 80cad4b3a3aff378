"""The pure train and eval steps: functions of `(state, batch)`.

Randomness that keeps shapes static (dropout, masks) comes from
`fold_in(state.rng, state.step)`, so a resumed run draws the same numbers.
With `train.ema_decay` > 0 the state also keeps an exponential moving average of the
params (`ema_params`), which evaluation, samples and exported weights use.

With LoRA (`model.lora.rank` > 0) `params` holds the adapters alone: they take the
gradients and the optimizer state, and `frozen` holds the base (cast or quantized,
`Trainable`), which the step merges in. DPO's frozen reference lives in `reference`. The
frozen parts are rebuilt from the initial weights on every start and never saved.

With MoE layers (modeling/moe.py) the step also reads what the forward pass sows: the
experts' loads (metrics, and the balancing bias's move after the update; the bias is a param
the optimizer skips, train/optim.py) and the optional balance loss, added to the objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from modeling import lora, moe
from train.objectives import Objective, accuracy_name


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  ema_params: dict | None = None  # train.ema_decay > 0 only
  frozen: dict | None = None  # LoRA: the base's weights, not trained (rebuilt, never saved)
  reference: dict | None = None  # DPO with task.reference=frozen: the initial weights


def model_params(params: dict, frozen: dict | None) -> dict:
  """The model's whole param tree: the trained params, with the frozen base when there is one."""
  return params if frozen is None else lora.merge(params, frozen)


def eval_params(state: TrainState) -> dict:
  """The weights a run evaluates and exports: the EMA when the run keeps one (with the base)."""
  params = state.params if state.ema_params is None else state.ema_params
  return model_params(params, state.frozen)


def saved_part(state: TrainState) -> TrainState:
  """What a checkpoint holds: the state without its frozen parts."""
  return state.replace(frozen=None, reference=None)


@dataclasses.dataclass(frozen=True)
class Trainable:
  """Which weights train: all of them, or (`adapters`) LoRA's over a frozen base held as
  `base_quant` (modeling/lora.py) or, unquantized, in `base_dtype`; `reference`: keep a
  frozen copy of the initial weights (DPO)."""

  adapters: bool = False
  base_quant: str = "none"
  base_dtype: str = "float32"
  reference: bool = False

  def split(self, params) -> tuple[dict, dict | None]:
    """(trained params, frozen base or None) of the model's initial params (boxed or not)."""
    if not self.adapters:
      return params, None
    adapters, base = lora.split(params)
    if self.base_quant != "none":
      return adapters, lora.quantize_base(base, self.base_quant)
    dtype = jnp.dtype(self.base_dtype)
    return adapters, jax.tree.map(lambda x: x.astype(dtype), base)


def ema_rate(ema_decay: float, step: jax.Array) -> jax.Array:
  """The decay used after update number `step` + 1: `ema_decay`, but at most
  (1 + step) / (10 + step), so early updates are not pinned to the random init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def make_init_params(model: nn.Module, example_batch: dict) -> Callable:
  """rng -> the model's initial params, with their logical-axis boxes."""

  def init_params(rng: jax.Array) -> dict:
    return model.init(
      rng, example_batch["tokens"], example_batch["positions"], example_batch["segment_ids"]
    )["params"]

  return init_params


def make_state_from_params(
  tx: optax.GradientTransformation, ema: bool = False, trainable: Trainable = Trainable()
) -> Callable:
  """(the model's initial params, rng) -> TrainState at step 0 (boxed in, boxed out)."""

  def state_from_params(params, rng: jax.Array) -> TrainState:
    reference = params if trainable.reference else None
    params, frozen = trainable.split(params)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      ema_params=params if ema else None,
      frozen=frozen,
      reference=reference,
    )

  return state_from_params


def make_init(
  model: nn.Module,
  tx: optax.GradientTransformation,
  example_batch: dict,
  ema: bool = False,
  trainable: Trainable = Trainable(),
) -> Callable:
  """rng -> TrainState; params keep their logical-axis boxes for sharding. `ema`: the state
  keeps a moving average of the params, starting at the init (same axes, same shardings)."""
  init_params = make_init_params(model, example_batch)
  state_from_params = make_state_from_params(tx, ema, trainable)

  def init(rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    return state_from_params(init_params(init_rng), state_rng)

  return init


class Sowing:
  """`model` whose `apply` also keeps what its layers sow (collection `intermediates`), so an
  objective's forward pass hands the MoE layers' loads to the step; `sown` holds the last
  pass's."""

  def __init__(self, model: nn.Module):
    self.model, self.sown = model, {}

  def __getattr__(self, name: str):
    return getattr(self.model, name)

  def apply(self, variables, *args, **kwargs):
    out, state = self.model.apply(variables, *args, mutable=["intermediates"], **kwargs)
    self.sown = state.get("intermediates", {})
    return out


class QuantMix:
  """`model` whose `apply` also passes a conversion's lambda `mix` (a traced scalar) as the
  variable `quant/mix`, which the blocks read (modeling/quant.py: x + mix (q(x) - x))."""

  def __init__(self, model: nn.Module, mix: jax.Array):
    self.model, self.mix = model, mix

  def __getattr__(self, name: str):
    return getattr(self.model, name)

  def apply(self, variables, *args, **kwargs):
    return self.model.apply({**variables, "quant": {"mix": self.mix}}, *args, **kwargs)


def routing(model: nn.Module) -> moe.Moe | None:
  """The model's MoE config when it has MoE layers (a stack of only `first_dense_layers`
  has none)."""
  cfg = getattr(model, "cfg", None)
  m = getattr(cfg, "moe", None)
  layers = max(cfg.num_layers, cfg.num_decoder_layers) if m is not None else 0
  return m if m is not None and any(m.is_moe(i) for i in range(layers)) else None


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
  quant_mix: Callable | None = None,
) -> Callable:
  """(state, batch) -> (state, metrics); gradients of the mean loss over all targets.
  `ema_decay` > 0 also updates `state.ema_params` (see `ema_rate`). `quant_mix`: step ->
  a conversion's lambda (`QuantMix`), logged as train/quant_mix."""

  routed = routing(model)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)
    reference = {} if state.reference is None else {"reference": state.reference}
    net = model if quant_mix is None else QuantMix(model, quant_mix(state.step))

    def sums_and_grads(params, batch, rng):
      def loss_fn(p):
        full = model_params(p, state.frozen)
        sowing = Sowing(net) if routed else net
        sums = objective(sowing, full, batch, rng, deterministic=False, **reference)
        loss, counts = sums["loss_sum"], {}
        if routed:  # the MoE layers' counts, and L_Bal per target like the loss's sum
          counts = {
            **moe.sown_counts(full, sowing.sown),
            "moe_balance": moe.balance_total(sowing.sown),
          }
          loss = loss + routed.balance_loss * counts["moe_balance"] * sums["weight"]
        return loss, (sums, counts)

      return jax.grad(loss_fn, has_aux=True)(params)

    if grad_accum == 1:
      grads, (sums, counts) = sums_and_grads(state.params, batch, rng)
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
      (grads, (sums, counts)), _ = jax.lax.scan(body, zeros, jnp.arange(grad_accum))
    denom = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      "train/loss": sums["loss_sum"] / denom,
      **{f"train/{accuracy_name(k)}": v / denom for k, v in sums.items() if k.endswith("correct")},
      **{
        f"train/{k}": v / denom for k, v in sums.items() if "/" in k and not k.startswith("rows/")
      },
      "train/grad_norm": optax.tree.norm(grads),
      "train/learning_rate": schedule(state.step),
      "train/tokens": sums["weight"],
    }
    if quant_mix is not None:
      metrics["train/quant_mix"] = net.mix
    if routed:
      if routed.bias_update_rate > 0:
        params = moe.update_bias(params, counts["moe_loads"], routed.bias_update_rate)
      moe_metrics = {**moe.load_metrics(counts), **moe.bias_range(params)}
      moe_metrics["moe/balance_loss"] = counts["moe_balance"] / grad_accum
      metrics.update({f"train/{k}": v for k, v in moe_metrics.items()})
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
  """(params, batch) -> sums over the batch, to be added over the split. `reference`: DPO's
  frozen reference weights, when it has them; `mix`: a conversion's lambda (`QuantMix`).
  MoE models add their layers' counts (`moe.sown_counts`)."""

  def eval_step(params, batch: dict, reference=None, mix=None) -> dict:
    kw = {} if reference is None else {"reference": reference}  # objectives without one
    net = model if mix is None else QuantMix(model, mix)
    if not routing(model):
      return objective(net, params, batch, jax.random.PRNGKey(0), deterministic=True, **kw)
    sowing = Sowing(net)
    sums = objective(sowing, params, batch, jax.random.PRNGKey(0), deterministic=True, **kw)
    return {**sums, **moe.sown_counts(params, sowing.sown)}

  return eval_step
