"""Fine-grained mixture of experts with DeepSeek-V3's routing (DeepSeek-AI 2024, arXiv:2412.19437).

For a token u (D features) and E routed experts (SwiGLU of width `expert_d_ff`):

  s_i        = sigmoid(u . e_i)                     affinity, in float32 (the router)
  chosen     = TopK(s_i + b_i, top_k)               b: the balancing bias, for choosing only;
                                                    group-limited: experts fall into n_group
                                                    groups, a group scores the sum of its two
                                                    best s_i + b_i, only the topk_group best
                                                    groups are eligible
  g_i        = s_i / sum_{j in chosen} s_j          for i chosen (the UNBIASED scores), else 0
  h          = sum_{i shared} FFN_i(u) + routed_scaling_factor * sum_i g_i FFN_i(u)

The shared experts are one SwiGLU of width num_shared_experts * expert_d_ff, added unweighted.

Auxiliary-loss-free balancing: b is not trained. After each step every MoE layer moves it
by b_i += rate * sign(mean_j load_j - load_i), where load_i counts the tokens routed to
expert i in the step's batch (`update_bias`, from the loads the forward pass sows). The
optional sequence-wise balance loss (eq. 17-20): per sequence of T tokens,
  f_i = E / (K T) sum_t 1[i chosen for t],  P_i = 1/T sum_t s_i,t / sum_j s_j,t,
  L_Bal = sum_i f_i P_i   (averaged over the batch's sequences, summed over the layers).

Three ways to run the routed experts (`Moe.impl`, `Moe.capacity_factor`):
  ragged    dropless: assignments sorted by expert, `jax.lax.ragged_dot` over the groups
  dense     dropless: every expert on every token, weighted by the (mostly zero) gates
  capacity  capacity_factor > 0: each expert takes at most C = ceil(capacity_factor * T * K
            / E) assignments (first choices first, then in token order); the rest are
            dropped (their gate contributes nothing) and counted; dense einsums.

On a mesh whose `expert` axis is larger than 1 (and splits the tokens too, as the default
`act_batch` rule does), impl='ragged', with or without a capacity, runs expert-parallel
(`expert_parallel`, in `jax.shard_map`): each device sorts its own tokens' assignments by
expert, sends each expert shard its rows with one all-to-all over `expert`, runs its local
experts with `ragged_dot`, and gets the results back with a second all-to-all. Each (device,
expert shard) buffer holds C = T_local * K rows when dropless (exact), else ceil(capacity_factor
* T_local * K / S) for S expert shards, the overflow dropped and counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from modeling.layers import DotGeneral, Mlp, mesh_axes, param_with_axes

IMPLS = ("ragged", "dense")  # the dropless paths; capacity_factor > 0 selects the capacity path
BIAS = "expert_bias"  # the balancing bias's param name: not trained (train/optim.py skips it)


@dataclasses.dataclass(frozen=True)
class Moe:
  """The MoE layers of a stack; num_experts 0: every layer keeps the dense MLP."""

  num_experts: int = 0
  top_k: int = 1
  num_shared_experts: int = 0
  expert_d_ff: int = 0
  first_dense_layers: int = 0  # the first layers keep the dense MLP (DeepSeek-V3: 3)
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  capacity_factor: float = 0.0  # <= 0: dropless
  impl: str = "ragged"  # ragged | dense: the dropless path
  bias_update_rate: float = 0.0  # gamma of the bias update; 0: the bias stays 0
  balance_loss: float = 0.0  # alpha of the sequence-wise balance loss; 0: off

  def is_moe(self, layer: int) -> bool:
    return self.num_experts > 0 and layer >= self.first_dense_layers


def route(
  logits_TE: jax.Array, bias_E: jax.Array, m: Moe
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen experts [T, K], their gate weights [T, K], the scores s [T, E]), float32.

  The bias only picks experts; the weights come from the unbiased scores."""
  scores_TE = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
  choice_TE = scores_TE + bias_E.astype(jnp.float32)
  if m.n_group > 1:
    t, e = choice_TE.shape
    grouped_TGX = choice_TE.reshape(t, m.n_group, e // m.n_group)
    best2_TGX, _ = lax.top_k(grouped_TGX, min(2, e // m.n_group))
    _, kept_TK = lax.top_k(best2_TGX.sum(-1), m.topk_group)
    kept_TG = jax.nn.one_hot(kept_TK, m.n_group, dtype=jnp.bool_).any(axis=1)
    kept_TE = jnp.repeat(kept_TG, e // m.n_group, axis=1)
    choice_TE = jnp.where(kept_TE, choice_TE, -jnp.inf)
  _, experts_TK = lax.top_k(choice_TE, m.top_k)
  chosen_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=1)
  gates_TK = chosen_TK / (chosen_TK.sum(-1, keepdims=True) + 1e-20) * m.routed_scaling_factor
  return experts_TK, gates_TK, scores_TE


def balance_loss(scores_BLE: jax.Array, experts_BLK: jax.Array, valid_BL: jax.Array) -> jax.Array:
  """DeepSeek-V3's sequence-wise L_Bal (without its alpha), averaged over the sequences."""
  e, k = scores_BLE.shape[-1], experts_BLK.shape[-1]
  v_BL = valid_BL.astype(jnp.float32)
  n_B = jnp.maximum(v_BL.sum(-1), 1.0)
  hits_BLE = jax.nn.one_hot(experts_BLK, e).sum(-2) * v_BL[..., None]
  f_BE = e / (k * n_B[:, None]) * hits_BLE.sum(1)
  p_BLE = scores_BLE / scores_BLE.sum(-1, keepdims=True) * v_BL[..., None]
  p_BE = p_BLE.sum(1) / n_B[:, None]
  return jnp.mean(jnp.sum(f_BE * p_BE, -1))


def capacity(m: Moe, tokens: int) -> int:
  """Assignments each expert takes on the capacity path."""
  return max(1, math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts))


def swiglu_ragged(x_AD, gate_EDF, up_EDF, down_EFD, sizes_E):
  """Rows of x_AD sorted by expert, sizes_E of them per expert -> each row through its expert."""
  h_AF = nn.silu(lax.ragged_dot(x_AD, gate_EDF, sizes_E)) * lax.ragged_dot(x_AD, up_EDF, sizes_E)
  return lax.ragged_dot(h_AF.astype(x_AD.dtype), down_EFD, sizes_E)


def swiglu_batched(x_EXD, gate_EDF, up_EDF, down_EFD, dot_general: DotGeneral):
  """x_EXD [E, X, D]: every expert on its own rows, through `dot_general` per expert (so a
  quantizer's scales are per expert)."""

  def one(x_XD, gate_DF, up_DF, down_FD):
    mm = lambda a, b: dot_general(a, b, (((1,), (0,)), ((), ())))  # noqa: E731
    h_XF = nn.silu(mm(x_XD, gate_DF)) * mm(x_XD, up_DF)
    return mm(h_XF.astype(x_XD.dtype), down_FD)

  return jax.vmap(one)(x_EXD, gate_EDF, up_EDF, down_EFD)


class MoeMlp(nn.Module):
  """x [B, L, D] -> the shared experts plus the gated routed experts. Sows per layer
  (collection `intermediates`): `load` [E] (assignments of valid tokens per expert), `dropped`
  and `assigned` (counts), `balance` (L_Bal)."""

  moe: Moe
  dtype: jnp.dtype = jnp.float32
  out_init_scale: float = 0.02
  dot_general: DotGeneral = lax.dot_general
  sub_norm: dict | None = None

  @nn.compact
  def __call__(self, x_BLD: jax.Array, seg_BL: jax.Array) -> jax.Array:
    m, dt = self.moe, self.dtype
    b, length, d = x_BLD.shape
    e, f, k = m.num_experts, m.expert_d_ff, m.top_k
    x_TD = x_BLD.reshape(b * length, d).astype(dt)
    router_DE = param_with_axes(
      self, "router", nn.initializers.normal(0.02), (d, e), ("embed", None)
    )
    bias_E = lax.stop_gradient(param_with_axes(self, BIAS, nn.initializers.zeros, (e,), (None,)))
    logits_TE = x_TD.astype(jnp.float32) @ router_DE
    experts_TK, gates_TK, scores_TE = route(logits_TE, bias_E, m)

    init = nn.initializers.normal(0.02)
    gate_EDF = param_with_axes(self, "expert_gate", init, (e, d, f), ("expert", "embed", "mlp"))
    up_EDF = param_with_axes(self, "expert_up", init, (e, d, f), ("expert", "embed", "mlp"))
    down_EFD = param_with_axes(
      self,
      "expert_down",
      nn.initializers.normal(self.out_init_scale),
      (e, f, d),
      ("expert", "mlp", "embed"),
    )
    weights = [w.astype(dt) for w in (gate_EDF, up_EDF, down_EFD)]
    mesh_axes = expert_mesh(b) if m.impl == "ragged" else None
    if mesh_axes:
      y_TD, kept_TK = expert_parallel(x_TD, experts_TK, gates_TK, weights, m, mesh_axes)
    elif m.capacity_factor > 0:
      y_TD, kept_TK = self.capacity_path(x_TD, experts_TK, gates_TK, weights)
    elif m.impl == "ragged":
      y_TD, kept_TK = self.ragged_path(x_TD, experts_TK, gates_TK, weights)
    else:
      y_TD, kept_TK = self.dense_path(x_TD, experts_TK, gates_TK, weights)

    valid_TK = jnp.broadcast_to((seg_BL > 0).reshape(-1, 1), experts_TK.shape)
    self.sow("intermediates", "load", jnp.zeros(e).at[experts_TK].add(valid_TK))
    self.sow("intermediates", "dropped", jnp.sum(valid_TK & ~kept_TK, dtype=jnp.float32))
    self.sow("intermediates", "assigned", jnp.sum(valid_TK, dtype=jnp.float32))
    if m.balance_loss > 0:
      scores_BLE = scores_TE.reshape(b, length, e)
      lbal = balance_loss(scores_BLE, experts_TK.reshape(b, length, k), seg_BL > 0)
      self.sow("intermediates", "balance", lbal)
    y_BLD = y_TD.reshape(b, length, d).astype(dt)
    if m.num_shared_experts:
      y_BLD = y_BLD + Mlp(
        d_ff=m.num_shared_experts * f,
        kind="swiglu",
        use_bias=False,
        dtype=dt,
        out_init_scale=self.out_init_scale,
        dot_general=self.dot_general,
        sub_norm=self.sub_norm,
        name="shared",
      )(x_BLD)
    return y_BLD

  def dense_path(self, x_TD, experts_TK, gates_TK, weights):
    """Every expert on every token; the gates [T, E] (zero where not chosen) mix them."""
    e = self.moe.num_experts
    t = x_TD.shape[0]
    combine_TE = jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], experts_TK].add(gates_TK)
    x_ETD = jnp.broadcast_to(x_TD, (e, *x_TD.shape))
    y_ETD = swiglu_batched(x_ETD, *weights, self.dot_general)
    y_TD = jnp.einsum("etd,te->td", y_ETD.astype(jnp.float32), combine_TE)
    return y_TD, jnp.ones(experts_TK.shape, jnp.bool_)

  def ragged_path(self, x_TD, experts_TK, gates_TK, weights):
    """Dropless: the T*K assignments sorted by expert, one ragged matmul per projection."""
    e, k = self.moe.num_experts, self.moe.top_k
    experts_A = experts_TK.reshape(-1)
    order_A = jnp.argsort(experts_A, stable=True)
    token_A = order_A // k
    sizes_E = jnp.bincount(experts_A, length=e).astype(jnp.int32)
    y_AD = swiglu_ragged(x_TD[token_A], *weights, sizes_E)
    gate_A = gates_TK.reshape(-1)[order_A]
    y_TD = (
      jnp.zeros(x_TD.shape, jnp.float32).at[token_A].add(y_AD.astype(jnp.float32) * gate_A[:, None])
    )
    return y_TD, jnp.ones(experts_TK.shape, jnp.bool_)

  def capacity_path(self, x_TD, experts_TK, gates_TK, weights):
    """Each expert takes its first C assignments (first choices of every token before any
    second choice); dispatch and combine are dense one-hot einsums [T, E, C]."""
    e = self.moe.num_experts
    c = capacity(self.moe, x_TD.shape[0])
    onehot_KTE = jax.nn.one_hot(experts_TK.T, e, dtype=jnp.int32)
    slot_KTE = jnp.cumsum(onehot_KTE.reshape(-1, e), axis=0).reshape(onehot_KTE.shape) - 1
    slot_TK = jnp.sum(slot_KTE * onehot_KTE, -1).T
    kept_TK = slot_TK < c
    dispatch_TKEC = (
      jax.nn.one_hot(experts_TK, e)[..., None] * jax.nn.one_hot(slot_TK, c)[..., None, :]
    ) * kept_TK[..., None, None]
    dispatch_TEC = dispatch_TKEC.sum(1)
    combine_TEC = jnp.einsum("tkec,tk->tec", dispatch_TKEC, gates_TK)
    x_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC.astype(x_TD.dtype), x_TD)
    y_ECD = swiglu_batched(x_ECD, *weights, self.dot_general)
    y_TD = jnp.einsum("tec,ecd->td", combine_TEC, y_ECD.astype(jnp.float32))
    return y_TD, kept_TK


