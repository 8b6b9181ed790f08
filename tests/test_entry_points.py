"""The command-line entry points: every console command of pyproject.toml names a `main` of
`medusa_jax.cli`, each `infer/` and `train/` script runs that same `main`, and an installed command
answers `--help`."""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import tomllib

import pytest
from helpers import ROOT


def _scripts() -> dict[str, str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


def test_console_commands_name_cli_mains():
  scripts = _scripts()
  assert {"medusa-generate", "medusa-benchmark", "medusa-export", "medusa-train"} <= set(scripts)
  for target in scripts.values():
    module, _, attr = target.partition(":")
    assert module.startswith("medusa_jax.cli.") and callable(getattr(importlib.import_module(module), attr))


@pytest.mark.parametrize("folder", ["infer", "train"])
def test_scripts_are_thin_wrappers_of_the_same_mains(folder):
  mains = {target.partition(":")[0] for target in _scripts().values()}
  for name in sorted(os.listdir(os.path.join(ROOT, folder))):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(ROOT, folder, name)) as f:
      tree = ast.parse(f.read())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [(f"medusa_jax.cli.{name[:-3]}", ["main"])]
    assert f"medusa_jax.cli.{name[:-3]}" in mains  # also a console command


def test_an_installed_command_answers_help():
  command = shutil.which("medusa-generate")
  if command is None:
    pytest.skip("the package is not installed with its console commands")
  proc = subprocess.run([command, "--help"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "--max-new-tokens" in proc.stdout and "--acceptance" in proc.stdout
