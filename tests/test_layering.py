"""Imports only go down: configs < modeling < train/data < train < eval < launch, bench.

Every module's imports (module level and inside functions) are parsed, not executed, and
each edge between the project's layers is checked against the rules below.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "modeling", "train", "eval", "launch", "bench")
# layer -> the modules it may import (a prefix matches the module and its submodules)
ALLOWED = {
  "configs": ("configs",),
  "modeling": ("modeling",),
  "train.data": ("train.data", "modeling.vocab"),
  "train": ("train", "modeling", "configs"),
  "eval": ("eval", "train", "modeling", "configs"),
  "launch": PACKAGES,
  "bench": PACKAGES,
}


def layer(module: str) -> str:
  return "train.data" if module.startswith("train.data") else module.split(".")[0]


def project_imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
  """(line, imported module) for each import of a project module in the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against the package
        base = module.split(".")[: -node.level]
        names = [".".join(base + ([node.module] if node.module else []))]
      else:
        names = [node.module]
      if names[0] in PACKAGES:  # `from train import families` imports train.families
        names = [f"{names[0]}.{a.name}" for a in node.names]
    else:
      continue
    out += [(node.lineno, n) for n in names if n and n.split(".")[0] in PACKAGES]
  return out


def modules(root: pathlib.Path = ROOT) -> list[tuple[pathlib.Path, str]]:
  found = []
  for package in PACKAGES:
    for path in sorted((root / package).rglob("*.py")):
      found.append((path, ".".join(path.relative_to(root).with_suffix("").parts)))
  return found


def upward_edges(root: pathlib.Path = ROOT) -> list[str]:
  bad = []
  for path, module in modules(root):
    allowed = ALLOWED[layer(module)]
    for line, imported in project_imports(path, module):
      if not any(imported == a or imported.startswith(a + ".") for a in allowed):
        bad.append(f"{path.relative_to(root)}:{line}: {module} imports {imported}")
  return bad


def test_imports_only_go_down():
  assert len(modules()) > 50  # the walk found the project
  assert upward_edges() == []


def test_the_rules_catch_an_upward_import(tmp_path):
  """Edges the rules forbid are reported with their file and line; allowed ones are not."""
  files = {
    "modeling/bad.py": "import jax\nfrom modeling import layers\nfrom train import trainer\n",
    "train/data/bad.py": "from modeling.vocab import EOS_ID\nfrom modeling.transformer import x\n",
    "eval/ok.py": "from train import trainer\nfrom modeling import decoding\n",
    "configs/bad.py": "def f():\n  import eval.main\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert sorted(upward_edges(tmp_path)) == [
    "configs/bad.py:2: configs.bad imports eval.main",
    "modeling/bad.py:3: modeling.bad imports train.trainer",
    "train/data/bad.py:2: train.data.bad imports modeling.transformer",
  ]


MODELING = [m for _, m in modules() if layer(m) == "modeling"]


def test_importing_modeling_loads_no_training_or_data_libraries():
  code = (
    "import importlib, sys\n"
    f"for m in {MODELING!r}: importlib.import_module(m)\n"
    "heavy = ('train', 'eval', 'tensorflow_datasets', 'grain', 'orbax', 'tensorflow')\n"
    "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("module", ["train.data.pipeline", "train.data.tokenizers"])
def test_importing_the_data_layer_loads_no_model_code_but_vocab(module):
  code = f"import sys, {module}\nprint(sorted(m for m in sys.modules if m.startswith('modeling')))"
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() in ("[]", "['modeling', 'modeling.vocab']"), out.stdout