def expert_mesh(rows: int) -> tuple | None:
  """(expert axis, token axes, mlp axes) of the current mesh and logical-axis rules when the
  routed experts run expert-parallel: an `expert` axis larger than 1 that also splits the
  batch's `rows`; else None (the single-program paths, partitioned by XLA)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  expert, batch, mlp = (
    mesh_axes(nn.logical_to_mesh_axes((n,))[0]) for n in ("expert", "act_batch", "mlp")
  )
  if len(expert) != 1 or mesh.shape[expert[0]] == 1 or expert[0] not in batch:
    return None
  if rows % math.prod(mesh.shape[a] for a in batch):
    return None
  return expert[0], batch, mlp


def expert_parallel(x_TD, experts_TK, gates_TK, weights, m: Moe, mesh_axes: tuple):
  """The routed experts over an expert mesh axis: (y [T, D] float32, kept [T, K])."""
  ep, batch, mlp = mesh_axes
  mlp_axis = mlp if mlp else None
  rows, experts = P(batch, None), P(ep, None, mlp_axis)
  fn = jax.shard_map(
    partial(_dispatch, moe=m, ep=ep, mlp=mlp),
    in_specs=(rows, rows, rows, experts, experts, P(ep, mlp_axis, None)),
    out_specs=(rows, rows),
  )
  return fn(x_TD, experts_TK, gates_TK, *weights)


def _dispatch(x_TD, experts_TK, gates_TK, gate_EDF, up_EDF, down_EFD, *, moe, ep, mlp):
  """One device's part of `expert_parallel`: its tokens [T, D], its experts [E/S, ...]."""
  (t, d), k, local = x_TD.shape, moe.top_k, gate_EDF.shape[0]
  shards = moe.num_experts // local
  a = t * k
  c = a if moe.capacity_factor <= 0 else max(1, math.ceil(moe.capacity_factor * a / shards))
  experts_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(experts_A, stable=True)
  sorted_A = experts_A[order_A]
  token_A = order_A // k
  shard_A = sorted_A // local
  count_S = jnp.bincount(shard_A, length=shards)
  slot_A = jnp.arange(a) - (jnp.cumsum(count_S) - count_S)[shard_A]
  kept_A = slot_A < c
  send_SCD = (
    jnp.zeros((shards, c, d), x_TD.dtype).at[shard_A, slot_A].set(x_TD[token_A], mode="drop")
  )
  ids_SC = (
    jnp.full((shards, c), local, jnp.int32).at[shard_A, slot_A].set(sorted_A % local, mode="drop")
  )
  recv_RD = lax.all_to_all(send_SCD, ep, 0, 0).reshape(shards * c, d)
  ids_R = lax.all_to_all(ids_SC, ep, 0, 0).reshape(-1)
  order_R = jnp.argsort(ids_R, stable=True)  # padding (id = local) sorts last, in no group
  sizes_E = jnp.bincount(ids_R, length=local).astype(jnp.int32)
  y_RD = swiglu_ragged(recv_RD[order_R], gate_EDF, up_EDF, down_EFD, sizes_E)
  y_RD = jnp.zeros_like(y_RD).at[order_R].set(y_RD)
  if mlp:
    y_RD = lax.psum(y_RD, mlp)
  back_SCD = lax.all_to_all(y_RD.reshape(shards, c, d), ep, 0, 0)
  y_AD = back_SCD[shard_A, jnp.minimum(slot_A, c - 1)].astype(jnp.float32)
  gate_A = jnp.where(kept_A, gates_TK.reshape(-1)[order_A], 0.0)
  y_TD = jnp.zeros((t, d), jnp.float32).at[token_A].add(y_AD * gate_A[:, None])
  kept_TK = jnp.zeros(a, jnp.bool_).at[order_A].set(kept_A).reshape(t, k)
  return y_TD, kept_TK


