"""train/distill.py: DistilBERT's terms against float64 NumPy references, a student copied
from its teacher at zero distance (decoder, encoder, diffusion: the teacher reads the
student's own corrupted inputs), every-other-layer initialization across scanned and looped
stacks (with a BitNet and a LoRA student), a teacher that no training step changes, and the
validation of the teacher's run.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modeling.vocab import FOURFOLD, NUM_SPECIAL
from tests.tiny_models import VOCAB, abstract_init, draw_params, tiny_config
from train import distill, families
from train.step import TrainState, make_train_step
from train.validation import validate_config

B, L = 2, 16


def log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def kd_reference(student, teacher, temperature, weights):
  """sum_l w_l T^2 sum_v p_t (log p_t - log p_s) in float64; classes with p_t = 0 add 0."""
  ls, lt = log_softmax64(student / temperature), log_softmax64(teacher / temperature)
  pt = np.exp(lt)
  kl = np.sum(np.where(pt > 0, pt * (np.where(pt > 0, lt, 0) - np.where(pt > 0, ls, 0)), 0), -1)
  return float(np.sum(np.asarray(weights, np.float64) * temperature**2 * kl))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_term_equals_a_float64_reference_with_temperature_and_masking(temperature):
  rng = np.random.default_rng(int(temperature * 10))
  student = (3 * rng.standard_normal((3, 5, 11))).astype(np.float32)
  teacher = (3 * rng.standard_normal((3, 5, 11))).astype(np.float32)
  weights = (rng.random((3, 5)) < 0.6).astype(np.float32)
  got = float(jnp.sum(weights * distill.kd_BL(student, teacher, temperature)))
  np.testing.assert_allclose(got, kd_reference(student, teacher, temperature, weights), rtol=1e-5)
  # diffusion reads logits through SUBS: [MASK] at -inf in both adds nothing and stays finite
  s_subs, t_subs = student.copy(), teacher.copy()
  s_subs[..., 3] = t_subs[..., 3] = -np.inf
  got = float(jnp.sum(weights * distill.kd_BL(s_subs, t_subs, temperature)))
  want = kd_reference(np.delete(student, 3, -1), np.delete(teacher, 3, -1), temperature, weights)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(lambda s: jnp.sum(weights * distill.kd_BL(s, t_subs, temperature)))(s_subs)
  assert np.all(np.isfinite(grad))
  assert float(jnp.max(jnp.abs(distill.kd_BL(teacher, teacher, temperature)))) < 1e-5


def test_cos_term_equals_a_float64_reference():
  rng = np.random.default_rng(0)
  s, t = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  want = 1 - np.sum(s64 * t64, -1) / (np.linalg.norm(s64, axis=-1) * np.linalg.norm(t64, axis=-1))
  np.testing.assert_allclose(distill.cos_BL(s, t), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill.cos_BL(3 * t, t), 0.0, atol=1e-6)  # scale does not count


# ---- every other layer


def layers_of(params, prefix=""):
  return distill._layers(params, prefix)


@pytest.mark.parametrize(
  "teacher_scan, student_scan, student",
  [
    (False, False, dict()),
    (True, False, dict(quant="bitnet158")),
    (False, True, dict()),
    (True, True, dict(lora=("rank", 4))),
  ],
  ids=["looped", "scanned-teacher-bitnet-student", "scanned-student", "scanned-lora-student"],
)
def test_every_other_copies_the_teachers_layers_0_and_2(teacher_scan, student_scan, student):
  from modeling.lora import Lora
  from tests.tiny_models import tiny

  extra = dict(student)
  if "lora" in extra:
    extra["lora"] = Lora(rank=4, alpha=8.0, targets="attn/(query|value)$")
  t_cfg = tiny("gpt", num_layers=4, scan_layers=teacher_scan)
  s_cfg = tiny("gpt", num_layers=2, scan_layers=student_scan, **extra)
  teacher = draw_params(abstract_init(t_cfg), seed=1)
  fresh = draw_params(abstract_init(s_cfg), seed=2)
  out, used, copied = distill.init_student(fresh, teacher)
  assert used == {"blocks": [0, 2]}
  t_layers, fresh_layers, out_layers = layers_of(teacher), layers_of(fresh), layers_of(out)
  assert len(out_layers) == 2
  for i, j in enumerate([0, 2]):
    flat_t = dict(jax.tree_util.tree_flatten_with_path(t_layers[j])[0])
    for path, x in jax.tree_util.tree_flatten_with_path(out_layers[i])[0]:
      # teacher's leaves copied exactly; the student's own (BitNet SubLN, LoRA) kept fresh
      want = flat_t.get(path, _leaf(fresh_layers[i], path))
      np.testing.assert_array_equal(np.asarray(x), np.asarray(want), err_msg=str(path))
  own = [p for p, _ in jax.tree_util.tree_flatten_with_path(fresh_layers[0])[0]]
  assert len(own) > len(jax.tree.leaves(t_layers[0])) or not student  # some kept fresh
  for name in ("embed", "pos_embedding", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, out[name], teacher[name])


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_every_other_refuses_other_widths_naming_the_parameter():
  from tests.tiny_models import tiny

  teacher = draw_params(abstract_init(tiny("gpt", num_layers=4, d_model=32)))
  student = draw_params(abstract_init(tiny("gpt", num_layers=2)))
  with pytest.raises(ValueError, match="distill_init='every_other': .*embed.* has shape"):
    distill.init_student(student, teacher)


# ---- the objective in every family: zero at a copied teacher, the same corrupted inputs


def batch_for(family: str) -> dict:
  rng = np.random.default_rng(3)
  tokens = rng.integers(NUM_SPECIAL, VOCAB, (B, L)).astype(np.int32)
  seg = np.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4], np.int32)
  pos = np.array([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4], np.int32)
  batch = {"tokens": np.where(seg > 0, tokens, 0), "positions": pos, "segment_ids": seg}
  if family == "encdec":
    batch.update(
      targets=batch["tokens"][:, ::-1].copy(), targets_positions=pos, targets_segment_ids=seg
    )
  return {k: jnp.asarray(v) for k, v in batch.items()}


# encdec's objective reports its positions the same way (tests/train/test_families.py builds
# and traces its distill task); left out here for the suite's time
PRESETS = {"decoder": "gpt", "encoder": "bert", "diffusion": "mdlm"}


@pytest.mark.parametrize("family", list(PRESETS))
def test_a_student_copied_from_its_teacher_has_zero_kd_and_cos(family):
  config = tiny_config(PRESETS[family], dropout=0.0, seq_len=L)
  config.task.name = "distill"
  wiring = families.resolve(config)
  model = wiring.family.model(wiring.transformer_config(config, VOCAB))
  teacher = draw_params(abstract_init(model.cfg, type(model)), seed=1)
  student, used, _ = distill.init_student(
    draw_params(abstract_init(model.cfg, type(model))), teacher
  )
  assert all(u == list(range(len(u))) for u in used.values())  # equal depth: every layer
  own = wiring.task.objective(config.task, VOCAB, FOURFOLD)
  objective = distill.make_distill(own, model, config.task, cos=True)
  batch, rng = batch_for(family), jax.random.PRNGKey(7)

  @jax.jit
  def both(student, teacher):
    # training mode: MLM and diffusion draw their masks from rng inside the objective
    return objective(model, student, batch, rng, False, reference=teacher), own(
      model, student, batch, rng, False
    )

  sums, alone = both(student, teacher)
  weight = float(sums["weight"])
  assert abs(float(sums["distill/kd"])) < 1e-5 * weight
  assert abs(float(sums["distill/cos"])) < 1e-5 * weight
  np.testing.assert_allclose(sums["distill/task"], alone["loss_sum"], rtol=1e-6)
  t = config.task
  np.testing.assert_allclose(sums["loss_sum"], t.distill_task_weight * alone["loss_sum"], rtol=1e-5)
  # a different teacher is a positive distance on the same positions
  other = jax.tree.map(lambda x: x * 1.5, teacher)
  sums, _ = both(student, other)
  assert float(sums["distill/kd"]) > 1e-3 * weight and float(sums["distill/cos"]) > 0
  if family == "decoder":  # exactly the next-token targets inside each document
    seg = np.asarray(batch["segment_ids"])
    w = np.zeros((B, L))
    w[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    z_s, z_t = jax.jit(lambda *ps: [model.apply({"params": p}, *args)[0] for p in ps])(
      student, other
    )
    want = kd_reference(z_s, z_t, t.distill_temperature, w)
    np.testing.assert_allclose(sums["distill/kd"], want, rtol=1e-4)


def test_the_teacher_gets_no_gradient_and_no_step_changes_it():
  from tests.tiny_models import tiny

  config = tiny_config("gpt", seq_len=L)
  config.task.name = "distill"
  model = families.Transformer(tiny("gpt", num_layers=1))
  teacher_model = families.Transformer(
    tiny("gpt", num_layers=2, d_model=32, num_heads=2, num_kv_heads=2)
  )
  own = families.resolve(config).task.objective(config.task, VOCAB, FOURFOLD)
  objective = distill.make_distill(own, teacher_model, config.task, cos=False)
  teacher = draw_params(abstract_init(teacher_model.cfg), seed=1)
  params = draw_params(abstract_init(model.cfg), seed=2)
  batch, rng = batch_for("decoder"), jax.random.PRNGKey(0)

  def loss(p, ref):
    return objective(model, p, batch, rng, False, reference=ref)["loss_sum"]

  tx = optax.adamw(1e-2)
  train_step = make_train_step(model, objective, tx, optax.constant_schedule(1e-2))

  @jax.jit
  def grads_and_a_step(state):
    return jax.grad(loss, argnums=(0, 1))(state.params, state.reference), *train_step(state, batch)

  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rng, reference=teacher)
  (g_student, g_teacher), state, metrics = grads_and_a_step(state)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_teacher))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(g_student))
  jax.tree.map(np.testing.assert_array_equal, state.reference, teacher)
  assert not np.array_equal(state.params["embed"]["embedding"], params["embed"]["embedding"])
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
  assert {"train/distill/kd", "train/distill/task"} <= set(metrics)


# ---- validation of the teacher's run


def write_run(path, config) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  return str(path)


def test_validation_refuses_what_the_terms_cannot_compare(tmp_path):
  teacher = tiny_config("gpt", tfds_data_dir=str(tmp_path))
  teacher.model.num_layers, teacher.model.d_model = 4, 32
  student = tiny_config("gpt", tfds_data_dir=str(tmp_path))
  student.task.name, student.task.teacher = "distill", write_run(tmp_path / "t", teacher)
  with pytest.raises(ValueError, match="task.distill_cos_weight=1.0: the cos term needs equal"):
    validate_config(student)
  student.task.distill_cos_weight = 0.0
  validate_config(student)  # a narrower student of a wider teacher: KD and the task alone
  student.task.distill_init = "every_other"
  with pytest.raises(ValueError, match="model.d_model=64: task.distill_init='every_other'"):
    validate_config(student)
  teacher.model.d_model, teacher.data.tokenizer = 64, "spm:other.model"
  write_run(tmp_path / "t", teacher)
  with pytest.raises(ValueError, match="the teacher's data.tokenizer='spm:other.model' differs"):
    validate_config(student)
  student.task.teacher = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="task.teacher=.*no config.json"):
    validate_config(student)
  teacher = tiny_config("bert", tfds_data_dir=str(tmp_path))
  student.task.teacher = write_run(tmp_path / "bert", teacher)
  with pytest.raises(ValueError, match="the teacher's model.family='encoder' differs"):
    validate_config(student)
