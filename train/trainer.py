"""`run(config, workdir)`: the one training loop, top to bottom.

Sections: setup (validation, distributed, mesh) -> state and data (abstract init ->
shardings -> the step-0 state when needed (fresh, init_from, split into trained and
frozen parts) -> the task's data -> restore the saved part) -> loop (step, metrics,
eval, checkpoint, preemption) -> finish (checkpoint, samples, plot).
"""

from __future__ import annotations

import functools
import json
import signal
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from configs import base
from modeling import flops, lora, moe, quant
from train import distill, families, sharding
from train.checkpoint import Checkpointer, restore_matching_params, restore_params
from train.data import make_tokenizer
from train.distributed import init_distributed
from train.metrics import MetricsWriter, Progress, measure_matmul_peak, plot_loss
from train.optim import learning_rate_schedule, make_optimizer
from train.profiling import StepProfiler
from train.step import (
  eval_params,
  make_eval_step,
  make_init,
  make_init_params,
  make_state_from_params,
  make_train_step,
  model_params,
  saved_part,
)
from train.validation import validate_config, validate_run


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss becomes NaN or Inf."""


def print_main(*args) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(*args, flush=True)


def _example(config) -> dict:
  return {k: jnp.zeros((1, n), jnp.int32) for k, n in families.packed_lengths(config).items()}


def abstract_state(config, model, tx, mesh, rules):
  """(abstract TrainState with shardings, its shardings, the boxed init fn). LoRA targets
  that match no layer are refused here, listing the layers' paths."""
  wiring = families.resolve(config)
  trainable = wiring.trainable(config)
  init_fn = make_init(model, tx, _example(config), config.train.ema_decay > 0, trainable)
  if wiring.task.teacher:  # distillation: the frozen teacher's weights are the reference
    teacher_init = make_init_params(wiring.teacher(config, model.cfg.vocab_size), _example(config))
    student_init = init_fn

    def init_fn(rng):  # the teacher's init stands in for its weights (shapes, benchmarks)
      return student_init(rng).replace(reference=teacher_init(rng))

  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
  if trainable.adapters and not lora.adapter_paths(nn.unbox(boxed.params)):
    raise ValueError(
      f"model.lora.targets={config.model.lora.targets!r} matches no layer; the linear layers "
      f"are: {', '.join(lora.dense_paths(nn.unbox(boxed.frozen)))}"
    )
  strict = not sharding.is_default_mesh(config.mesh)  # the default keeps unsplittable dims whole
  shardings = sharding.state_shardings(boxed, mesh, rules, strict)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings, init_fn