# ---- what the forward pass sows, read by the train step ---------------------------------


def _walk(params: Mapping, sown: Mapping, path=()):
  """(path, the module's params, its sown values) of every MoE layer (a module with a bias)."""
  for key, value in params.items():
    if isinstance(value, Mapping):
      yield from _walk(value, sown.get(key, {}), (*path, key))
  if BIAS in params:
    yield path, params, sown


def update_bias(params: Mapping, loads_NE: jax.Array, rate: float) -> dict:
  """params with every MoE layer's bias moved by rate * sign(mean load - load) (DeepSeek-V3),
  from `sown_counts`' loads [MoE layers, E]; scanned groups hold [layers, E] biases."""
  moved, row = {}, 0
  for path, p, _ in _layers(params, {}):
    n = p[BIAS].size // p[BIAS].shape[-1]
    load = loads_NE[row : row + n].reshape(p[BIAS].shape)
    moved[path] = p[BIAS] + rate * jnp.sign(load.mean(-1, keepdims=True) - load)
    row += n

  def put(tree: Mapping, path=()) -> dict:
    out = {k: put(v, (*path, k)) if isinstance(v, Mapping) else v for k, v in tree.items()}
    if path in moved:
      out[BIAS] = moved[path]
    return out

  return put(params)


def _layers(params: Mapping, sown: Mapping) -> list:
  """`_walk`'s MoE layers in stack order."""
  return sorted(_walk(params, sown), key=lambda item: _layer_order(item[0]))


