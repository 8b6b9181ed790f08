"""Medusa candidate trees and the static buffers built from them, once per tree.

A tree is a set of paths ("medusa_choices") of 0-based ranks: `(a, b, c)` is head 0's guess of
rank `a` (0: its top guess), then head 1's of rank `b`, then head 2's of rank `c`. Node 0 is the root (the token the base model just
chose); nodes 1..n are the paths sorted by (depth, path), so a parent always precedes its children.

Buffers (NumPy, static under jit):
  mask             `[T, T]` bool: node i sees itself and its ancestors (T = n + 1)
  depths           `[T]` int: 0 for the root; a node's position is prefix length + depth
  candidate_index  `[T]` int: index into the flat candidates `[root, head0 top-k, head1 top-k, ...]`
  retrieve         `[L, D + 1]` int: for each leaf, the node indices root -> leaf, padded with 0
  retrieve_mask    `[L, D + 1]` bool: which entries of `retrieve` are real (no -1 tricks)
  internal         `[I]` int: the nodes with children, root first (acceptance reads only their logits)
  parent_slot      `[T]` int: where each node's parent sits in `internal` (0 for the root)
  earlier_siblings `[T, T]` bool: [n, s] when s shares n's parent and comes before it (a lower
                   rank of the same head); lossless sampling tries siblings in this order

The verifier (`decode/speculative.py`, `decode/acceptance.py`) reads them as `TreeArrays`, one set
per batch row: a static tree's broadcast (`Tree.arrays`), or a tree built on the device each
step (`dynamic_tree.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.errors import MedusaError

Path = tuple[int, ...]

# The reference's default tree for Vicuna-7B (63 nodes: 10/28/23/2 at depth 1/2/3/4).
MC_SIM_7B_63: tuple[Path, ...] = tuple(tuple(p) for p in [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0],
    [0, 5], [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0],
    [0, 9], [8], [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5],
    [0, 0, 0, 0], [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9],
    [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0],
    [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
])

# The reference's tree measured for Medusa-2 Vicuna-7B heads ("vicuna_7b_stage2", 63 nodes).
VICUNA_7B_STAGE2: tuple[Path, ...] = (
    (0,), (0, 0), (1,), (0, 1), (0, 0, 0), (1, 0), (2,), (0, 2), (0, 0, 1), (0, 3), (3,), (0, 1, 0),
    (2, 0), (4,), (0, 0, 2), (0, 4), (1, 1), (1, 0, 0), (0, 0, 0, 0), (5,), (0, 0, 3), (0, 5),
    (0, 2, 0), (3, 0), (0, 1, 1), (0, 6), (6,), (0, 7), (0, 0, 4), (4, 0), (1, 2), (0, 8), (7,),
    (0, 3, 0), (0, 0, 0, 1), (0, 0, 5), (2, 1), (0, 0, 6), (1, 0, 1), (0, 0, 1, 0), (2, 0, 0),
    (5, 0), (0, 9), (0, 1, 2), (8,), (0, 4, 0), (0, 2, 1), (1, 3), (0, 0, 7), (0, 0, 0, 2),
    (0, 0, 8), (1, 1, 0), (0, 1, 0, 0), (6, 0), (9,), (0, 1, 3), (0, 0, 0, 3), (1, 0, 2),
    (0, 5, 0), (3, 1), (0, 0, 2, 0), (7, 0), (1, 4),
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeArrays:
  """A tree's buffers (module docstring) as device arrays, per batch row (`[batch, ...]`):
  `internal` `[I]` is shared by the rows (a tree built per row lists every node)."""

  depths: jax.Array            # `[batch, T]`
  mask: jax.Array              # `[batch, T, T]`
  parents: jax.Array           # `[batch, T]` (-1 for the root)
  internal: jax.Array          # `[I]`
  parent_slot: jax.Array       # `[batch, T]` index into `internal`
  earlier_siblings: jax.Array  # `[batch, T, T]`
  retrieve: jax.Array          # `[batch, L, D + 1]`
  retrieve_mask: jax.Array     # `[batch, L, D + 1]`

  @property
  def depth(self) -> int:
    return self.retrieve.shape[-1] - 1


def chain(depth: int) -> tuple[Path, ...]:
  """The top-1 guess of each of `depth` heads: a single path."""
  return tuple((0,) * d for d in range(1, depth + 1))


@dataclasses.dataclass(frozen=True)
class TreeShape:
  """What the decode loops size their buffers by: tokens verified per step (`size`, the root
  included) and the longest path (`depth`), for static and per-step trees alike."""

  size: int
  depth: int


class Tree:
  """A validated candidate tree with its buffers. Hashable by its paths (a static jit argument)."""

  def __init__(self, paths: Sequence[Sequence[int]], *, num_heads: int | None = None,
               vocab_size: int | None = None):
    if isinstance(paths, (str, bytes)) or not all(
        isinstance(p, (list, tuple)) and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in p)
        for p in paths):
      raise MedusaError(f"a Medusa tree is a list of paths, each a list of top-k ranks (e.g. [[0], [0, 0], [1]]); "
                        f"got {str(paths)[:80]}")
    paths = [tuple(int(c) for c in p) for p in paths]
    if not paths:
      raise MedusaError("a Medusa tree needs at least one path")
    seen = set(paths)
    if len(seen) != len(paths):
      raise MedusaError("a Medusa tree lists the same path twice")
    for p in paths:
      if not p or min(p) < 0:
        raise MedusaError(f"invalid tree path {list(p)}: choices are non-negative top-k ranks")
      if len(p) > 1 and p[:-1] not in seen:
        raise MedusaError(f"tree path {list(p)} has no parent {list(p[:-1])} in the tree")
    self.paths: tuple[Path, ...] = tuple(sorted(paths, key=lambda p: (len(p), p)))
    self.depth = max(len(p) for p in paths)
    self.topk = max(max(p) for p in paths) + 1
    if num_heads is not None and self.depth > num_heads:
      raise MedusaError(f"tree depth {self.depth} exceeds the {num_heads} Medusa heads")
    if vocab_size is not None and self.topk > vocab_size:
      raise MedusaError(f"tree asks for top-{self.topk} tokens of a {vocab_size}-token vocabulary")

  def __eq__(self, other):
    return isinstance(other, Tree) and self.paths == other.paths

  def __hash__(self):
    return hash(self.paths)

  def __repr__(self):
    return f"Tree({len(self.paths)} nodes, depth {self.depth}, top-{self.topk})"

  @property
  def size(self) -> int:
    """Tokens verified per step: the nodes plus the root."""
    return len(self.paths) + 1

  def arrays(self, batch: int) -> TreeArrays:
    """The buffers on the device, the same for each of `batch` rows."""
    def rows(x):
      return jnp.broadcast_to(jnp.asarray(x), (batch,) + x.shape)
    return TreeArrays(rows(self.depths), rows(self.mask), rows(self.parents), jnp.asarray(self.internal),
                      rows(self.parent_slot), rows(self.earlier_siblings), rows(self.retrieve),
                      rows(self.retrieve_mask))

  @functools.cached_property
  def _index(self) -> dict[Path, int]:
    return {p: i + 1 for i, p in enumerate(self.paths)} | {(): 0}

  def nodes(self, paths: Sequence[Path]) -> np.ndarray:
    """`[len(paths)]` node index of each path (the root is `()`)."""
    return np.asarray([self._index[tuple(p)] for p in paths], np.int32)

  def with_chain(self, length: int) -> Tree:
    """This tree plus a chain of `length` nodes under the root, after the root's other children:
    paths `(r,), (r, 0), ...` with `r = topk` (a rank no head fills; another drafter fills them)."""
    r = self.topk
    return Tree(self.paths + tuple((r,) + (0,) * d for d in range(length)))

  @functools.cached_property
  def parents(self) -> np.ndarray:
    """`[T]` parent node of each node (-1 for the root)."""
    return np.asarray([-1] + [self._index[p[:-1]] for p in self.paths], np.int32)

  @functools.cached_property
  def internal(self) -> np.ndarray:
    """`[I]` nodes that have children, in node order (the root first)."""
    return np.unique(self.parents[1:]).astype(np.int32)

  @functools.cached_property
  def parent_slot(self) -> np.ndarray:
    """`[T]` index into `internal` of each node's parent (0, the root's slot, for the root)."""
    slot = {int(n): i for i, n in enumerate(self.internal)}
    return np.asarray([0] + [slot[int(p)] for p in self.parents[1:]], np.int32)

  @functools.cached_property
  def earlier_siblings(self) -> np.ndarray:
    """`[T, T]` bool: `[n, s]` when node s has n's parent and a lower node index (the root has none)."""
    index = np.arange(self.size)
    same_parent = (self.parents[:, None] == self.parents[None, :]) & (self.parents[:, None] >= 0)
    return same_parent & (index[None, :] < index[:, None])

  @functools.cached_property
  def mask(self) -> np.ndarray:
    m = np.eye(self.size, dtype=bool)
    for i, p in enumerate(self.paths, start=1):
      for d in range(len(p)):
        m[i, self._index[p[:d]]] = True
    return m

  @functools.cached_property
  def depths(self) -> np.ndarray:
    return np.asarray([0] + [len(p) for p in self.paths], np.int32)

  @functools.cached_property
  def candidate_index(self) -> np.ndarray:
    return np.asarray([0] + [1 + (len(p) - 1) * self.topk + p[-1] for p in self.paths], np.int32)

  @functools.cached_property
  def leaves(self) -> tuple[Path, ...]:
    prefixes = {p[:-1] for p in self.paths}
    return tuple(p for p in self.paths if p not in prefixes)

  @functools.cached_property
  def retrieve(self) -> np.ndarray:
    out = np.zeros((len(self.leaves), self.depth + 1), np.int32)
    for row, leaf in enumerate(self.leaves):
      for d in range(1, len(leaf) + 1):
        out[row, d] = self._index[leaf[:d]]
    return out

  @functools.cached_property
  def retrieve_mask(self) -> np.ndarray:
    lengths = np.asarray([len(p) for p in self.leaves])
    return np.arange(self.depth + 1)[None, :] <= lengths[:, None]


