"""The README and docs/ name only commands, config keys and files that exist.

Reads the Markdown as text; imports nothing heavier than configs/ (no JAX).
"""

import importlib.util
import pathlib
import re

import pytest

from configs import base, reference

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"configs", "modeling", "train", "eval", "launch", "bench"}  # the project's own
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250


def named(pattern: str) -> list[tuple[str, str]]:
  """(file relative to the repo, match) for every match of `pattern` in the docs."""
  return [
    (str(path.relative_to(ROOT)), match)
    for path in DOCS
    for match in re.findall(pattern, path.read_text())
  ]


def module_exists(name: str) -> bool:
  if name.partition(".")[0] not in PACKAGES:
    return importlib.util.find_spec(name) is not None  # pytest, venv, pip: top-level, cheap
  path = ROOT.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_docs_exist():
  assert (ROOT / "README.md") in DOCS and len(DOCS) > 10


def test_every_python_m_module_exists():
  modules = named(r"python -m ([A-Za-z_][\w.]*\w)")
  assert any(m == "train.main" for _, m in modules)
  missing = sorted({(f, m) for f, m in modules if not module_exists(m)})
  assert not missing, f"`python -m` of modules that do not exist: {missing}"


def declared(key: str) -> bool:
  node = base.get_config()
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def test_every_config_override_is_a_declared_key():
  keys = named(r"--config\.([A-Za-z_][\w.]*\w)")
  assert any(k == "train.steps" for _, k in keys)
  unknown = sorted({(f, k) for f, k in keys if not declared(k)})
  assert not unknown, f"--config.<key> of keys configs/base.py does not declare: {unknown}"


def test_declared_rejects_unknown_keys():
  assert declared("model.num_heads") and declared("seed")
  assert not declared("model.num_head") and not declared("train.steps.x")


def test_config_reference_is_current():
  assert reference.OUTPUT.read_text() == reference.render(), (
    "docs/reference/config.md is stale: run python -m configs.reference"
  )


def test_config_reference_lists_every_key_with_a_comment():
  text = reference.OUTPUT.read_text()
  notes = reference.comments((ROOT / "configs" / "base.py").read_text())
  for key, _ in reference.leaves(base.get_config()):
    if key != "logical_axis_rules":
      assert f"| `{key}` |" in text
      assert notes.get(key), f"configs/base.py: {key} has no comment"


def test_readme_is_short():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_quickstart_keeps_the_ci_command():
  text = (ROOT / "README.md").read_text()
  quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  command = re.search(r"^pip install -e '\.\[test\]' && python -m pytest (.*)$", quickstart, re.M)
  assert command and command.group(1).split()[-1] == "tests", "the suite's command"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(path):
  links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
  local = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
  missing = [link for link in local if not (path.parent / link).exists()]
  assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_no_doc_names_a_path_outside_the_repository():
  outside = named(r"\.\./shared\S*")
  assert not outside, f"paths outside the repository: {outside}"
