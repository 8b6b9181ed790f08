"""The KV cache: a pytree of per-layer key/value buffers and a length per batch row.

Row `b` holds valid entries at positions `[0, lengths[b])`. A forward writes the K/V of its
`T` new tokens at `[lengths[b], lengths[b] + T)` and leaves `lengths` alone: the caller commits
(`advance`) or compacts (`commit_path`) what it keeps. Entries past `lengths` are never attended.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from medusa_jax.model.config import ModelConfig
from medusa_jax.model.rows import gather_rows, write_rows
from medusa_jax.model.sharding import named_sharding

AXES = ("batch", "seq", "kv_heads", "head_dim")  # logical axes of each K/V buffer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  keys: tuple[jax.Array, ...]    # per layer `[rows, max_len, kv_heads, head_dim]`
  values: tuple[jax.Array, ...]  # per layer `[rows, max_len, kv_heads, head_dim]`
  lengths: jax.Array             # `[batch]` int32 (batch <= rows: a forward uses the first rows)
  span: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  # positions a forward attends to (None: all of max_len); every entry a forward writes or reads
  # must lie below it, so a server with long rows pays attention only for the lengths in use

  @property
  def attended(self) -> int:
    return self.span or self.max_len

  @classmethod
  def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32,
           mesh: Mesh | None = None) -> "KVCache":
    """An empty cache; on `mesh` its buffers are sharded by the logical axis rules: rows over
    data x fsdp (where they divide), kv heads over tensor."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)

    def zeros():  # a buffer per layer (a chunk donates each)
      if mesh is None:
        return tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
      sharding = named_sharding(AXES, shape, mesh)
      return tuple(jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)
                   for _ in range(config.num_layers))

    return cls(keys=zeros(), values=zeros(), lengths=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.keys[0].shape[1]

  def write(self, layer: int, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K/V buffers of `layer` with `k`, `v` `[batch, T, kv_heads, head_dim]` written at `lengths`."""
    return write_rows(self.keys[layer], k, self.lengths), write_rows(self.values[layer], v, self.lengths)

  def take_rows(self, rows: jax.Array) -> "KVCache":
    """The cache of rows `rows` `[n]` (beam search's reordering; repeats allowed)."""
    return dataclasses.replace(self, keys=tuple(jnp.take(k, rows, axis=0) for k in self.keys),
                               values=tuple(jnp.take(v, rows, axis=0) for v in self.values),
                               lengths=jnp.take(self.lengths, rows))

  def advance(self, n: jax.Array) -> "KVCache":
    """Commits the next `n` `[batch]` written entries of each row."""
    return dataclasses.replace(self, lengths=self.lengths + n.astype(jnp.int32))

  def commit_path(self, offsets: jax.Array, n: jax.Array) -> "KVCache":
    """Moves entries `lengths + offsets[:, j]` to `lengths + j` and commits `n` `[batch]` of them.

    `offsets` `[batch, k]` must satisfy `offsets[:, j] >= j` (a tree path in node order), so
    reading every source before writing is safe.
    """
    src = self.lengths[:, None] + offsets

    def move(buf):
      return write_rows(buf, gather_rows(buf, src), self.lengths)

    return dataclasses.replace(self, keys=tuple(move(k) for k in self.keys),
                               values=tuple(move(v) for v in self.values),
                               lengths=self.lengths + n.astype(jnp.int32))


def attention_mask(lengths: jax.Array, chunk_mask: jax.Array, max_len: int) -> jax.Array:
  """`[batch, T, max_len]` bool: query `i` of the chunk written at `lengths` sees the cached prefix
  `[0, lengths)` and the chunk positions `j` where `chunk_mask[i, j]` (causal or tree mask `[T, T]`,
  or one per row `[batch, T, T]`)."""
  t = chunk_mask.shape[-1]
  rel = jnp.arange(max_len)[None, :] - lengths[:, None]  # [b, S]
  in_chunk = (rel >= 0) & (rel < t)
  chunk_mask = jnp.broadcast_to(chunk_mask, (lengths.shape[0], t, t))
  chunk = jnp.take_along_axis(chunk_mask, jnp.clip(rel, 0, t - 1)[:, None, :], axis=2)  # [b, T, S]
  return (rel < 0)[:, None, :] | (in_chunk[:, None, :] & chunk)
