"""Candidate trees built on the device each step from a beam search over the heads (as ReDrafter's
and EAGLE-2's dynamic trees adapt to every step), instead of a static tree of ranks.

`beam_paths`: a beam search of width W, depth H over the heads' log-probabilities at the last
accepted position gives the W most likely paths (for Medusa heads, whose guesses are independent,
the exact W best; Hydra heads read each beam's own tokens). `beam_tree`: those paths as a tree,
shared prefixes merged, nodes ordered by (depth, best beam through them) and cut or padded to a
static node budget N; the tree's buffers (`tree.TreeArrays`) per batch row. A padding node has no
parent and sees only itself, so it is never accepted. `ranked_tree`: the N best of a pool of
scored candidates (an EAGLE drafter's expansion, `medusa/eagle.py`) as a tree; `tree_arrays`: the
buffers of any per-row tree given by its parents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.medusa.tree import TreeArrays
from medusa_jax.model.llama import Llama


def beam_paths(heads, base: Llama, h: jax.Array, root: jax.Array, width: int, depth: int,
               draft=None) -> jax.Array:
  """The `width` best paths `[batch, W, depth]` (best first) of the heads' summed log-probabilities,
  drafted from the hidden state `h` `[batch, embed]` before `root` `[batch]`, over the drafting
  vocabulary `draft` (None: the whole vocabulary)."""
  batch = root.shape[0]
  state = jnp.broadcast_to(h[:, None], (batch, 1, h.shape[-1]))
  last = root[:, None]
  scores = jnp.zeros((batch, 1), jnp.float32)
  paths = jnp.zeros((batch, 1, 0), jnp.int32)
  for k in range(depth):
    feats = heads.beam_features(k, h, state, last, base)  # [b, 1 or beams, e]
    logp, ids = heads.top_tokens(k, feats, base, draft, width, log_probs=True)  # [b, 1 or beams, W]
    total = (scores[:, :, None] + logp).reshape(batch, -1)
    ids = jnp.broadcast_to(ids, (batch, scores.shape[1], width)).reshape(batch, -1)
    scores, best = jax.lax.top_k(total, width)  # the first step has one beam: its top W
    parent = best // width
    last = jnp.take_along_axis(ids, best, axis=1)
    paths = jnp.concatenate([jnp.take_along_axis(paths, parent[:, :, None], axis=1), last[:, :, None]], axis=2)
    feats = jnp.broadcast_to(feats, (batch, total.shape[1] // width, feats.shape[-1]))
    state = jnp.take_along_axis(feats, parent[:, :, None], axis=1)
  return paths


def beam_tree(root: jax.Array, paths: jax.Array, budget: int) -> tuple[jax.Array, TreeArrays]:
  """The tree of `paths` `[batch, W, H]` under `root` `[batch]` with `budget` nodes (the root
  included): (its tokens `[batch, budget]`, its `TreeArrays`). Path w's depth-d token is node
  `node[w, d]`: the merged node of the first path sharing its first d + 1 tokens; nodes are
  numbered by (depth, first path), so a parent always precedes its children and a cut keeps
  whole prefixes. Each path is a leaf, cut where its nodes pass the budget."""
  batch, width, depth = paths.shape
  equal = jnp.cumprod(paths[:, :, None, :] == paths[:, None, :, :], axis=-1).astype(bool)  # [b, W, W', H]
  first = jnp.argmax(equal, axis=2)  # [b, W, H] the first path with the same prefix
  own = first == jnp.arange(width)[None, :, None]
  order = jnp.swapaxes(own, 1, 2).reshape(batch, -1)  # (depth, path) order
  numbers = jnp.swapaxes((jnp.cumsum(order, axis=1)).reshape(batch, depth, width), 1, 2)  # 1.. for own
  node = jnp.take_along_axis(numbers, first, axis=1)  # [b, W, H]
  kept = node < budget
  target = jnp.where(own & kept, node, budget).reshape(batch, -1)  # `budget`: dropped by the scatters
  rows = jnp.arange(batch)[:, None]

  def scatter(fill, values, dtype):  # per-slot values `[b, W, H, ...]` onto their nodes
    out = jnp.full((batch, budget) + values.shape[3:], fill, dtype)
    return out.at[rows, target].set(values.reshape((batch, -1) + values.shape[3:]).astype(dtype), mode="drop")

  tokens = scatter(0, paths, jnp.int32).at[:, 0].set(root)
  parent = jnp.concatenate([jnp.zeros((batch, width, 1), jnp.int32), node[:, :, :-1]], axis=2)
  parents = scatter(-1, parent, jnp.int32)
  depths = scatter(1, jnp.broadcast_to(jnp.arange(1, depth + 1), paths.shape), jnp.int32).at[:, 0].set(0)
  ancestors = jnp.cumsum(jax.nn.one_hot(node, budget, dtype=jnp.int32), axis=2) > 0  # [b, W, H, N]
  mask = scatter(False, ancestors, bool) | jnp.eye(budget, dtype=bool)[None]
  mask = mask.at[:, :, 0].set(mask[:, :, 0] | (parents >= 0))  # every real node sees the root
  index = jnp.arange(budget)
  earlier = (parents[:, :, None] == parents[:, None, :]) & (parents[:, :, None] >= 0) & (index[None, :] < index[:, None])
  retrieve = jnp.concatenate([jnp.zeros((batch, width, 1), jnp.int32), jnp.where(kept, node, 0)], axis=2)
  retrieve_mask = jnp.concatenate([jnp.ones((batch, width, 1), bool), kept], axis=2)
  arrays = TreeArrays(depths, mask, parents, index.astype(jnp.int32), jnp.maximum(parents, 0), earlier,
                      retrieve, retrieve_mask)
  return tokens, arrays


def ranked_tree(root: jax.Array, tokens: jax.Array, parents: jax.Array, scores: jax.Array,
                depths: np.ndarray, budget: int) -> tuple[jax.Array, TreeArrays]:
  """The tree of the `budget - 1` best candidates by score under `root` `[batch]` (EAGLE-2's
  reranking): candidates' tokens, parents (a candidate index, -1 for the root) and scores
  `[batch, P]`, depths `[P]`, listed parents first. A child never scores above its parent (scores
  are summed log-probabilities) and wins ties against later candidates, so every kept node's
  parent is kept. Nodes keep the candidates' order. `depths` `[P]` (static) are 1 and more. Returns (tokens `[batch, budget]`, `TreeArrays`)."""
  batch, pool = tokens.shape
  if budget - 1 > pool:
    raise ValueError(f"a tree of {budget} nodes needs {budget - 1} candidates, got {pool}")
  chosen = jnp.sort(jax.lax.top_k(scores, budget - 1)[1], axis=1)  # [b, N - 1] pool indices
  rows = jnp.arange(batch)[:, None]
  node_of = jnp.full((batch, pool), -1, jnp.int32).at[rows, chosen].set(jnp.arange(1, budget, dtype=jnp.int32))
  pool_parent = jnp.take_along_axis(parents, chosen, axis=1)
  parent = jnp.where(pool_parent < 0, 0, jnp.take_along_axis(node_of, jnp.maximum(pool_parent, 0), axis=1))
  node_parents = jnp.concatenate([jnp.full((batch, 1), -1, jnp.int32), parent], axis=1)
  node_tokens = jnp.concatenate([root[:, None], jnp.take_along_axis(tokens, chosen, axis=1)], axis=1)
  node_depths = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                                 jnp.take(jnp.asarray(depths, jnp.int32), chosen)], axis=1)
  return node_tokens, tree_arrays(node_parents, node_depths, int(np.max(depths)))


