"""Atomic directory writes: a temporary sibling directory renamed over the target at the end, so
an interrupted or failed write never leaves a half-written output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from medusa_jax.errors import MedusaError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_dir(path: str, *, force: bool):
  """Yields a temporary directory that becomes `path` only if the block succeeds; an existing
  `path` is replaced only with `force`. The result gets the usual permissions (umask), not the
  private ones of `tempfile.mkdtemp`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise MedusaError(f"{path} is a file; the output is a directory")
  if os.path.exists(path) and not force:
    raise MedusaError(f"{path} exists; pass --force to overwrite")
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise MedusaError(f"cannot create {path}: a parent of it is a file") from None
  tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
  old = None
  try:
    yield tmp
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
      os.chmod(root, 0o777 & ~mask)
      for name in files:
        os.chmod(os.path.join(root, name), 0o666 & ~mask)
    if os.path.exists(path):  # moved aside, not deleted, until the new one is in place
      old = tempfile.mkdtemp(dir=parent, prefix=".old-")
      os.rename(path, os.path.join(old, "d"))
    os.rename(tmp, path)
  except BaseException:
    if old is not None and not os.path.exists(path):
      os.rename(os.path.join(old, "d"), path)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


def write_text(path: str, text: str) -> None:
  """Writes `path` through a temporary sibling renamed over it: readers see the old or the new
  file, never part of one."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
