"""Drafters: what proposes the tokens the base model verifies each step (`speculative.py`).

A drafter is static (hashable, a jit argument) and names its `tree`: the shape of every proposal,
node 0 being the root (the last emitted token). Its arrays (heads' weights, drafting vocabulary)
come separately as `params`. `propose(params, model, ctx)` fills the tree's tokens `[batch, T]`
from the loop's `DraftContext`; the verifier (one tree forward, acceptance, K/V compaction) is
the same for every drafter, so greedy output equals plain greedy decoding whatever drafts.

- `HeadsDrafter`: Medusa or Hydra heads' guesses at the last accepted position.
- `LookupDrafter`: prompt lookup (`lookup.py`), a chain of K tokens.
- `HybridDrafter`: the heads' tree with the lookup chain grafted under the root
  (`Tree.with_chain`), verified in the same forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.decode.lookup import lookup_continuation
from medusa_jax.medusa.tree import Tree, chain
from medusa_jax.model.llama import Llama
from medusa_jax.model.rows import write_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftContext:
  """What a drafter may read, kept by the decode loop."""

  root: jax.Array     # `[batch]` the last emitted token (node 0; not in the cache yet)
  hidden: jax.Array   # `[batch, embed]` the base model's hidden state at the position before root
  history: jax.Array  # `[batch, H]` prompt then emitted tokens, the root at `length - 1`
  length: jax.Array   # `[batch]` valid entries of `history`

  @classmethod
  def start(cls, tokens: jax.Array, prompt_lens: jax.Array, root: jax.Array, hidden: jax.Array,
            size: int) -> DraftContext:
    """After prefill: prompts `[batch, P]` (lengths `prompt_lens`), the first token `root`, a
    history of `size` >= P + every token the loop may emit."""
    history = jnp.zeros((tokens.shape[0], size), jnp.int32).at[:, :tokens.shape[1]].set(tokens)
    history = write_rows(history, root[:, None], prompt_lens)
    return cls(root, hidden, history, prompt_lens.astype(jnp.int32) + 1)

  @classmethod
  def without_history(cls, root: jax.Array, hidden: jax.Array) -> DraftContext:
    """For drafters that read no history (heads): `root` `[batch]`, `hidden` `[batch, embed]`."""
    return cls(root, hidden, jnp.zeros((root.shape[0], 1), jnp.int32), jnp.ones_like(root))

  def advance(self, new: jax.Array, n: jax.Array, root: jax.Array, hidden: jax.Array,
              keep: jax.Array) -> DraftContext:
    """After a step that emitted `n` `[batch]` of `new` `[batch, D + 1]` (the last one the next
    `root`) and ended at `hidden` `[batch, embed]`; rows where `keep` `[batch]` stay as they were."""
    history = jnp.where(keep[:, None], self.history, write_rows(self.history, new, self.length))
    return DraftContext(jnp.where(keep, self.root, root), jnp.where(keep[:, None], self.hidden, hidden),
                        history, jnp.where(keep, self.length, self.length + n))


class Drafter(Protocol):
  tree: Tree  # the shape of every proposal

  def propose(self, params: Any, model: Llama, ctx: DraftContext) -> jax.Array:
    """The tree's tokens `[batch, tree.size]`, node 0 being `ctx.root`."""


@dataclasses.dataclass(frozen=True)
class HeadsDrafter:
  """Medusa or Hydra heads (`MedusaHeads.draft_tree`); params: (heads state, `DraftVocab` or None)."""

  heads_graphdef: nnx.GraphDef
  tree: Tree

  def propose(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    heads_state, draft = params
    heads = nnx.merge(self.heads_graphdef, heads_state)
    return heads.draft_tree(model, ctx.hidden, ctx.root, self.tree, draft)


@dataclasses.dataclass(frozen=True)
class LookupDrafter:
  """Prompt lookup: the `num_tokens` tokens after the latest earlier match of the last n-gram
  (n = `max_ngram` down to 1); where nothing matches, tokens the verifier rejects. No params."""

  num_tokens: int
  max_ngram: int = 3

  @property
  def tree(self) -> Tree:
    return Tree(chain(self.num_tokens))

  def continuation(self, ctx: DraftContext) -> jax.Array:
    return lookup_continuation(ctx.history, ctx.length, self.num_tokens, self.max_ngram)[0]

  def propose(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    return jnp.concatenate([ctx.root[:, None], self.continuation(ctx)], axis=1)


@dataclasses.dataclass(frozen=True)
class HybridDrafter:
  """The heads' tree plus the lookup chain as one more branch under the root; params: the heads'."""

  heads: HeadsDrafter
  lookup: LookupDrafter

  @functools.cached_property
  def tree(self) -> Tree:
    return self.heads.tree.with_chain(self.lookup.num_tokens)

  @functools.cached_property
  def _nodes(self):
    """(the heads' tree's nodes, root first; the chain's nodes) as node indices of `tree`."""
    graft = self.heads.tree.topk  # the chain's rank under the root (`Tree.with_chain`)
    return (self.tree.nodes(((),) + self.heads.tree.paths),
            self.tree.nodes([(graft,) + (0,) * d for d in range(self.lookup.num_tokens)]))

  def propose(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    heads_nodes, chain_nodes = self._nodes
    tokens = jnp.zeros((ctx.root.shape[0], self.tree.size), jnp.int32)
    tokens = tokens.at[:, heads_nodes].set(self.heads.propose(params, model, ctx))
    return tokens.at[:, chain_nodes].set(self.lookup.continuation(ctx))
