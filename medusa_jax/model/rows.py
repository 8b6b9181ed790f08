"""Per-row array operations for batches whose rows sit at different offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes `new` `[batch, n, ...]` into the first `batch` rows of `buf` `[rows, size, ...]` at
  offsets `start` `[batch]`.

  One scatter (in place inside a loop); positions past `size` are dropped.
  """
  b, n = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  cols = start[:, None] + jnp.arange(n)[None, :]
  return buf.at[rows, cols].set(new.astype(buf.dtype), mode="drop")


def gather_rows(buf: jax.Array, index: jax.Array) -> jax.Array:
  """`buf` `[rows, size, ...]`, `index` `[batch, n]` -> `[batch, n, ...]`: per-row take from the
  first `batch` rows (indices clipped to the buffer)."""
  rows = jnp.arange(index.shape[0])[:, None]
  return buf[rows, jnp.clip(index, 0, buf.shape[1] - 1)]
