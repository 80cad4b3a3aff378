"""Knowledge distillation into a student of any family (`task.name=distill`).

DistilBERT (Sanh et al. 2019, "DistilBERT, a distilled version of BERT") trains the student
on three terms, here over the positions the student's own objective scores (weights w_l):

  loss = w_kd   T^2 sum_l w_l KL(softmax(z_t / T) || softmax(z_s / T))     soft targets
       + w_task (the student's own objective: causal LM, MLM, NELBO, seq2seq)
       + w_cos  sum_l w_l (1 - cos(h_s, h_t))                              hidden states

z are the logits, h the final hidden states (after the last norm of a pre-norm stack), T the
temperature; T^2 keeps the soft targets' gradient on the scale of the hard ones (Hinton et
al. 2015, "Distilling the knowledge in a neural network"). The teacher is another run's
model, built from its own saved config (it may be deeper or wider), frozen: it sees the
student's inputs, so MLM and diffusion students and their teacher read the same corrupted
tokens. `every_other` initializes the student from the teacher's layers 0, s, 2s, ... with
s = teacher layers // student layers (DistilBERT's every other layer when s = 2).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from configs import base
from train.checkpoint import absolute

INITS = ("none", "every_other")  # task.distill_init
STACKS = ("", "encoder_", "decoder_")  # layer-name prefixes of a stack (run_stack's `prefix`)


def run_config(path: str) -> ml_collections.ConfigDict:
  """The config of the run at `path` (its workdir, or a step dir under its checkpoints)."""
  path = absolute(epath.Path(path).expanduser())
  for where in (path, path.parent.parent):
    file = where / "config.json"
    if file.exists():
      return base.from_saved(json.loads(file.read_text()))
  raise ValueError(
    f"task.teacher={str(path)!r}: no config.json; is it a fourfold training workdir?"
  )


# ---- the terms, per position


def kd_BL(student_BLV: jax.Array, teacher_BLV: jax.Array, temperature: float) -> jax.Array:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)) at every position, in float32. A
  class both give no probability (diffusion's [MASK] under SUBS, logit -inf) adds 0."""
  logp_s = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / temperature, axis=-1)
  logp_t = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
  p_t = jnp.exp(logp_t)
  held = p_t > 0
  diff = jnp.where(held, logp_t, 0.0) - jnp.where(held, logp_s, 0.0)
  return temperature**2 * jnp.sum(jnp.where(held, p_t * diff, 0.0), axis=-1)


def cos_BL(student_BLD: jax.Array, teacher_BLD: jax.Array) -> jax.Array:
  """1 - cos(student, teacher) of the hidden states at every position, in float32."""
  s = student_BLD.astype(jnp.float32)
  t = teacher_BLD.astype(jnp.float32)
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return 1.0 - jnp.sum(s * t, axis=-1) / jnp.maximum(norms, 1e-8)


# ---- the student's objective, run with the teacher beside it


class Paired:
  """Stands in for the student model inside the student's own objective: each `apply` also
  runs the frozen teacher on the same inputs and keeps both models' logits and final hidden
  states; the objective's `on_scored` then says which positions it scored."""

  def __init__(self, student: nn.Module, teacher: nn.Module, teacher_params):
    self.student, self.teacher = student, teacher
    self.teacher_params = jax.lax.stop_gradient(teacher_params)
    self.cfg = student.cfg  # what objectives read of the model (diffusion: time conditioning)
    self.calls: list[dict] = []

  def apply(self, variables, *args, deterministic=True, rngs=None, **kw):
    (out, cache), s_vars = self.student.apply(
      variables, *args, deterministic=deterministic, rngs=rngs, mutable=["intermediates"], **kw
    )
    (t_out, _), t_vars = self.teacher.apply(
      {"params": self.teacher_params}, *args, deterministic=True, mutable=["intermediates"], **kw
    )
    self.calls.append(
      {
        "student": out,
        "teacher": jax.lax.stop_gradient(t_out),
        "student_h": s_vars["intermediates"]["hidden"][-1],
        "teacher_h": jax.lax.stop_gradient(t_vars["intermediates"]["hidden"][-1]),
      }
    )
    return out, cache

  def on_scored(self, weights_BL: jax.Array, view: Callable | None = None) -> None:
    """The last call's scored positions (weights over its output positions) and how the
    objective reads its logits there."""
    self.calls[-1]["weights"] = weights_BL
    self.calls[-1]["view"] = view or (lambda x: x)

  def sums(self, temperature: float, cos: bool) -> dict[str, jax.Array]:
    """The KD (and cos) terms summed over the scored positions, averaged over the calls (a
    diffusion evaluation's time draws)."""
    if not self.calls or any("weights" not in c for c in self.calls):
      raise ValueError("distillation: the student's objective did not report its positions")
    kd, cs = 0.0, 0.0
    for c in self.calls:
      view, w_BL = c["view"], c["weights"]
      kd += jnp.sum(w_BL * kd_BL(view(c["student"]), view(c["teacher"]), temperature))
      if cos:
        cs += jnp.sum(w_BL * cos_BL(c["student_h"], c["teacher_h"]))
    n = len(self.calls)
    out = {"distill/kd": kd / n}
    if cos:
      out["distill/cos"] = cs / n
    return out


