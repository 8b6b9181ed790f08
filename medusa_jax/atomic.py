"""Atomic writes, the one way every output is written: a temporary sibling (directory or file)
renamed over the target at the end, so an interrupted or failed write never leaves a half-written
output."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from medusa_jax.errors import MedusaError


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_dir(path: str, *, force: bool = False, keep_existing: bool = False):
  """Yields a temporary directory that becomes `path` only if the block succeeds; an existing
  `path` is replaced only with `force`, or kept (the new one discarded) with `keep_existing`, for
  caches that several processes may fill at once. The result gets the usual permissions (umask),
  not the private ones of `tempfile.mkdtemp`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise MedusaError(f"{path} is a file; the output is a directory")
  if os.path.exists(path) and not (force or keep_existing):
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
    if os.path.exists(path) and keep_existing:
      return
    if os.path.exists(path):  # moved aside, not deleted, until the new one is in place
      old = tempfile.mkdtemp(dir=parent, prefix=".old-")
      os.rename(path, os.path.join(old, "d"))
    try:
      os.rename(tmp, path)
    except OSError:
      if not (keep_existing and os.path.isdir(path)):  # else another process just wrote it
        raise
  except BaseException:
    if old is not None and not os.path.exists(path):
      os.rename(os.path.join(old, "d"), path)
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
  """Yields a temporary sibling path (same extension, so writers that pick a format by it keep
  working) that replaces `path` only if the block succeeds: readers see the old or the new file,
  never part of one, and a failed write leaves no temporary file behind."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (`atomic_file`)."""
  with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, obj, **dump_kwargs) -> None:
  """Writes `obj` as JSON to `path` atomically."""
  write_text(path, json.dumps(obj, **dump_kwargs))
