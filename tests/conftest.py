"""Test-wide environment, set before any test imports JAX's backends.

JAX runs on the CPU in the tests even where libtpu is installed (for the ahead-of-time
TPU compiles): no TPU metadata-server queries, and several test processes may load
libtpu at once (pytest-xdist workers, the multi-device subprocesses).
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="session")
def mdlm_run(tmp_path_factory):
  """(workdir, TFDS data dir, last metrics): configs/mdlm.py:size=tiny trained briefly on the default corpus,
  shared by the diffusion training and sampling tests (one training, not one per module)."""
  from tests.train.test_diffusion_train import tiny_mdlm
  from train import trainer

  tfds_dir = tmp_path_factory.mktemp("tfds")  # pystdlib builds here in about a second
  workdir = tmp_path_factory.mktemp("mdlm")
  return workdir, str(tfds_dir), trainer.run(tiny_mdlm(str(tfds_dir)), str(workdir))


@pytest.fixture(scope="session")
def mdlm_workdir(mdlm_run):
  return mdlm_run[0]
