"""Per-row array operations for batches whose rows sit at different offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_rows(buf: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """Writes `new` `[batch, n, ...]` into `buf` `[batch, size, ...]` at row offsets `start` `[batch]`.

  One scatter (in place inside a loop); positions past `size` are dropped.
  """
  b, n = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  cols = start[:, None] + jnp.arange(n)[None, :]
  return buf.at[rows, cols].set(new.astype(buf.dtype), mode="drop")


def gather_rows(buf: jax.Array, index: jax.Array) -> jax.Array:
  """`buf` `[batch, size, ...]`, `index` `[batch, n]` -> `[batch, n, ...]` (per-row take)."""
  return jnp.take_along_axis(buf, index.reshape(index.shape + (1,) * (buf.ndim - 2)), axis=1,
                             mode="clip")
