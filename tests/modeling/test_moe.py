"""DeepSeek-V3 routing against a float64 NumPy reference, the three expert paths against each
other, the dense-MLP limit, the balancing bias's update, and scanned == looped stacks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from modeling import moe
from modeling.layers import Mlp
from modeling.moe import Moe, MoeMlp
from modeling.transformer import Transformer
from tests.tiny_models import draw_params, tiny, tiny_config
from train.optim import make_optimizer

D, T = 16, 24


def route_ref(logits, bias, m: Moe):
  """Float64 NumPy DeepSeek-V3 routing: (chosen experts as sets, {expert: gate} per token)."""
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  choice = s + bias
  e = s.shape[1]
  per = e // m.n_group
  chosen, gates = [], []
  for t in range(s.shape[0]):
    groups = choice[t].reshape(m.n_group, per)
    gscore = np.sort(groups, axis=1)[:, -min(2, per) :].sum(1)
    kept = np.argsort(-gscore, kind="stable")[: m.topk_group]
    eligible = [i for i in range(e) if i // per in kept]
    top = sorted(eligible, key=lambda i: -choice[t, i])[: m.top_k]
    w = s[t, top] / s[t, top].sum() * m.routed_scaling_factor
    chosen.append(set(top))
    gates.append(dict(zip(top, w, strict=True)))
  return chosen, gates, kept


def jax_route(logits, bias, m):
  experts, gates, _ = moe.route(jnp.asarray(logits, jnp.float32), jnp.asarray(bias), m)
  return np.asarray(experts), np.asarray(gates)


def test_group_limited_routing_matches_reference_and_stays_in_kept_groups():
  rng = np.random.default_rng(0)
  m = Moe(num_experts=16, top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
  logits, bias = rng.normal(size=(64, 16)), rng.normal(scale=0.3, size=16)
  experts, gates = jax_route(logits, bias, m)
  chosen, ref_gates, _ = route_ref(logits, bias, m)
  for t in range(64):
    assert set(experts[t]) == chosen[t]
    np.testing.assert_allclose([ref_gates[t][i] for i in experts[t]], gates[t], rtol=1e-5)
    # every chosen expert lies in one of the topk_group groups with the best top-2 sums
    choice = 1 / (1 + np.exp(-logits[t])) + bias
    gscore = np.sort(choice.reshape(4, 4), axis=1)[:, -2:].sum(1)
    kept = set(np.argsort(-gscore)[:2])
    assert {i // 4 for i in experts[t]} <= kept
  np.testing.assert_allclose(gates.sum(-1), 2.5, rtol=1e-5)


def test_a_large_bias_changes_the_choice_not_the_weights():
  rng = np.random.default_rng(1)
  m = Moe(num_experts=8, top_k=2)
  logits = rng.normal(size=(32, 8))
  bias = np.zeros(8)
  bias[[5, 6]] = 100.0  # experts 5 and 6 win every choice
  experts0, _ = jax_route(logits, np.zeros(8), m)
  experts, gates = jax_route(logits, bias, m)
  assert all(set(row) == {5, 6} for row in experts)
  assert any(set(row) != {5, 6} for row in experts0)  # without the bias they were not chosen
  s = 1 / (1 + np.exp(-logits))
  want = np.take_along_axis(s, experts, 1) / np.take_along_axis(s, experts, 1).sum(1, keepdims=True)
  np.testing.assert_allclose(gates, want, rtol=1e-5)  # unbiased scores, normalized


def moe_params(m: Moe, seed=0):
  module = MoeMlp(m)
  x, seg = jnp.zeros((2, T // 2, D)), jnp.ones((2, T // 2), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), x, seg)["params"]
  return draw_params(abstract, seed)


@functools.partial(jax.jit, static_argnums=0)
def apply(m: Moe, params, x_BLD, seg_BL=None):
  seg_BL = jnp.ones(x_BLD.shape[:2], jnp.int32) if seg_BL is None else seg_BL
  out, state = MoeMlp(m).apply({"params": params}, x_BLD, seg_BL, mutable=["intermediates"])
  return out, state["intermediates"]


def test_one_expert_top1_is_the_dense_swiglu_mlp():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, T // 2, D)), jnp.float32)
  for extra in (dict(impl="ragged"), dict(impl="dense"), dict(capacity_factor=1.0)):
    m = Moe(num_experts=1, top_k=1, expert_d_ff=32, **extra)
    p = moe_params(m)
    mlp = {
      "gate": {"kernel": p["expert_gate"][0]},
      "up": {"kernel": p["expert_up"][0]},
      "down": {"kernel": p["expert_down"][0]},
    }
    want = Mlp(32, "swiglu", use_bias=False).apply({"params": mlp}, x)
    got, _ = apply(m, p, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


SHARED = Moe(num_experts=8, top_k=2, num_shared_experts=1, expert_d_ff=32, n_group=2, topk_group=1)


def test_ragged_dense_and_capacity_paths_agree():
  """capacity_factor = E / K gives every expert room for all tokens: nothing dropped."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, T // 2, D)), jnp.float32)
  p = moe_params(SHARED)
  p = {**p, moe.BIAS: jnp.asarray(np.random.default_rng(4).normal(scale=0.05, size=8))}
  paths = {
    "ragged": SHARED,
    "dense": dataclasses.replace(SHARED, impl="dense"),
    "capacity": dataclasses.replace(SHARED, capacity_factor=8 / 2),
  }
  outs = {}
  for name, m in paths.items():
    out, sown = apply(m, p, x)
    outs[name] = (out, sown["load"][0])
    if name != "capacity":
      loss = lambda p, m=m: jnp.sum(apply(m, p, x)[0] ** 2)  # noqa: E731
      outs[name] += (jax.jit(jax.grad(loss))(p)["expert_up"],)
    assert float(sown["dropped"][0]) == 0
  for name in ("dense", "capacity"):
    for a, b in zip(outs[name][:2], outs["ragged"][:2], strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs["dense"][2], outs["ragged"][2], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(outs["ragged"][2]).max()) > 0  # the routed experts get gradients


