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

import dataclasses
import functools
import hashlib
import importlib.util
import os
import threading

from medusa_jax.atomic import atomic_file

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


# ---- compiled executables, found without tracing ----------------------------------------------
#
# JAX's cache above still traces and lowers a program to find it (seconds for a whole decode
# loop). `Engine` also keeps each compiled loop under a key made of what the program depends on
# (the function, its static arguments, the inputs' structure, shapes, dtypes and shardings, the
# versions, devices and this package's source), so a later process loads it without tracing. A
# static argument this module cannot describe exactly leaves the program out of this cache.


def _describe(x) -> str | None:
  """A text that differs whenever `x`, a static argument, could change a traced program; None
  when that cannot be told."""
  import numpy as np

  if x is None or isinstance(x, (bool, int, float, str, bytes)):
    return repr(x)
  if isinstance(x, type):
    return f"{x.__module__}.{x.__qualname__}"
  if isinstance(x, (tuple, list)):
    parts = [_describe(v) for v in x]
    return None if None in parts else f"{type(x).__name__}({', '.join(parts)})"
  if isinstance(x, dict):
    parts = [(_describe(k), _describe(v)) for k, v in x.items()]
    return None if any(None in p for p in parts) else "{" + ", ".join(f"{k}: {v}" for k, v in parts) + "}"
  if isinstance(x, np.ndarray):
    return f"array({x.dtype}, {x.shape}, {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()})"
  if isinstance(x, np.dtype):
    return str(x)
  kind = type(x)
  name = f"{kind.__module__}.{kind.__qualname__}"
  if name.startswith(("flax.nnx.graph", "jax.")) or kind.__name__ in ("GraphDef", "Mesh", "NodeDef"):
    return f"{name}:{x!r}"  # graph definitions and meshes print everything they hold
  if dataclasses.is_dataclass(x):
    fields = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
  elif hasattr(x, "__dict__"):  # cached properties are derived from the rest
    fields = {k: v for k, v in vars(x).items() if not isinstance(getattr(kind, k, None), functools.cached_property)}
  else:
    return None
  inner = _describe(fields)
  return None if inner is None else f"{name}{inner}"


@functools.cache
def _environment() -> str:
  """The versions, devices, flags and this package's source that every program depends on."""
  import flax
  import jax
  import jaxlib

  digest = hashlib.sha256()
  package = os.path.dirname(os.path.abspath(__file__))
  for folder, dirs, files in sorted(os.walk(package)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, package).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  return repr((jax.__version__, jaxlib.__version__, flax.__version__, devices, os.environ.get("XLA_FLAGS"),
               jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision, digest.hexdigest()))


def _program_path(name: str, static: dict, args) -> str | None:
  import jax

  if _switched_off() or not enable_compilation_cache():
    return None
  described = _describe(static)
  if described is None:
    return None
  leaves = [(x.shape, str(x.dtype), repr(getattr(x, "sharding", None))) for x in jax.tree.leaves(args)]
  key = repr((1, name, described, str(jax.tree.structure(args)), leaves, _environment()))
  return os.path.join(cache_dir(), "programs", f"{name}-{hashlib.sha256(key.encode()).hexdigest()}")


_hits = threading.local()  # JAX persistent-cache hits of the compilation running in this thread


@functools.cache
def _listen_for_cache_hits() -> None:
  import jax.monitoring

  def count(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      _hits.count = getattr(_hits, "count", 0) + 1

  jax.monitoring.register_event_listener(count)


def compiled_program(fn, args: tuple, static: dict):
  """`fn.lower(*args, **static).compile()` (a jitted function), read from the cache when an earlier
  process compiled it, else compiled and written there."""
  import pickle

  import jax
  from jax.experimental import serialize_executable

  path = _program_path(fn.__name__, static, args)
  if path is not None and os.path.isfile(path):
    try:
      with open(path, "rb") as f:
        serialized, device_ids = pickle.load(f)
      devices = {d.id: d for d in jax.devices()}
      return serialize_executable.deserialize_and_load(*serialized,
                                                       execution_devices=[devices[i] for i in device_ids])
    except Exception:  # written by another version, or damaged: compile it again
      pass
  _listen_for_cache_hits()
  _hits.count = 0
  program = fn.lower(*args, **static).compile()
  if path is not None and not _hits.count:  # (an executable JAX read from its own cache does not
    try:  # serialise whole on every backend); with the devices it runs on, in their order (a mesh's)
      device_ids = [d.id for d in program.runtime_executable().local_devices()]
      data = pickle.dumps((serialize_executable.serialize(program), device_ids))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    except Exception:  # a backend that cannot serialise it, or a full disk: keep it in memory only
      pass
  return program
