"""`pystdlib`: the embedded default corpus, the running interpreter's standard library.

Every `*.py` file under the stdlib (site-/dist-packages excluded) is one example, packaged
as a real TFDS dataset so it is built once into the TFDS data dir and then read like any
other (`tfds.data_source`). Importing this module registers the builder as `pystdlib`.
The config name carries the Python version (`py3.11`): stdlibs differ between versions.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
VALIDATION_PERCENT = 10  # files whose md5(relative path) % 100 falls below go to validation
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard-library directory."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def list_files(root: pathlib.Path) -> list[str]:
  """Sorted POSIX paths, relative to `root`, of the `*.py` files outside installed packages."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    rel_dir = pathlib.Path(dirpath).relative_to(root)
    found.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
  return sorted(found)


def split_of(rel_path: str) -> str:
  """`validation` or `train`, decided by the path alone so it never changes between builds."""
  bucket = int(hashlib.md5(rel_path.encode("utf-8")).hexdigest(), 16) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


class Pystdlib(tfds.core.GeneratorBasedBuilder):
  """The Python standard library's source files, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(
      name=f"py{PY_VERSION}", description=f"Python {PY_VERSION} standard library"
    )
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default resolves builders outside its own package through the optional
    # `importlib_resources`; this file's path is all it needs (to look for checksums).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` wants a TFDS package directory; build the info directly.
    return tfds.core.DatasetInfo(
      builder=self,
      description="Source files (*.py) of the running Python's standard library.",
      features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "path": tfds.features.Text()}
      ),
      homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # nothing to download
    root = stdlib_dir()
    files = list_files(root)
    if not files:
      raise ValueError(f"pystdlib: no *.py files found under the stdlib directory {root}")
    by_split: dict[str, list[str]] = {"train": [], "validation": []}
    for rel_path in files:
      by_split[split_of(rel_path)].append(rel_path)
    return {name: self._generate_examples(root, paths) for name, paths in by_split.items()}

  def _generate_examples(self, root: pathlib.Path, rel_paths: list[str]) -> Iterator:
    for rel_path in rel_paths:
      text = (root / rel_path).read_bytes().decode("utf-8", errors="replace")
      yield rel_path, {"text": text, "path": rel_path}