def test_capacity_drops_and_counts_the_overflow():
  """A skewed batch (every token alike picks the same two experts) over a capacity of C:
  each of the two experts keeps C assignments, the rest are dropped and counted."""
  m = dataclasses.replace(SHARED, capacity_factor=1.0, num_shared_experts=0)
  p = moe_params(m)
  x = jnp.broadcast_to(
    jnp.asarray(np.random.default_rng(5).normal(size=D), jnp.float32), (2, 12, D)
  )
  out, sown = apply(m, p, x)
  c = moe.capacity(m, T)  # ceil(1.0 * 24 * 2 / 8) = 6
  assert c == 6
  assert float(sown["dropped"][0]) == 2 * (T - c) and float(sown["assigned"][0]) == 2 * T
  # the first C tokens are served, the rest get nothing from the routed experts
  np.testing.assert_allclose(out.reshape(T, D)[c:], 0.0, atol=1e-7)
  assert float(jnp.abs(out.reshape(T, D)[:c]).min()) > 0


def test_bias_moves_against_the_load_and_the_optimizer_skips_it():
  """One update after a skewed batch (every token alike: one expert takes all): the bias
  moves by rate * sign(mean load - load); the optimizer keeps no state for it and leaves it."""
  m = Moe(num_experts=4, top_k=1, expert_d_ff=16)
  p = moe_params(m)
  x = jnp.broadcast_to(
    jnp.asarray(np.random.default_rng(7).normal(size=D), jnp.float32), (2, 12, D)
  )
  _, sown = apply(m, p, x)
  tree = {"block_0": {"moe": p}}
  counts = moe.sown_counts(tree, {"block_0": {"moe": sown}})
  load = np.asarray(counts["moe_loads"][0])
  assert load.max() == T and load.sum() == T  # skewed
  moved = moe.update_bias(tree, counts["moe_loads"], 0.01)
  bias = np.asarray(moved["block_0"]["moe"][moe.BIAS])
  step = np.where(load > load.mean(), -0.01, 0.01)
  np.testing.assert_allclose(bias, np.asarray(p[moe.BIAS]) + step, rtol=1e-6)
  assert float(moe.load_metrics(counts)["moe/load_max_over_mean_0"]) == 4.0
  train = tiny_config("llama").train
  train.update(dict(schedule="constant", warmup_steps=0))
  tx = make_optimizer(train)
  state = tx.init(tree)
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(state)]
  assert paths and not any(moe.BIAS in q for q in paths)
  grads = jax.tree.map(jnp.ones_like, tree)
  updates, _ = tx.update(grads, state, tree)
  assert not np.any(np.asarray(updates["block_0"]["moe"][moe.BIAS]))
  assert np.all(np.asarray(updates["block_0"]["moe"]["expert_up"]) != 0)


def test_scanned_groups_equal_looped_layers_and_cached_decoding():
  """3 layers, the first dense: scanned as two groups (dense_blocks, blocks) == looped."""
  m = Moe(num_experts=4, top_k=2, expert_d_ff=16, first_dense_layers=1, num_shared_experts=1)
  loop = tiny("llama", moe=m, num_layers=3, scan_layers=False)
  params = draw_params(
    jax.eval_shape(Transformer(loop).init, jax.random.key(0), *[jnp.zeros((1, 4), jnp.int32)] * 3)[
      "params"
    ]
  )
  stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
  stacked["dense_blocks"] = jax.tree.map(lambda a: a[None], params["block_0"])
  stacked["blocks"] = jax.tree.map(lambda *a: jnp.stack(a), params["block_1"], params["block_2"])
  tokens = jnp.asarray(np.random.default_rng(6).integers(8, 97, (2, 12)), jnp.int32)
  pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones_like(tokens)
  want, _ = jax.jit(Transformer(loop).apply)({"params": params}, tokens, pos, seg)
  scan = dataclasses.replace(loop, scan_layers=True)
  run = jax.jit(Transformer(scan).apply)
  got, _ = run({"params": stacked}, tokens, pos, seg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # token by token through the KV cache (split over the two groups) == the full pass
  from modeling.transformer import init_cache

  cache = init_cache(scan, 2, 12)
  for i in range(12):
    step, cache = run(
      {"params": stacked}, tokens[:, i : i + 1], pos[:, i : i + 1], seg[:, i : i + 1], cache
    )
    np.testing.assert_allclose(step[:, 0], want[:, i], rtol=1e-4, atol=1e-4)


def test_flops_count_the_active_experts():
  """matmul_params counts the router, top_k routed and the shared experts, not all experts."""
  from modeling.flops import matmul_params

  dense = tiny("llama")
  d, f = dense.d_model, dense.d_ff
  for experts, k, shared in ((1, 1, 0), (8, 2, 1), (64, 2, 1)):
    m = Moe(num_experts=experts, top_k=k, num_shared_experts=shared, expert_d_ff=f // (k + shared))
    got = matmul_params(dataclasses.replace(dense, moe=m, num_layers=3))
    want = matmul_params(dataclasses.replace(dense, num_layers=3)) + 3 * d * experts
    assert got == want - 3 * 3 * d * (f - (k + shared) * (f // (k + shared)))
