"""The project's cache directory, and JAX's persistent compilation cache in it.

`cache_dir()`: `$MEDUSA_JAX_CACHE`, else `~/.cache/medusa_jax`. It holds converted GGUF files
(`weights/specs.py`) and, under `jax/`, compiled programs: on by default, a program compiled once
(a decode loop, a server chunk, a training step) is read back from disk by the next process that
needs it, on CPU, GPU and TPU alike (JAX caches executables on every backend that can serialise
them). `MEDUSA_JAX_COMPILATION_CACHE=0` turns that off; a cache directory configured in JAX itself
(`jax_compilation_cache_dir`) is left as it is. Every program counts, however small or quick to
compile; the cache is bounded (LRU eviction under a file lock, so processes may share it). Its
contents are trusted code: do not point it at a directory others can write to.
"""

from __future__ import annotations

import importlib.util
import os

SWITCH = "MEDUSA_JAX_COMPILATION_CACHE"
MAX_BYTES = 4 << 30


def cache_dir() -> str:
  """The project's cache directory."""
  return os.environ.get("MEDUSA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medusa_jax")


def _switched_off() -> bool:
  return os.environ.get(SWITCH, "1").strip().lower() in ("0", "off", "false", "no")


def enable_compilation_cache() -> str | None:
  """Turns the persistent compilation cache on for this process (idempotent; takes effect for
  programs compiled from then on); returns its directory, or None when it is off."""
  import jax

  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  if _switched_off():
    return None
  path = os.path.join(cache_dir(), "jax")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:  # an unwritable home: compile as without a cache
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if importlib.util.find_spec("filelock") is not None:  # LRU eviction needs it
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path

