"""The tree builder: from how often each path of head guesses was right (`head_accuracy`), the
tree of a given size that accepts the most tokens on the measured positions."""

from __future__ import annotations

import itertools

from medusa_jax.medusa.tree import Path


def tree_from_path_counts(path_counts: dict[Path, int], num_nodes: int, *, num_heads: int,
                          topk: int) -> tuple[Path, ...]:
  """The `num_nodes` paths right most often (`head_accuracy.HeadAccuracy.path_counts`): the tree
  of that size with the most expected accepted tokens on the measured positions. A path is never
  right more often than its parent, so the chosen set is a tree (ties: shorter, then lower ranks
  first). If fewer paths were ever right, the shortest, lowest-rank other paths fill the tree."""
  ranked = sorted((p for p, c in path_counts.items() if c > 0), key=lambda p: (-path_counts[p], len(p), p))
  chosen = ranked[:num_nodes]
  seen = set(chosen)
  for depth in range(1, num_heads + 1):
    for p in itertools.product(range(topk), repeat=depth):
      if len(chosen) >= num_nodes:
        return tuple(chosen)
      if p not in seen:
        chosen.append(p)
  return tuple(chosen)

