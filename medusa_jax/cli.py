"""Shared command-line plumbing: one-line errors instead of tracebacks, JSON output."""

from __future__ import annotations

import functools
import os
import sys


def quiet_logs() -> None:
  """Silences TensorFlow/XLA C++ log spam and transformers' advisory warnings for CLI use."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")


def require_positive(args, *names: str) -> None:
  """A one-line error for the first of these argparse flags (None: not given) below 1."""
  from medusa_jax.errors import MedusaError

  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      raise MedusaError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main_guard(fn):
  """Runs `fn`; a MedusaError (bad input) or a missing file prints `error: ...` and exits 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    from medusa_jax.errors import MedusaError

    try:
      return fn(*args, **kwargs)
    except (MedusaError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper
