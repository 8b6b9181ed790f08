"""Every ```python block of README.md runs as written on a fresh clone, each in its own process
from the repository root (the embedded model and its shipped heads, nothing trained first)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import ROOT

README = pathlib.Path(ROOT) / "README.md"


def python_blocks(text: str) -> list[str]:
  """The bodies of the fenced blocks opened with ```python (at the start of a line)."""
  return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_examples():
  assert BLOCKS, "README.md has no ```python blocks"


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block-{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(code):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, (
      f"README block exited with {result.returncode}:\n{code}\n--- stderr ---\n{result.stderr[-6000:]}")
