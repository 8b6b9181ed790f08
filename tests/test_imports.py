"""The package's import graph, read from the source (imports inside functions too): no cycles, and
each package imports only the packages below it (`ALLOWED`)."""

from __future__ import annotations

import ast
import os

import pytest
from helpers import ROOT

PACKAGE = os.path.join(ROOT, "medusa_jax")

# What each part of the package may import (besides itself). `""` is `medusa_jax/__init__.py`.
ALLOWED = {
    "errors": set(),
    "cache": set(),
    "atomic": {"errors"},
    "model": {"errors"},
    "medusa": {"errors", "atomic", "model"},
    "weights": {"errors", "atomic", "cache", "model"},
    "decode": {"errors", "cache", "model", "medusa"},
    "training": {"errors", "atomic", "cache", "model", "medusa", "weights"},
    "formats": {"errors", "atomic", "model", "medusa", "weights", "training"},
    "tuning": {"errors", "model", "medusa", "decode"},
    "serve": {"errors", "model", "decode"},
    "onnx": {"errors", "atomic", "model", "medusa"},
    "eval": {"errors"},
    "cli": {"", "errors", "atomic", "cache", "model", "medusa", "weights", "decode", "training", "formats",
            "tuning", "serve", "onnx", "eval"},
    "": {"errors", "cache", "model", "medusa", "weights", "decode", "formats"},
}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        found[_module_name(path)] = path
  return found


def _resolve(name: str, modules: dict[str, str]) -> str:
  """The package module an imported dotted name lives in (a function or class name drops off)."""
  while name not in modules:
    name = name.rpartition(".")[0]
  return name


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names if a.name.split(".")[0] == "medusa_jax")
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
          node.module.split(".")[0] == "medusa_jax":
        targets.update(f"{node.module}.{a.name}" for a in node.names)
    graph[module] = {_resolve(t, modules) for t in targets} - {module}
  return graph


def _part(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "medusa_jax.formats.layout" in graph["medusa_jax"]  # `load` imports it in its body
  assert "medusa_jax.decode.engine" in graph["medusa_jax"]


def test_no_import_cycles():
  graph = import_graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done

  def visit(module: str, path: list[str]):
    state[module] = 1
    for dep in sorted(graph[module]):
      if state.get(dep) == 1:
        pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [module, dep]))
      if dep not in state:
        visit(dep, path + [module])
    state[module] = 2

  for module in sorted(graph):
    if module not in state:
      visit(module, [])


def test_no_upward_imports():
  graph = import_graph()
  assert {_part(m) for m in graph} <= set(ALLOWED), sorted({_part(m) for m in graph} - set(ALLOWED))
  wrong = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                 if _part(d) != _part(m) and _part(d) not in ALLOWED[_part(m)])
  assert not wrong, wrong
