"""What a training step consumes: typed batches (registered pytrees), one type per kind of data.

- `SequenceBatch`: packed conversations; the backbone runs inside the step.
- `PositionBatch`: labelled positions with their backbone hidden states already computed (Medusa-1
  with a frozen backbone, `cache.hidden`; `hidden_cache.py`), optionally with the teacher's
  distribution at each head's target (`heads.teacher_top_k`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SequenceBatch:
  tokens: jax.Array  # `[batch, seq]` int32
  mask: jax.Array    # `[batch, seq]` bool: assistant tokens (the ones heads learn to guess)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PositionBatch:
  hidden: jax.Array                   # `[n, embed]` backbone final-norm hidden states
  next_tokens: jax.Array              # `[n]` the token after each position (the tree's root there)
  targets: jax.Array                  # `[n, num_heads]` each head's target token
  valid: jax.Array                    # `[n, num_heads]` where that target is an assistant token
  soft_ids: jax.Array | None = None   # `[n, num_heads, M]` teacher's top-M token ids at the target
  soft_probs: jax.Array | None = None  # `[n, num_heads, M]` their renormalised probabilities

  @property
  def path(self) -> jax.Array:
    """`[n, num_heads]` the tokens at t + 1 .. t + num_heads: what Hydra heads read (teacher
    forcing)."""
    return jax.numpy.concatenate([self.next_tokens[:, None], self.targets[:, :-1]], axis=1)

  @property
  def soft(self) -> tuple[jax.Array, jax.Array] | None:
    return None if self.soft_ids is None else (self.soft_ids, self.soft_probs)


def rows(batch, index: np.ndarray):
  """The rows `index` of a host batch (NumPy leaves), as the same type."""
  return jax.tree.map(lambda v: v[index], batch)


def num_rows(batch) -> int:
  return len(jax.tree.leaves(batch)[0])


def concat(batches: list):
  """Host batches of one type, concatenated along rows."""
  return jax.tree.map(lambda *v: np.concatenate(v), *batches)