TREES = {"mc_sim_7b_63": MC_SIM_7B_63, "vicuna_7b_stage2": VICUNA_7B_STAGE2, **{f"chain{d}": chain(d) for d in range(1, 6)}}


def _read_tree_file(path: str) -> dict | list:
  try:
    with open(path) as f:
      spec = json.load(f)
  except (OSError, ValueError) as e:
    raise MedusaError(f"cannot read a tree from {path}: {e}") from None
  if isinstance(spec, dict) and "paths" not in spec:
    raise MedusaError('a tree JSON file holds {"paths": [[0], [0, 0], ...]} or a bare list of paths')
  return spec


def get_tree(spec: str | Sequence[Sequence[int]] | Tree, *, num_heads: int | None = None,
             vocab_size: int | None = None) -> Tree:
  """A tree by name (`mc_sim_7b_63`, `vicuna_7b_stage2`, `chain1`..`chain5`), a JSON file
  (`{"paths": [...]}`, as `infer/benchmark.py --save-tree` writes, or a bare list of paths), a JSON
  list of paths as text (`"[[0], [0, 0]]"`), a list of paths, or as given."""
  if isinstance(spec, Tree):
    return Tree(spec.paths, num_heads=num_heads, vocab_size=vocab_size)
  if isinstance(spec, str) and spec.lstrip().startswith("["):
    try:
      spec = json.loads(spec)
    except ValueError as e:
      raise MedusaError(f"cannot parse the tree {spec[:60]!r} as a JSON list of paths: {e}") from None
  elif isinstance(spec, str) and spec.endswith(".json"):
    spec = _read_tree_file(spec)
    spec = spec["paths"] if isinstance(spec, dict) else spec
  elif isinstance(spec, str):
    if spec not in TREES:
      raise MedusaError(f"unknown tree {spec!r}; known trees: {', '.join(sorted(TREES))}")
    spec = TREES[spec]
  return Tree(spec, num_heads=num_heads, vocab_size=vocab_size)


class DefaultTree(NamedTuple):
  """What a heads directory decodes with unless told otherwise."""

  paths: Sequence[Path]
  lookup: int  # the prompt-lookup chain grafted onto the tree (0: the heads alone)


def default_tree(heads_dir: str | None, num_heads: int) -> DefaultTree:
  """A heads directory's `tree.json` (tuned for those heads: its paths and its `"lookup"` chain),
  else the reference default `mc_sim_7b_63` cut to the paths `num_heads` heads can fill, without
  a lookup chain."""
  tree_file = os.path.join(heads_dir, "tree.json") if heads_dir else ""
  if not (tree_file and os.path.isfile(tree_file)):
    return DefaultTree(tuple(p for p in MC_SIM_7B_63 if len(p) <= num_heads), 0)
  spec = _read_tree_file(tree_file)
  lookup = spec.get("lookup", 0) if isinstance(spec, dict) else 0
  if not isinstance(lookup, int) or isinstance(lookup, bool) or lookup < 0:
    raise MedusaError(f'{tree_file}: "lookup" must be a number of tokens >= 0, got {lookup!r}')
  paths = spec["paths"] if isinstance(spec, dict) else spec
  return DefaultTree(paths, lookup)