def make_distill(
  student_objective: Callable, teacher: nn.Module, task: ml_collections.ConfigDict, cos: bool
) -> Callable:
  """The distillation objective around the student's own: its sums, with `loss_sum` the
  weighted three terms and `distill/task`, `distill/kd`, `distill/cos` the terms (cos only
  when `cos`: equal widths). The teacher's weights come in as `reference` (the state keeps
  them frozen: no gradient, no optimizer state, never saved)."""
  t = task

  def distill(model, params, batch, rng, deterministic, reference=None):
    if reference is None:
      raise ValueError("task.name='distill' needs the teacher's weights (the state's reference)")
    paired = Paired(model, teacher, reference)
    sums = student_objective(paired, params, batch, rng, deterministic, on_scored=paired.on_scored)
    terms = paired.sums(t.distill_temperature, cos)
    loss = t.distill_task_weight * sums["loss_sum"] + t.distill_kd_weight * terms["distill/kd"]
    if cos:
      loss = loss + t.distill_cos_weight * terms["distill/cos"]
    return {**sums, **terms, "loss_sum": loss, "distill/task": sums["loss_sum"]}

  return distill


def summarize(student_summarize: Callable) -> Callable:
  """The student's own evaluation metrics (eval/loss is its own objective's, comparable with
  the same student trained alone), plus eval/distill/{loss,task,kd,cos} per weight."""

  def summarize_distill(sums: dict, rows: dict, config, byte_level: bool) -> dict[str, float]:
    own = {k: v for k, v in sums.items() if not k.startswith("distill/")}
    out = student_summarize({**own, "loss_sum": sums["distill/task"]}, rows, config, byte_level)
    weight = max(float(sums["weight"]), 1.0)
    out["eval/distill/loss"] = float(sums["loss_sum"]) / weight
    out.update(
      {f"eval/{k}": float(v) / weight for k, v in sums.items() if k.startswith("distill/")}
    )
    return out

  return summarize_distill


# ---- the student's initial weights from the teacher's


def _layers(params: dict, prefix: str) -> list[dict]:
  """Each layer's params of the stack `prefix`: `{prefix}blocks` (scanned: a leading layer
  axis) or `{prefix}block_{i}`; [] when the tree has no such stack."""
  stacked = params.get(f"{prefix}blocks")
  if stacked is not None:
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
  layers = []
  while f"{prefix}block_{len(layers)}" in params:
    layers.append(params[f"{prefix}block_{len(layers)}"])
  return layers


def _overlay(student, teacher, where: str, copied: list[str]):
  """The student's tree with every leaf the teacher also has replaced by the teacher's (same
  shape, or an error naming it); leaves the teacher lacks (LoRA adapters, BitNet's SubLN)
  keep their fresh values."""
  if not isinstance(student, dict):
    if tuple(student.shape) != tuple(teacher.shape):
      raise ValueError(
        f"task.distill_init='every_other': {where} has shape {tuple(student.shape)} in the "
        f"student and {tuple(teacher.shape)} in the teacher; copying needs equal widths "
        "(model.d_model, num_heads, num_kv_heads, head_dim, d_ff): use task.distill_init='none'"
      )
    copied.append(where)
    return jnp.asarray(teacher, student.dtype)
  return {
    k: _overlay(v, teacher[k], f"{where}/{k}", copied) if k in teacher else v
    for k, v in student.items()
  }


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
  """The teacher layer each student layer starts from: 0, s, 2s, ... with s = teacher //
  student (every other layer at half the depth; all of them at equal depth)."""
  if not 0 < student_layers <= teacher_layers:
    raise ValueError(
      f"task.distill_init='every_other': the student's {student_layers} layers must be at "
      f"most the teacher's {teacher_layers}"
    )
  stride = teacher_layers // student_layers
  return [i * stride for i in range(student_layers)]


def init_student(student: dict, teacher: dict) -> tuple[dict, dict[str, list[int]], list[str]]:
  """(student params, {stack: teacher layers used}, copied names): DistilBERT's
  initialization. Embeddings, heads and norms are copied where the teacher has them; each
  stack's layer i takes teacher layer `layer_map(...)[i]`, scanned or not on either side."""
  copied: list[str] = []
  is_layer = {f"{p}blocks" for p in STACKS}
  out = _overlay(
    {k: v for k, v in student.items() if k not in is_layer and "block_" not in k},
    {k: v for k, v in teacher.items() if k not in is_layer and "block_" not in k},
    "",
    copied,
  )
  used = {}
  for prefix in STACKS:
    s_layers, t_layers = _layers(student, prefix), _layers(teacher, prefix)
    if not s_layers:
      continue
    used[prefix or "blocks"] = chosen = layer_map(len(s_layers), len(t_layers))
    new = [
      _overlay(s, t_layers[j], f"{prefix}layer {i} <- teacher layer {j}", copied)
      for i, (s, j) in enumerate(zip(s_layers, chosen, strict=True))
    ]
    if f"{prefix}blocks" in student:
      out[f"{prefix}blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *new)
    else:
      out.update({f"{prefix}block_{i}": layer for i, layer in enumerate(new)})
  return out, used, copied
