"""Candidate trees built on the device each step from a beam search over the heads (as ReDrafter's
and EAGLE-2's dynamic trees adapt to every step), instead of a static tree of ranks.

`beam_paths`: a beam search of width W, depth H over the heads' log-probabilities at the last
accepted position gives the W most likely paths (for Medusa heads, whose guesses are independent,
the exact W best; Hydra heads read each beam's own tokens). `beam_tree`: those paths as a tree,
shared prefixes merged, nodes ordered by (depth, best beam through them) and cut or padded to a
static node budget N; the tree's buffers (`tree.TreeArrays`) per batch row. A padding node has no
parent and sees only itself, so it is never accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
