"""Workdirs and TFDS data dirs in a bucket, against the local GCS stand-in (fake-gcs-server,
tests/gcs_standin.py): a TFDS dataset prepared in the bucket is read and never prepared
again; a dataset or a bucket that is not there, or credentials that do not work, are one
line before anything compiles. The bucket workdir's SIGKILL resume is
tests/train/test_trainer.py::test_killed_run_resumes_exactly[sigkill-bucket]."""

import os

import fsspec
import pytest
import tensorflow_datasets as tfds
from etils import epath
from etils.epath import backend as epath_backend

from configs import base
from tests.gcs_standin import fake_gcs
from tests.tiny_models import tiny_config
from train import trainer
from train.data import pystdlib
from train.data.sources import load_documents
from train.validation import validate_run

BUCKET = "fourfold-test"
DATASET = f"pystdlib/py{pystdlib.PY_VERSION}"


@pytest.fixture(scope="module")
def bucket():
  with fake_gcs(BUCKET) as url:
    yield url


@pytest.fixture(scope="module")
def prepared(bucket, tmp_path_factory):
  """(local TFDS dir, bucket TFDS dir): pystdlib prepared locally, its files copied up."""
  local = tmp_path_factory.mktemp("tfds")
  tfds.builder(DATASET, data_dir=str(local)).download_and_prepare(file_format="array_record")
  remote = epath.Path(f"gs://{BUCKET}/tfds")
  for root, _, files in os.walk(local):
    for name in files:
      (remote / os.path.relpath(os.path.join(root, name), local)).write_bytes(
        open(os.path.join(root, name), "rb").read()
      )
  return str(local), str(remote)


@pytest.fixture
def no_preparing(monkeypatch):
  """Fails a test that would prepare (download) a TFDS dataset."""

  def refuse(self, *args, **kwargs):
    raise AssertionError(f"download_and_prepare called for {self.name} in {self.data_dir}")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def _data(tfds_data_dir):
  cfg = base.get_config().data
  cfg.update(dict(name="pystdlib", tfds_data_dir=tfds_data_dir))
  return cfg


def test_tfds_prepared_in_a_bucket_is_read_not_prepared(prepared, no_preparing):
  local, remote = prepared
  got = load_documents("pystdlib", "validation", _data(remote))
  want = load_documents("pystdlib", "validation", _data(local))
  assert len(got) == len(want) > 0
  assert [got[i] for i in range(0, len(want), 5)] == [want[i] for i in range(0, len(want), 5)]


def test_tfds_missing_in_a_bucket_says_how_to_prepare_it(bucket, no_preparing, tmp_path):
  config = tiny_config("gpt", name="pystdlib", tfds_data_dir=f"gs://{BUCKET}/empty")
  with pytest.raises(ValueError) as e:
    validate_run(config, str(tmp_path / "run"), 1)
  message = str(e.value)
  assert message.startswith(f"data.tfds_data_dir='gs://{BUCKET}/empty': data.name='{DATASET}'")
  assert f"tfds build {DATASET} --data_dir=gs://{BUCKET}/empty" in message
  assert "download_and_prepare(file_format='array_record')" in message
  assert "\n" not in message


@pytest.fixture
def nothing_compiles(monkeypatch):
  """Fails at the mesh, which comes before anything compiles: validation must refuse first."""

  def refuse(*args):
    raise AssertionError("validation passed; the run went on to build its mesh")

  monkeypatch.setattr(trainer.sharding, "make_mesh", refuse)


@pytest.mark.parametrize("key", ["--workdir", "data.tfds_data_dir"])
def test_a_missing_bucket_is_one_line_before_compiling(key, bucket, nothing_compiles, tmp_path):
  workdir, config = str(tmp_path / "run"), tiny_config("gpt", name="pystdlib")
  missing = "gs://no-such-bucket/x"
  if key == "--workdir":
    workdir = missing
  else:
    config.data.tfds_data_dir = missing
  with pytest.raises(ValueError) as e:
    trainer.run(config, workdir)
  assert str(e.value) == (
    f"{key}='{missing}': the bucket gs://no-such-bucket does not exist (or these credentials "
    "cannot see it)"
  )


def test_credentials_that_do_not_work_are_one_line(bucket, nothing_compiles, monkeypatch):
  """gcsfs asked for Google's default credentials, which point at a key file that is gone."""
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
  monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "google_default"})
  cached = epath_backend.fsspec_backend._get_filesystem  # epath keeps one gcsfs per process
  cached.cache_clear()
  try:
    with pytest.raises(ValueError) as e:
      trainer.run(tiny_config("gpt", name="pystdlib"), f"gs://{BUCKET}/run")
  finally:
    cached.cache_clear()
  message = str(e.value)
  assert message.startswith(f"--workdir='gs://{BUCKET}/run': the bucket gs://{BUCKET} cannot")
  assert "DefaultCredentialsError" in message and "/nonexistent/key.json" in message
  assert "gcloud auth application-default login" in message and "\n" not in message
