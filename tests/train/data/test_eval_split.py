"""`data.eval_split`: evaluation reads the TFDS splits it names (TFDS's `validation+test`
syntax), in that order, for documents and labeled examples; local sources ignore it."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds
from etils import epath

from configs import base
from train.data import sources

TEXTS = {"train": "first ninety", "validation": "fifth", "test": "last fifth"}


class ThreeSplitText(tfds.core.GeneratorBasedBuilder):
  """One document per split, like TFDS's tiny_shakespeare."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # TFDS's default needs the optional importlib_resources

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in TEXTS}

  def _generate_examples(self, split):
    yield split, {"text": TEXTS[split]}


def _cfg(tmp_path, **overrides):
  cfg = base.get_config().data
  cfg.update(dict(tfds_data_dir=str(tmp_path), **overrides))
  return cfg


def _texts(docs) -> list[str]:
  return [d.decode() if isinstance(d, bytes) else d for d in docs]


def test_eval_split_names_the_splits_evaluation_reads(tmp_path):
  joined = _cfg(tmp_path, eval_split="validation+test")
  assert _texts(sources.load_documents("three_split_text", "validation", joined)) == [
    TEXTS["validation"],
    TEXTS["test"],
  ]
  assert _texts(sources.load_documents("three_split_text", "all", joined)) == [
    TEXTS["validation"],
    TEXTS["test"],
  ]  # data.eval_name's TFDS source too
  assert _texts(sources.load_documents("three_split_text", "train", joined)) == [TEXTS["train"]]
  plain = _cfg(tmp_path)
  assert _texts(sources.load_documents("three_split_text", "validation", plain)) == ["fifth"]


def test_an_unknown_eval_split_is_an_error_naming_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"data\.eval_split='validation\+tst'.*no split 'tst'"):
    sources.load_documents(
      "three_split_text", "validation", _cfg(tmp_path, eval_split="validation+tst")
    )


def test_local_sources_ignore_eval_split(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"0123456789" * 10)
  cfg = _cfg(tmp_path, eval_split="validation+test")
  (doc,) = sources.load_documents(f"text:{tmp_path}/a.txt", "validation", cfg)
  assert doc == b"0123456789"  # the last 10%, as without eval_split
