"""Mesh, batch and divisibility errors before anything compiles; cluster detection;
data shards that make global batches independent of the process count."""

import types

import jax
import numpy as np
import pytest

from configs import deepseek, gpt, llama
from modeling.vocab import FOURFOLD
from tests.sharding import runner
from train import families, sharding
from train.data import make_tokenizer, train_iterator
from train.distributed import cluster_env
from train.optim import make_optimizer
from train.trainer import abstract_state


def config(preset=llama, **mesh):
  c = preset.get_config("size=tiny")
  c.train.batch_size = 16
  c.mesh.update(mesh)
  return c


@pytest.mark.parametrize(
  "mesh, devices, message",
  [
    (dict(data=2, fsdp=2, tensor=1), 8, "product 4 must equal the device count 8"),
    (dict(data=-1, fsdp=-1), 8, "at most one size may be -1"),
    (dict(data=-1, fsdp=3), 8, "8 devices do not divide by 3"),
    (dict(data=0), 8, "mesh.data=0: must be a positive size or -1"),
  ],
)
def test_bad_meshes_are_named(mesh, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.validate_mesh(config(**mesh), devices)


def test_tensor_must_divide_kv_heads():
  c = config(gpt, data=1, tensor=8)  # gpt tiny: 4 heads
  with pytest.raises(ValueError, match=r"mesh.tensor=8: must divide model.num_heads=4"):
    sharding.validate_mesh(c, 8)
  c = config(llama, data=1, tensor=16)
  c.model.num_heads, c.model.num_kv_heads = 32, 8
  with pytest.raises(ValueError, match=r"mesh.tensor=16: must divide model.num_kv_heads=8"):
    sharding.validate_mesh(c, 16)


def test_batch_must_divide_over_data_parallel_devices():
  c = config(data=4, fsdp=2)
  c.train.batch_size = 12
  with pytest.raises(ValueError, match=r"train.batch_size=12.*data-parallel size 8"):
    sharding.validate_mesh(c, 8)
  c.train.batch_size, c.train.grad_accum = 16, 4  # 4 rows per microbatch
  with pytest.raises(ValueError, match=r"grad_accum=4.*data-parallel size 8"):
    sharding.validate_mesh(c, 8)
  c.train.grad_accum, c.train.eval_batch_size = 1, 4
  with pytest.raises(ValueError, match=r"train.eval_batch_size=4.*data-parallel size 8"):
    sharding.validate_mesh(c, 8)
  c.train.eval_batch_size = 8
  assert sharding.validate_mesh(c, 8) == (4, 1, 2, 1)


def test_expert_axis_divides_the_experts_and_splits_the_batch():
  c = config(data=2, expert=4)
  c.model.moe.num_experts = 6
  with pytest.raises(ValueError, match=r"mesh.expert=4: must divide model.moe.num_experts=6"):
    sharding.validate_mesh(c, 8)
  c.model.moe.num_experts, c.train.batch_size = 8, 4  # outside MoE layers: data parallelism
  with pytest.raises(ValueError, match=r"train.batch_size=4.*data-parallel size 8"):
    sharding.validate_mesh(c, 8)
  c.train.batch_size = 16
  assert sharding.validate_mesh(c, 8) == (2, 4, 1, 1)
  c.model.quant = "bitnet158"  # ragged_dot takes no quantizer: the dense path is allowed
  with pytest.raises(ValueError, match=r"model.quant='bitnet158': the expert-parallel dispatch"):
    sharding.validate_mesh(c, 8)
  c.model.moe.impl = "dense"
  assert sharding.validate_mesh(c, 8) == (2, 4, 1, 1)


def test_rules_must_name_mesh_axes():
  c = config()
  c.logical_axis_rules = (*c.logical_axis_rules[:-1], ("norm", "model"))
  with pytest.raises(ValueError, match=r"logical_axis_rules\['norm'\]='model'"):
    sharding.validate_mesh(c, 1)


def test_uneven_parameter_split_names_the_parameter():
  """A vocabulary of 97 cannot split over tensor=2 (a mesh set by hand): the error names the
  embedding."""
  c = config(data=1, tensor=2)
  vocab = types.SimpleNamespace(vocab_size=97, specials=FOURFOLD)  # a tokenizer's size and ids
  model, _ = families.resolve(c).build(c, vocab)
  devices = np.array(jax.devices() * 2)  # shape checks only: nothing runs on the mesh
  mesh = jax.sharding.Mesh(devices.reshape(1, 1, 1, 2), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"'vocab' dimension \(97\) does not split.*'tensor'"):
    abstract_state(c, model, make_optimizer(c.train), mesh, sharding.rules(c))


@pytest.mark.parametrize(
  "environ, kind",
  [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_NTASKS": "4"}, None),  # an allocation, not a job step started by srun
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
  ],
)
def test_cluster_detection(environ, kind):
  assert cluster_env(environ) == kind


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
  """With data.shards=4: one process's batch is the concatenation of the batches that
  two processes (2 shards each) or four processes (1 shard each) read; with data.shards=2,
  four processes (two on each shard, each keeping its half of the shard's rows) too."""
  c = runner.tiny_config(runner.write_corpus(str(tmp_path / "docs.txt")))
  tok = make_tokenizer("byte")

  def batches(count):
    its = [
      train_iterator(
        c.data, tok, batch_size=8 // count, seed=3, process_index=i, process_count=count
      )
      for i in range(count)
    ]
    return [np.concatenate([next(it)["tokens"] for it in its]) for _ in range(5)]

  for shards, counts in ((4, (2, 4)), (2, (4,))):
    c.data.shards = shards
    one = batches(1)
    for count in counts:
      for a, b in zip(one, batches(count), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in one}) == 5  # different batches each step
  c.data.shards = 3
  with pytest.raises(ValueError, match=r"data.shards=3: allowed: a positive divisor of the global"):
    train_iterator(c.data, tok, batch_size=4, seed=0, process_index=0, process_count=2)


