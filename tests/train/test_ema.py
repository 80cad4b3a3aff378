"""The params EMA (`train.ema_decay`): its recurrence, checkpoints, resume and inference."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from configs import gpt
from modeling.vocab import FOURFOLD
from tests.train.test_trainer import tiny
from train import families, trainer
from train.checkpoint import _step_dir
from train.step import ema_rate, eval_params, make_init, make_train_step


def test_ema_follows_its_recurrence_in_float64():
  """Three steps: ema_{k+1} = ema_k + (1 - d_k)(params_{k+1} - ema_k), from the init, with
  d_k = min(decay, (1 + k) / (10 + k)); a NumPy float64 reference of the same recurrence."""
  config = tiny(gpt)
  vocab = types.SimpleNamespace(vocab_size=97, specials=FOURFOLD)  # a tokenizer's size and ids
  model, objective = families.resolve(config).build(config, vocab)
  tx = optax.adam(1e-2)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(3, 97, (4, 32)), jnp.int32)}
  batch["positions"] = jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (4, 32))
  batch["segment_ids"] = jnp.ones((4, 32), jnp.int32)
  batch["loss_mask"] = jnp.ones((4, 32), jnp.float32)
  state = jax.jit(lambda r: nn.unbox(make_init(model, tx, batch, ema=True)(r)))(jax.random.key(0))
  decay = 0.9
  step = jax.jit(make_train_step(model, objective, tx, optax.constant_schedule(1e-2), 1, decay))
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
  for k in range(3):
    state, _ = step(state, batch)
    d = min(decay, (1 + k) / (10 + k))
    ref = jax.tree.map(
      lambda e, p, d=d: e + (1 - d) * (np.asarray(p, np.float64) - e), ref, state.params
    )
    assert float(ema_rate(decay, jnp.asarray(k))) == pytest.approx(d)
  for e, r in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ref), strict=True):
    np.testing.assert_allclose(np.asarray(e, np.float64), r, rtol=1e-5, atol=1e-7)
  assert eval_params(state) is state.ema_params
  pairs = zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(state.params), strict=True)
  assert any(not np.allclose(e, p) for e, p in pairs), "the EMA lags the params"


def test_ema_survives_resume_and_is_what_inference_loads(tmp_path):
  ema = dict(ema_decay=0.5, eval_every=4, eval_steps=1)
  with tfds.testing.mock_data(num_examples=8):
    straight = trainer.run(tiny(gpt, steps=8, **ema), str(tmp_path / "straight"))
    trainer.run(tiny(gpt, steps=4, **ema), str(tmp_path / "resumed"))
    resumed = trainer.run(tiny(gpt, steps=8, **ema), str(tmp_path / "resumed"))
    assert resumed["eval/loss"] == straight["eval/loss"]  # evaluated on the EMA, resumed exactly
    with pytest.raises(ValueError, match=r"train\.ema_decay: checkpoint .* with a params EMA"):
      trainer.run(tiny(gpt, steps=12), str(tmp_path / "resumed"))
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.restore(f"{_step_dir(str(tmp_path / 'straight'))}/state")
  _, _, params, _ = trainer.load_for_inference(str(tmp_path / "straight"))
  loaded, ema_saved = jax.tree.leaves(params), jax.tree.leaves(saved["ema_params"])
  raw = jax.tree.leaves(saved["params"])
  for a, b in zip(loaded, ema_saved, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(
    not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(loaded, raw, strict=True)
  )
