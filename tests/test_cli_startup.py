"""Start-up of the command-line tools: `import medusa_jax`, every console command's `--help`, and
argument errors checked before loading anything come back without importing JAX, Flax,
transformers or torch (each tool imports those inside `main`, after parsing its flags)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
from helpers import ROOT

HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "transformers", "torch")

# Runs a tool's `main` with `argv` as the command line, then writes its exit status and the heavy
# packages it imported to `out`.
_PROBE = """
import json, sys
module, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import importlib
tool = importlib.import_module(module)
sys.argv = [module] + argv
code = 0
try:
  tool.main()
except SystemExit as e:
  code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
with open(out, "w") as f:
  json.dump({"code": code, "heavy": heavy}, f)
""".replace("set(HEAVY)", repr(set(HEAVY)))


def _tool_modules() -> list[str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  return sorted({target.partition(":")[0] for target in scripts.values()})


def _run(module: str, argv: list[str], tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
  out = os.path.join(tmp_path, "probe.json")
  proc = subprocess.run([sys.executable, "-c", _PROBE, module, out, *argv], capture_output=True,
                        text=True, timeout=120, cwd=ROOT)
  assert os.path.exists(out), proc.stderr
  with open(out) as f:
    return proc, json.load(f)


def test_every_console_tool_is_probed():
  modules = _tool_modules()
  assert {"medusa_jax.cli.generate", "medusa_jax.cli.serve", "medusa_jax.cli.train_heads",
          "medusa_jax.cli.export_hf", "medusa_jax.cli.distill"} <= set(modules)


def test_import_medusa_jax_is_light():
  code = ("import sys, medusa_jax; assert medusa_jax.load.__doc__ and 'EMBEDDED_MODEL' in medusa_jax.__all__; "
          "config = medusa_jax.GenerationConfig(max_new_tokens=3); "
          f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "[]"


def test_the_lazy_names_are_the_real_ones():
  import medusa_jax
  from medusa_jax.decode.engine import Engine, GenerationResult
  from medusa_jax.errors import MedusaError
  from medusa_jax.model.config import preset

  assert medusa_jax.Engine is Engine and medusa_jax.GenerationResult is GenerationResult
  assert medusa_jax.MedusaError is MedusaError and medusa_jax.preset is preset
  assert set(medusa_jax.__all__) <= set(dir(medusa_jax))
  assert all(getattr(medusa_jax, name) is not None for name in medusa_jax.__all__)
  with pytest.raises(AttributeError):
    medusa_jax.no_such_name  # noqa: B018


@pytest.mark.parametrize("module", _tool_modules())
def test_help_imports_no_jax(module, tmp_path):
  proc, probe = _run(module, ["--help"], tmp_path)
  assert probe["code"] in (0, None), proc.stderr
  assert proc.stdout.strip(), f"{module} --help printed nothing"
  assert probe["heavy"] == [], f"{module} --help imported {probe['heavy']}"


@pytest.mark.parametrize("module, argv, message", [
    ("medusa_jax.cli.generate", ["--max-new-tokens", "0"], "error: max_new_tokens must be >= 1, got 0"),
    ("medusa_jax.cli.benchmark", ["--prompts", "p.jsonl", "--max-new-tokens", "0"],
     "error: --max-new-tokens must be at least 1, got 0"),
    ("medusa_jax.cli.serve", ["--max-batch", "0"], "error: --max-batch must be at least 1, got 0"),
    ("medusa_jax.cli.evaluate", ["--data", "d.jsonl", "--out", "r.json", "--strategies", "fast"],
     "error: unknown strategy 'fast'; use greedy, medusa, heads, lookup, beam:W, spec-beam:W, "
     "medusa-beam:WxH[@N]"),
])
def test_a_bad_value_is_a_one_line_error_before_jax(module, argv, message, tmp_path):
  proc, probe = _run(module, argv, tmp_path)
  assert probe["code"] == 2
  assert proc.stderr.strip() == message
  assert probe["heavy"] == [], f"{module} imported {probe['heavy']} before its error"
