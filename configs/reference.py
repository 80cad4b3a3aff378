"""Writes docs/reference/config.md from configs/base.py: every key, its default, its comment.

  python -m configs.reference          # (re)writes docs/reference/config.md
  python -m configs.reference --check  # exits 1 when the committed file is stale

Defaults come from `base.get_config()`; the comments from base.py's source (the comment
that ends an assignment's line, else the comment lines right above it).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import pathlib
import sys
import tokenize

import ml_collections

from configs import base

OUTPUT = pathlib.Path(__file__).resolve().parent.parent / "docs" / "reference" / "config.md"

HEADER = """\
# Config reference

Generated from `configs/base.py` by `python -m configs.reference`; do not edit by hand.
Presets (`configs/gpt.py`, `configs/bert.py`, ...) start from these defaults and override
some of them; any key can be set on the command line with `--config.<key>=<value>`.
"""


def comments(source: str) -> dict[str, str]:
  """Maps each dotted key `get_config` assigns (`c.data.name = ...` -> `data.name`) to its
  comment ("" if none), in the order of the source."""
  line_comment = {}  # line number -> text of a comment on that line
  standalone = set()  # lines holding only a comment
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
      if not tok.line[: tok.start[1]].strip():
        standalone.add(tok.start[0])

  out = {}
  function = next(
    n
    for n in ast.walk(ast.parse(source))
    if isinstance(n, ast.FunctionDef) and n.name == "get_config"
  )
  for stmt in function.body:
    if not isinstance(stmt, ast.Assign | ast.AnnAssign):
      continue
    target = stmt.targets[0] if isinstance(stmt, ast.Assign) else stmt.target
    key = dotted(target)
    if key is None:
      continue
    trailing = [
      line_comment[n]
      for n in (stmt.end_lineno, stmt.lineno)
      if n in line_comment and n not in standalone
    ]
    above, n = [], stmt.lineno - 1
    while n in standalone:
      above.insert(0, line_comment[n])
      n -= 1
    out[key] = trailing[0] if trailing else " ".join(above)
  return out


def preamble(source: str) -> str:
  """The comment lines that open `get_config`'s body (how derived keys work), or ""."""
  function = next(
    n
    for n in ast.walk(ast.parse(source))
    if isinstance(n, ast.FunctionDef) and n.name == "get_config"
  )
  start, first = function.lineno, function.body[0]
  if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):  # a docstring
    start, first = first.end_lineno, function.body[1]
  block = []
  for line in source.splitlines()[start : first.lineno - 1]:
    text = line.strip()
    if text.startswith("#"):
      block.append(text[2:] if text.startswith("# ") else text[1:])
  return "\n".join(block)


def dotted(node: ast.expr) -> str | None:
  """`c.data.name` -> "data.name"; None for anything not rooted at the config `c`."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.insert(0, node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == "c" and parts:
    return ".".join(parts)
  return None


def leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted key, value) of every key that is not itself a ConfigDict."""
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}", value


def cell(text: str) -> str:
  """Text safe inside a Markdown table cell."""
  return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def code(value) -> str:
  """A default as a code span in a table cell."""
  text = json.dumps(value) if isinstance(value, str) else repr(value)
  return "`" + text.replace("|", "\\|") + "`"


def render() -> str:
  """The text of docs/reference/config.md."""
  notes = comments(pathlib.Path(base.__file__).read_text())
  config = base.get_config()
  order = {key: i for i, key in enumerate(notes)}  # ConfigDict.items() sorts by name
  sections: dict[str, list[tuple[str, object]]] = {}
  for key, value in sorted(leaves(config), key=lambda kv: order.get(kv[0], len(order))):
    if key == "logical_axis_rules":
      continue  # its own table below
    section = key.partition(".")[0] if "." in key else ""
    sections.setdefault(section, []).append((key, value))

  out = [HEADER]
  derived = preamble(pathlib.Path(base.__file__).read_text())
  if derived:
    out.append(f"## Derived keys\n\n```text\n{derived}\n```\n")
  for section, rows in sections.items():
    out.append(f"## {f'`{section}`' if section else 'Top level'}\n")
    if notes.get(section):
      out.append(cell(notes[section]) + "\n")
    out.append("| key | default | meaning |\n| --- | --- | --- |")
    out += [f"| `{key}` | {code(value)} | {cell(notes.get(key, ''))} |" for key, value in rows]
    out.append("")

  if "logical_axis_rules" in config:
    out.append("## `logical_axis_rules`\n")
    if notes.get("logical_axis_rules"):
      out.append(cell(notes["logical_axis_rules"]) + "\n")
    out.append("| logical axis | mesh axes |\n| --- | --- |")
    for name, axes in config.logical_axis_rules:
      if axes is None:
        shown = "none (replicated)"
      else:
        shown = ", ".join(f"`{a}`" for a in ((axes,) if isinstance(axes, str) else axes))
      out.append(f"| `{name}` | {shown} |")
    out.append("")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
  args = parser.parse_args(argv)
  text = render()
  if args.check:
    if not OUTPUT.exists() or OUTPUT.read_text() != text:
      print(f"{OUTPUT} is stale: run python -m configs.reference", file=sys.stderr)
      return 1
    return 0
  OUTPUT.parent.mkdir(parents=True, exist_ok=True)
  OUTPUT.write_text(text)
  print(f"wrote {OUTPUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