def test_resume_with_another_process_count_is_refused(tmp_path):
  """A data-iterator state saved by two processes cannot feed one: a clear error."""
  from train.checkpoint import Checkpointer

  data = tmp_path / "checkpoints" / "3" / "data"
  data.mkdir(parents=True)
  for i in range(2):
    (data / f"process_{i}-of-2.json").write_text("{}")
  ckpt = Checkpointer(str(tmp_path))
  with pytest.raises(ValueError, match=r"saved by other processes \(process_0-of-2.json"):
    ckpt.check_data_state(3)
  ckpt.close()


def test_default_mesh_keeps_whole_what_does_not_split(capsys):
  """On the default mesh (FSDP over all devices; here 64, a v5e-64) the tiny DeepSeek's MLA
  latent of 40 (kv 32 + rope 8) does not split: those dimensions stay whole, said in one line,
  while every width of 64 still splits over fsdp. The same mesh set by hand raises, naming the
  parameter, its shape and the way out."""
  c = deepseek.get_config("size=tiny")
  assert sharding.is_default_mesh(c.mesh)
  model, _ = families.resolve(c).build(c, make_tokenizer(c.data.tokenizer))
  mesh = sharding.make_mesh(c.mesh, jax.devices() * 64)  # shapes only: nothing runs on it
  assert dict(mesh.shape) == {"data": 1, "expert": 1, "fsdp": 64, "tensor": 1}
  tx = make_optimizer(c.train)
  _, shardings, _ = abstract_state(c, model, tx, mesh, sharding.rules(c))
  note = capsys.readouterr().out
  assert "12 arrays keep a dimension whole" in note  # kv_a, kv_b x 2 layers x (params, mu, nu)
  assert "['kv_a']['kernel'] has shape (64, 40) ('latent' 40 over 64)" in note
  specs = {
    jax.tree_util.keystr(k): tuple(s.spec)
    for k, s in jax.tree_util.tree_leaves_with_path(shardings.params)
  }
  assert specs["['block_0']['attn']['kv_a']['kernel']"] == ("fsdp", None)
  assert specs["['block_1']['attn']['kv_b']['kernel']"] == (None, "tensor", None)
  assert specs["['block_1']['attn']['query']['kernel']"] == ("fsdp", "tensor", None)
  assert specs["['embed']['embedding']"] == ("tensor", "fsdp")
  opt = jax.tree_util.tree_leaves_with_path(shardings.opt_state)  # the moments: as the params
  kv_a = [tuple(s.spec) for k, s in opt if "['kv_a']" in jax.tree_util.keystr(k)]
  assert kv_a == [("fsdp", None)] * 4, kv_a
  c.mesh.update(dict(data=1, fsdp=64))  # the same sizes, set by hand
  assert not sharding.is_default_mesh(c.mesh)
  with pytest.raises(
    ValueError, match=r"\['kv_a'\]\['kernel'\] has shape \(64, 40\): its 'latent'"
  ):
    abstract_state(c, model, tx, mesh, sharding.rules(c))