def initial_state(config, model, tx, shardings, mesh, rules):
  """The state at step 0: a fresh init, then `init_from`'s matching weights, then split into
  trained and frozen parts (`Trainable`). Call inside the mesh and axis-rules contexts."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))  # as make_init
  init_params = make_init_params(model, _example(config))
  boxed = jax.eval_shape(init_params, init_rng)
  specs, _ = sharding.fitted_specs(boxed, mesh, rules, strict=False)  # checked in abstract_state
  param_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  params = sharding.sharded_init(init_params, init_rng, param_shardings)
  if config.init_from:
    params, fresh, unused = restore_matching_params(config.init_from, params)
    check_conversion(config, fresh, unused)
    adapters = [n for n in fresh if any(f"['{a}']" in n for a in lora.ADAPTERS)]
    others = [n for n in fresh if n not in adapters]
    new = f"{others or 'none'}" + (f", and {len(adapters)} LoRA adapter arrays" if adapters else "")
    print_main(
      f"init_from {config.init_from}: loaded "
      f"{len(jax.tree.leaves(params)) - len(fresh)} parameter arrays; new, initialized "
      f"fresh: {new}; in the checkpoint but unused: {unused or 'none'}"
    )
  wiring = families.resolve(config)
  teacher = (
    load_teacher(config, wiring, model, shardings.reference) if wiring.task.teacher else None
  )
  if teacher is not None and config.task.distill_init != "none":
    params, used, copied = distill.init_student(params, teacher)
    print_main(
      f"task.distill_init={config.task.distill_init}: student layers from the teacher's "
      f"{used}; {len(copied)} of {len(jax.tree.leaves(params))} parameter arrays copied"
    )
  to_state = make_state_from_params(tx, config.train.ema_decay > 0, wiring.trainable(config))
  if teacher is None:
    return jax.jit(to_state, out_shardings=shardings)(params, state_rng)
  state = jax.jit(to_state, out_shardings=shardings.replace(reference=None))(params, state_rng)
  return state.replace(reference=teacher)


def check_conversion(config, fresh: list[str], unused: list[str]) -> None:
  """A quantized model started from a float checkpoint (its SubLN norms are new) must map
  every other weight: only SubLN (and LoRA adapters) start fresh (SubLN's scales at ones; the
  conversion's blend hides it at first), and nothing of the checkpoint goes unused."""
  if config.model.quant == "none" or not any("['sub_norm']" in n for n in fresh):
    return
  adapters = [n for n in fresh if any(f"['{a}']" in n for a in lora.ADAPTERS)]  # LoRA: new
  others = [n for n in fresh if "['sub_norm']" not in n and n not in adapters]
  if others or unused:
    raise ValueError(
      f"init_from={config.init_from!r} converts a float model to model.quant="
      f"{config.model.quant!r}: every weight but the new SubLN norms must come from it, but "
      f"the model's {others or 'none'} are not in the checkpoint and its {unused or 'none'} "
      "are not in the model; use the float model's own config (configs/workdir.py:<dir>)"
    )


def quant_mix_schedule(t) -> Callable | None:
  """step -> lambda of a conversion's warmup (`train.quant_warmup_steps`), else None."""
  if not t.quant_warmup_steps:
    return None
  return functools.partial(quant.warmup_mix, steps=t.quant_warmup_steps, shape=t.quant_warmup_shape)


def load_teacher(config, wiring: families.Wiring, model, teacher_shardings) -> dict:
  """A distillation teacher's weights (its EMA when it kept one) from `task.teacher`, straight
  into the shardings of the state's reference."""
  teacher = wiring.teacher(config, model.cfg.vocab_size)
  init = make_init_params(teacher, _example(config))
  shapes = jax.eval_shape(lambda r: nn.unbox(init(r)), jax.random.PRNGKey(0))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, teacher_shardings
  )
  print_main(
    f"task.teacher {config.task.teacher}: {teacher.cfg.num_layers} layers x {teacher.cfg.d_model}"
  )
  return restore_params(config.task.teacher, abstract)


def config_train_step(config, model, objective, tx):
  """The config's `(state, batch)` step: its schedule, microbatches and params EMA, matching
  the state `abstract_state` builds for the same config."""
  t = config.train
  return make_train_step(
    model,
    objective,
    tx,
    learning_rate_schedule(t),
    t.grad_accum,
    t.ema_decay,
    quant_mix_schedule(t),
  )


def run_eval(
  config, task: families.Task, tokenizer, params, eval_step, to_global, model=None, data_kw=None
) -> dict[str, float]:
  """The task's metrics over its evaluation split (`train.eval_steps` batches; 0: all).

  `eval_step(params, batch)` returns sums, added over batches, and per-row values
  (keys `rows/...`), concatenated; the task's summarize turns both into metrics. Tasks
  that generate text (seq2seq) add metrics of decoded text when given the `model`.
  """
  t, n_proc = config.train, jax.process_count()
  sums, rows = None, {}
  batches = task.eval_batches(
    config,
    tokenizer,
    batch_size=(t.eval_batch_size or t.batch_size) // n_proc,
    max_batches=t.eval_steps,
    process_index=jax.process_index(),
    process_count=n_proc,
    **(data_kw or {}),
  )
  for local in batches:
    out = jax.device_get(eval_step(params, to_global(local)))
    for k in [k for k in out if k.startswith("rows/")]:
      rows.setdefault(k, []).append(out.pop(k))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  if sums is None:
    raise ValueError(f"data.name={config.data.name!r}: the validation split is empty")
  rows = {k: np.concatenate(v) for k, v in rows.items()}
  metrics = task.summarize(sums, rows, config, tokenizer.is_byte_level)
  if "moe_loads" in sums:  # MoE layers' loads over the split (modeling/moe.py)
    metrics.update({f"eval/{k}": float(v) for k, v in moe.load_metrics(sums).items()})
  if task.decode_metrics is not None and model is not None:
    metrics.update(task.decode_metrics(config, model, params, tokenizer))
  return metrics