def sown_counts(params: Mapping, sown: Mapping) -> dict[str, jax.Array]:
  """The MoE layers' sown counts, which add up over batches: `moe_loads` [layers, E] (the
  MoE layers in stack order), `moe_dropped` and `moe_assigned`; {} without MoE layers."""
  layers = _layers(params, sown)
  if not layers:
    return {}
  return {
    "moe_loads": jnp.concatenate(
      [s["load"][0].reshape(-1, p[BIAS].shape[-1]) for _, p, s in layers]
    ),
    "moe_dropped": sum(jnp.sum(s["dropped"][0]) for _, _, s in layers),
    "moe_assigned": sum(jnp.sum(s["assigned"][0]) for _, _, s in layers),
  }


def load_metrics(counts: Mapping) -> dict[str, jax.Array]:
  """`load_max_over_mean_{i}` per MoE layer i (1: perfectly balanced) and `dropped_fraction`
  (of the valid tokens' assignments), from `sown_counts`."""
  load_NE = jnp.asarray(counts["moe_loads"])
  ratio_N = load_NE.max(-1) / jnp.maximum(load_NE.mean(-1), 1e-9)
  out = {f"moe/load_max_over_mean_{i}": ratio_N[i] for i in range(load_NE.shape[0])}
  out["moe/dropped_fraction"] = counts["moe_dropped"] / jnp.maximum(counts["moe_assigned"], 1.0)
  return out


def bias_range(params: Mapping) -> dict[str, jax.Array]:
  """`moe/bias_min`, `moe/bias_max` over every MoE layer's balancing bias."""
  biases = [p[BIAS] for _, p, _ in _walk(params, {})]
  return {
    "moe/bias_min": jnp.min(jnp.stack([jnp.min(b) for b in biases])),
    "moe/bias_max": jnp.max(jnp.stack([jnp.max(b) for b in biases])),
  }


def _layer_order(path: tuple[str, ...]) -> tuple:
  """Stack order: scanned groups dense_blocks < blocks, looped block_i by i."""
  name = path[-2] if len(path) > 1 else ""
  digits = name.rsplit("_", 1)[-1]
  return (path[:-2], int(digits) if digits.isdigit() else -1, name)


def balance_total(sown: Mapping) -> jax.Array:
  """The sum of every MoE layer's sown L_Bal (0 when none is sown)."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(sown)[0]:
    if any(getattr(p, "key", None) == "balance" for p in path):
      total = total + jnp.sum(leaf)
  return total