def tree_arrays(parents: jax.Array, depths: jax.Array, depth: int) -> TreeArrays:
  """`TreeArrays` of trees given per row by their nodes' parents and depths `[batch, N]` (node 0
  the root, parents before children, depth at most `depth`); a node whose parent is -1 (other
  than the root) is padding: it sees only itself and is never accepted."""
  batch, n = parents.shape
  index = jnp.arange(n)
  up = jnp.maximum(parents, 0)
  mask = jnp.broadcast_to(jnp.eye(n, dtype=bool), (batch, n, n))
  current = jnp.broadcast_to(index, (batch, n))
  real = (parents >= 0) | (index == 0)[None]
  for _ in range(depth):  # ancestors, one generation at a time (the root is its own parent here)
    current = jnp.take_along_axis(up, current, axis=1)
    mask = mask | (jax.nn.one_hot(current, n, dtype=bool) & real[:, :, None])
  earlier = (parents[:, :, None] == parents[:, None, :]) & (parents[:, :, None] >= 0) & (index[None, :] < index[:, None])
  levels = jnp.arange(depth + 1)
  at_level = mask[:, :, :, None] & (depths[:, None, :, None] == levels)  # [b, N, N, D + 1]
  retrieve = jnp.sum(jnp.where(at_level, index[None, None, :, None], 0), axis=2).astype(jnp.int32)
  retrieve_mask = (levels[None, None, :] <= depths[:, :, None]) & real[:, :, None]
  return TreeArrays(depths, mask, parents, index.astype(jnp.int32), up, earlier, retrieve, retrieve_mask)