def jit_eval_step(model, objective, shardings, batch_sharding, mesh, mixed: bool = False):
  """(model params, batch[, reference[, mix]]) -> sums, jitted; outputs replicated, so every
  process reads the sums and per-row values. DPO's frozen reference weights are the third
  argument when the state keeps them; `mixed`: a conversion's lambda is the fourth (the
  reference None when there is none)."""
  params = model_params(shardings.params, shardings.frozen)
  ins = (params, batch_sharding)
  if shardings.reference is not None or mixed:
    reference = shardings.reference
    ins = (*ins, sharding.replicated(mesh) if reference is None else reference)
  if mixed:
    ins = (*ins, sharding.replicated(mesh))
  return jax.jit(
    make_eval_step(model, objective), in_shardings=ins, out_shardings=sharding.replicated(mesh)
  )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the last metrics."""
  # ---- setup
  wiring = validate_config(config)
  init_distributed(config)
  validate_run(config, workdir, jax.device_count())
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  tokenizer = make_tokenizer(config.data.tokenizer)
  model, objective = wiring.build(config, tokenizer)
  tx = make_optimizer(config.train)
  t = config.train
  n_proc = jax.process_count()

  batch_sharding = sharding.batch_sharding(mesh)

  def to_global(local: dict) -> dict:
    return sharding.to_global(local, batch_sharding)

  # ---- state, first part: the step-0 state when this start needs it (a fresh run, or the
  # frozen parts (a LoRA base, DPO's reference), which are never saved and so rebuilt)
  abstract, shardings, init_fn = abstract_state(config, model, tx, mesh, rules)
  ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
  start = ckpt.latest_step()
  rebuild = abstract.frozen is not None or abstract.reference is not None
  rebuild = rebuild or wiring.task.prepare is not None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = (
      initial_state(config, model, tx, shardings, mesh, rules) if start is None or rebuild else None
    )
    # ---- data: the task's training iterator (this process's rows of the global batch),
    # after any work the task does once on the initial weights
    train_kw, eval_kw = (
      ({}, {})
      if state is None
      else wiring.task.prepare_data(config, model, eval_params(state), tokenizer, to_global)
    )
    train_iter = wiring.task.train_iterator(
      config,
      tokenizer,
      batch_size=t.batch_size // n_proc,
      seed=config.seed,
      process_index=jax.process_index(),
      process_count=n_proc,
      **train_kw,
    )
    # ---- state, second part: the latest checkpoint's saved part, else step 0
    if start is not None:  # the newest step that restores (a broken one: warned, kept)
      start, restored = ckpt.restore_newest(saved_part(abstract), train_iter)
      logging.info("resuming from %s/%d", ckpt.directory, start)
      if state is not None:
        restored = restored.replace(frozen=state.frozen, reference=state.reference)
      state = restored
    else:
      start = 0
  if is_main:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    held = sharding.bytes_per_device(state)
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    trained = "parameters"
    if state.frozen is not None:
      base = sum(x.nbytes for x in jax.tree.leaves(state.frozen))
      trained = f"trained parameters (LoRA), over a frozen base of {base / 2**20:.1f} MiB"
    print(
      f"model: {config.model.family}, {n_params:,} {trained}; mesh {dict(mesh.shape)}; "
      f"state {max(held.values()) / 2**20:.1f} MiB per device of {total / 2**20:.1f} MiB",
      flush=True,
    )

  train_step = sharding.jit_train_step(
    config_train_step(config, model, objective, tx), shardings, batch_sharding
  )
  mix_at = quant_mix_schedule(t)
  eval_step = jit_eval_step(model, objective, shardings, batch_sharding, mesh, mix_at is not None)

  def evaluate(state) -> dict[str, float]:
    step = eval_step
    if mix_at is not None:  # the model as trained at this step (a conversion's lambda)
      mix = mix_at(int(state.step))

      def step(p, batch):
        return eval_step(p, batch, state.reference, mix)

    elif state.reference is not None:  # the current buffers: each train step donates the state

      def step(p, batch):
        return eval_step(p, batch, state.reference)

    params = eval_params(state)
    return run_eval(config, wiring.task, tokenizer, params, step, to_global, model, eval_kw)

  # ---- loop
  writer = MetricsWriter(workdir, enabled=is_main)
  progress = Progress(t.steps, start, enabled=is_main)
  peak = t.peak_tflops * 1e12 or measure_matmul_peak()
  flops_per_token = flops.flops_per_token(model.cfg, config.data.seq_len, wiring.target_len(config))
  tokens_per_step = t.batch_size * config.data.seq_len
  # SIGTERM (preemption): one process stops at the next step; several stop together at the
  # step JAX's preemption sync agrees on, so no process waits in a collective for the others.
  multi = n_proc > 1
  preempted = []
  previous = None if multi else signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  last: dict[str, float] = {}
  profiler = StepProfiler(
    str(epath.Path(workdir) / "tensorboard"), t.profile_start, t.profile_steps
  )
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if start == 0 and config.init_from and config.model.quant != "none" and t.eval_every:
        m = evaluate(state)  # where a conversion (or a quantized fine-tune) starts: step 0
        writer.write(0, m)
        progress.report(0, m)
      t_log, step_log = time.perf_counter(), start
      for step in range(start + 1, t.steps + 1):
        profiler.begin(step, state)
        state, metrics = train_step(state, to_global(next(train_iter)))
        profiler.end(step, state)
        if profiler.path and step == profiler.last:
          print_main(f"profile of steps {t.profile_start}-{step}: {profiler.path}")
        is_last = step == t.steps
        if multi:
          stop = multihost_utils.reached_preemption_sync_point(step)
        else:
          stop = bool(preempted)  # one read: a late signal waits a step
        checkpoint_due = is_last or stop or (t.checkpoint_every and step % t.checkpoint_every == 0)
        eval_due = t.eval_every and (step % t.eval_every == 0 or is_last)
        if step % t.log_every == 0 or is_last or checkpoint_due or eval_due:
          m = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not np.isfinite(m["train/loss"]):
            raise NonFiniteLossError(
              f"train/loss is {m['train/loss']} at step {step}; stopping without saving. "
              f"The last good checkpoint ({ckpt.latest_step()}) is intact in {ckpt.directory}. "
              "Lower train.learning_rate or raise train.warmup_steps, then rerun to resume."
            )
          now = time.perf_counter()
          tps = (step - step_log) * tokens_per_step / max(now - t_log, 1e-9)
          m["perf/tokens_per_sec"] = tps
          m["perf/mfu"] = tps * flops_per_token / (peak * jax.device_count())
          if eval_due:
            m.update(evaluate(state))
          writer.write(step, m)
          progress.report(step, m)
          last = m
          t_log, step_log = time.perf_counter(), step
        if checkpoint_due:
          ckpt.save(step, saved_part(state), train_iter, force=True)
        if stop:
          ckpt.wait()
          print_main(
            f"SIGTERM: saved a checkpoint at step {step}; rerun the same command to resume"
          )
          return last
    ckpt.wait()
  finally:
    profiler.stop()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
    ckpt.close()
    writer.close()

  # ---- finish
  if is_main:
    finish(config, wiring.family, model, eval_params(state), tokenizer, workdir)
  return last


def finish(config, family: families.Family, model, params, tokenizer, workdir: str) -> None:
  """Prints samples and writes the loss plot."""
  t = config.train
  sample = family.sample
  if t.num_samples and sample:
    prompts = [p for p in t.sample_prompts.split("|") if p][: t.num_samples]
    rng = jax.random.PRNGKey(config.seed)
    for i, prompt in enumerate(prompts):
      text, _ = sample(
        config,
        model,
        params,
        tokenizer,
        prompt,
        t.sample_tokens,
        jax.random.fold_in(rng, i),
        temperature=0.8,
      )
      print(f"---- sample {i} (prompt {prompt!r}, temperature 0.8)\n{text}", flush=True)
  path = plot_loss(workdir)
  if path:
    print(f"loss curve: {path}", flush=True)


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """A run's config from its JSON: keys added since it was saved keep base.py's defaults, the
  axis rules are tuples again, and the mesh is one replica per device (for inference)."""
  config = base.from_saved(saved)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  config.mesh.expert = 1
  return config


def load_for_inference(workdir: str):
  """(config, model, params, tokenizer) from a workdir's config.json and latest checkpoint.
  A LoRA run's checkpoint holds its adapters: the base comes from where the run started
  (its `init_from`, else its seeded init), and the params returned hold both."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"--workdir={workdir!r}: no config.json; is it a fourfold training workdir?")
  config = saved_config(json.loads(path.read_text()))
  tokenizer = make_tokenizer(config.data.tokenizer)
  model, _ = families.resolve(config).build(config, tokenizer)
  mesh, rules = sharding.make_mesh(config.mesh), sharding.rules(config)
  tx = make_optimizer(config.train)
  abstract, shardings, _ = abstract_state(config, model, tx, mesh, rules)
  params = restore_params(workdir, abstract.params)
  if abstract.frozen is not None:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      base = initial_state(config, model, tx, shardings, mesh, rules).frozen
    params = model_params(params, base)
  return config, model, params, tokenizer
