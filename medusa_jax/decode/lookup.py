"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the text's last
n-gram (n = `max_ngram` down to 1) in the prompt and the output so far. Found on the device with
static shapes: every n and every start position are compared at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medusa_jax.model.rows import gather_rows


def lookup_continuation(history: jax.Array, length: jax.Array, num_tokens: int,
                        max_ngram: int, min_ngram: int = 1) -> tuple[jax.Array, jax.Array]:
  """history `[batch, H]` (prompt then output, valid below `length` `[batch]`) -> (the
  `num_tokens` tokens after the latest match `[batch, num_tokens]`, how many of them lie inside
  the history `[batch]`, 0 where no n-gram matched; the others are 0). A match is the last n
  tokens (`max_ngram` >= n >= `min_ngram`) occurring again ending before the last position; the
  longest n that matches wins, then the latest start."""
  batch, size = history.shape
  starts = jnp.arange(size)[None, :]
  padded = jnp.pad(history, ((0, 0), (0, max_ngram)), constant_values=-1)
  cont = jnp.full((batch,), -1, jnp.int32)  # where the continuation starts; -1: no match yet
  for n in range(max_ngram, min_ngram - 1, -1):
    suffix = gather_rows(history, length[:, None] - n + jnp.arange(n)[None, :])  # [b, n]
    match = (starts + n < length[:, None]) & (length[:, None] > n)
    for i in range(n):
      match &= padded[:, i:i + size] == suffix[:, i:i + 1]
    latest = jnp.max(jnp.where(match, starts, -1), axis=1)
    cont = jnp.where((cont < 0) & (latest >= 0), latest + n, cont)
  index = cont[:, None] + jnp.arange(num_tokens)[None, :]
  valid = jnp.where(cont >= 0, jnp.minimum(length - cont, num_tokens), 0)
  tokens = jnp.where(jnp.arange(num_tokens)[None, :] < valid[:, None], gather_rows(history, index), 0)
  return tokens.astype(jnp.int32), valid.astype(jnp.int32)
