"""Drafters: what proposes the tokens the base model verifies each step (`speculative.py`).

A drafter is static (hashable, a jit argument) and names its `tree`: the shape of every proposal,
node 0 being the root (the last emitted token). Its arrays (heads' or a draft model's weights,
drafting vocabulary) come separately as `params`; what it keeps between steps (a draft model's KV
cache) is its `state`, carried by the loop: `start` makes it after the prompts, `propose` fills
the tree's tokens `[batch, T]` from the loop's `DraftContext` (with the draft distributions they
were sampled from, if sampled), `commit` keeps what the verifier accepted. The verifier (one tree
forward, acceptance, K/V compaction) is the same for every drafter, so greedy output equals plain
greedy decoding whatever drafts.

- `HeadsDrafter`: Medusa or Hydra heads' guesses at the last accepted position.
- `LookupDrafter`: prompt lookup (`lookup.py`), a chain of K tokens.
- `HybridDrafter`: the heads' tree with the lookup chain grafted under the root
  (`Tree.with_chain`), verified in the same forward; `GatedHybrid`: only on steps where the chain
  has a long enough match to propose, else the heads' smaller tree (`speculative_step` runs one
  of its `branches`).
- `BeamTreeDrafter`: a tree built each step from a beam search over the heads (`dynamic_tree.py`).
- `ModelDrafter`: a draft model (or the target's own first layers) proposes a chain of K tokens,
  or a tree of its top-k tokens (SpecInfer-style).
- `EagleDrafter`: an EAGLE-3-style drafter (`medusa/eagle.py`) reading the target's features,
  its tree grown each step (EAGLE-2). A drafter that reads the target's features names the layers
  it taps (`taps`); the loop hands it their values for the prompt (`start`) and for each step's
  tree (`commit`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.decode.lookup import lookup_continuation
from medusa_jax.decode.plain import prefill
from medusa_jax.decode.sampling import SamplingParams, sampling_logits
from medusa_jax.medusa.dynamic_tree import beam_paths, beam_tree, ranked_tree
from medusa_jax.medusa.tree import Tree, TreeArrays, TreeShape, chain
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama
from medusa_jax.model.rows import gather_rows, write_rows


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
    `root`) and ended at `hidden` `[batch, embed]`. Rows where `keep` `[batch]` (finished ones)
    keep their length; what they propose no longer matters."""
    return DraftContext(root, hidden, write_rows(self.history, new, self.length),
                        jnp.where(keep, self.length, self.length + n))


class Proposal(NamedTuple):
  tokens: jax.Array               # `[batch, tree.size]`, node 0 being the root
  draft_probs: jax.Array | None   # `[batch, tree.size, vocab]` the distributions sampled tokens came from
  state: Any                      # the drafter's state after proposing
  tree: TreeArrays | None = None  # this step's tree, when it is built per step (None: `drafter.tree`)


class Drafter(Protocol):
  tree: Tree  # the shape of every proposal

  def start(self, params: Any, model: Llama, tokens: jax.Array, prompt_lens: jax.Array,
            cache_len: int, cache_dtype, mesh, taps: jax.Array | None = None) -> Any:
    """The drafter's state after the prompts `[batch, P]` (None: it keeps none); `taps`
    `[batch, P, F]`: the target's features there, for a drafter with `taps`."""

  def propose(self, params: Any, model: Llama, ctx: DraftContext, state: Any, key: jax.Array) -> Proposal:
    """The tree's tokens from the context and the drafter's state."""

  def commit(self, state: Any, path: jax.Array, n: jax.Array, keep: jax.Array,
             features: jax.Array | None = None) -> Any:
    """The state once `n` `[batch]` tokens were emitted: the accepted nodes `path[:, 1:n]` of the
    tree (`[batch, depth + 1]`, root first) and the bonus; rows where `keep` stay as they were.
    `features` `[batch, T, F]`: the target's taps at the tree's nodes, for a drafter with `taps`."""

  def empty(self, params: Any, model: Llama, rows: int, cache_len: int, cache_dtype, mesh) -> Any:
    """The state of `rows` rows that hold nothing yet (the server's free slots)."""

  def catch_up(self, params: Any, model: Llama, state: Any, history: jax.Array, lengths: jax.Array,
               width: int) -> Any:
    """The state after the tokens `history[:, :lengths]` `[batch, H]`, from a state at most
    `width` tokens behind (steps decoded without the drafter: the server's plain chunks)."""


def taps_of(drafter) -> tuple[int, ...]:
  """The target layers whose inputs `drafter` reads (none for most drafters)."""
  return getattr(drafter, "taps", ())


class _Stateless:
  """The state plumbing of drafters that keep none: they define `tokens(params, model, ctx)`."""

  def start(self, *args) -> None:
    return None

  def empty(self, *args) -> None:
    return None

  def catch_up(self, params, model, state, *args) -> None:
    return None

  def propose(self, params, model: Llama, ctx: DraftContext, state, key) -> Proposal:
    return Proposal(self.tokens(params, model, ctx), None, None)

  def commit(self, state, path, n, keep, features=None) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class HeadsDrafter(_Stateless):
  """Medusa or Hydra heads (`MedusaHeads.draft_tree`); params: (heads state, `DraftVocab` or None)."""

  heads_graphdef: nnx.GraphDef
  tree: Tree

  def tokens(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    heads_state, draft = params
    heads = nnx.merge(self.heads_graphdef, heads_state)
    return heads.draft_tree(model, ctx.hidden, ctx.root, self.tree, draft)


@dataclasses.dataclass(frozen=True)
class LookupDrafter(_Stateless):
  """Prompt lookup: the `num_tokens` tokens after the latest earlier match of the last n-gram
  (n = `max_ngram` down to 1); where nothing matches, tokens the verifier rejects. No params."""

  num_tokens: int
  max_ngram: int = 3

  @property
  def tree(self) -> Tree:
    return Tree(chain(self.num_tokens))

  def continuation(self, ctx: DraftContext) -> jax.Array:
    return lookup_continuation(ctx.history, ctx.length, self.num_tokens, self.max_ngram)[0]

  def tokens(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    return jnp.concatenate([ctx.root[:, None], self.continuation(ctx)], axis=1)


@dataclasses.dataclass(frozen=True)
class HybridDrafter(_Stateless):
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

  def tokens(self, params, model: Llama, ctx: DraftContext) -> jax.Array:
    heads_nodes, chain_nodes = self._nodes
    tokens = jnp.zeros((ctx.root.shape[0], self.tree.size), jnp.int32)
    tokens = tokens.at[:, heads_nodes].set(self.heads.tokens(params, model, ctx))
    return tokens.at[:, chain_nodes].set(self.lookup.continuation(ctx))


@dataclasses.dataclass(frozen=True)
class GatedHybrid:
  """The hybrid on steps where some row's last `min_ngram` or more tokens occurred before (its
  chain has a real match to propose), else the heads' tree alone (a smaller forward): a step runs
  one of its `branches`, chosen by `use_first` on the device (`speculative_step`). Params: the
  heads'."""

  hybrid: HybridDrafter
  min_ngram: int

  @property
  def tree(self) -> Tree:
    return self.hybrid.tree

  @property
  def branches(self) -> tuple[HybridDrafter, HeadsDrafter]:
    return self.hybrid, self.hybrid.heads

  def use_first(self, ctx: DraftContext) -> jax.Array:
    lookup = self.hybrid.lookup
    found = lookup_continuation(ctx.history, ctx.length, 1, lookup.max_ngram, self.min_ngram)[1]
    return jnp.any(found > 0)

  start, commit, empty, catch_up = _Stateless.start, _Stateless.commit, _Stateless.empty, _Stateless.catch_up


def heads_drafter(heads_graphdef: nnx.GraphDef, tree: Tree, lookup: int, max_ngram: int = 3,
                  min_ngram: int = 0):
  """The heads over `tree`, with a prompt-lookup chain of `lookup` tokens grafted on when > 0: on
  every step (`min_ngram` 0), or on steps with a match of `min_ngram` or more tokens."""
  heads = HeadsDrafter(heads_graphdef, tree)
  if not lookup:
    return heads
  hybrid = HybridDrafter(heads, LookupDrafter(lookup, max(max_ngram, min_ngram)))
  return GatedHybrid(hybrid, min_ngram) if min_ngram else hybrid


def cheaper_drafters(drafter) -> tuple:
  """Drafters that verify fewer tokens a step than `drafter`, smallest first (a server's choices
  when a step's tokens cost more than they save, `serve/scheduler.py`): under Medusa heads, their
  top guess alone (a chain of one) when their tree is large (16 nodes or more; below that a step's
  fixed work outweighs the nodes saved), and the heads' tree alone when a lookup chain is grafted
  on. None for the others (a lookup chain or a draft model's chain is short; a draft model's state
  follows its own drafts; a beam tree is built to its budget)."""
  heads = drafter.hybrid if isinstance(drafter, GatedHybrid) else drafter
  heads = heads.heads if isinstance(heads, HybridDrafter) else heads
  if not isinstance(heads, HeadsDrafter):
    return ()
  top = HeadsDrafter(heads.heads_graphdef, Tree(chain(1)))
  smaller = ((top,) if heads.tree.size > 16 else ()) + (heads,)
  return tuple(d for d in smaller if d.tree.size < drafter.tree.size)


@dataclasses.dataclass(frozen=True)
class BeamTreeDrafter(_Stateless):
  """Each step, the `width` best paths of a beam search `depth` deep over the heads' guesses,
  merged into a tree of `budget` nodes (`dynamic_tree.py`); params: the heads' (as `HeadsDrafter`)."""

  heads_graphdef: nnx.GraphDef
  width: int
  depth: int
  budget: int

  @property
  def tree(self) -> TreeShape:
    return TreeShape(self.budget, self.depth)

  def propose(self, params, model: Llama, ctx: DraftContext, state, key) -> Proposal:
    heads_state, draft = params
    heads = nnx.merge(self.heads_graphdef, heads_state)
    paths = beam_paths(heads, model, ctx.hidden, ctx.root, self.width, self.depth, draft)
    tokens, tree = beam_tree(ctx.root, paths, self.budget)
    return Proposal(tokens, None, None, tree)


class ModelParams(NamedTuple):
  """A `ModelDrafter`'s arrays."""

  weights: nnx.State | None             # the draft model's (None: self-drafting)
  sampling: SamplingParams | None = None  # sample the chain from the draft's distributions (None: greedy)


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
  """A draft model proposes a chain of `num_tokens`, one token per forward over its own KV cache
  (its state: written K + 1 tokens ahead, rewound to what was accepted), or, with `shape`, a tree
  whose rank-r child of a node is the draft's r-th most likely next token there (SpecInfer-style;
  one tree-masked forward per depth, then the accepted path's K/V compacted as the target's are).
  `graphdef` None: the target itself, its first `num_layers` layers then its final norm and
  lm_head (self-drafting, no extra weights); params: `ModelParams`. With its `sampling` a chain
  is sampled from the draft's distributions (returned, for the speculative sampling rule), else
  it is the draft's greedy continuation; a tree's top-k tokens are deterministic drafts, which
  the lossless tree rule verifies exactly."""

  graphdef: nnx.GraphDef | None
  num_tokens: int
  num_layers: int | None = None
  shape: Tree | None = None

  @property
  def tree(self) -> Tree:
    return self.shape or Tree(chain(self.num_tokens))

  def _model(self, params: ModelParams, model: Llama) -> Llama:
    return model if self.graphdef is None else nnx.merge(self.graphdef, params.weights)

  def empty(self, params, model: Llama, rows: int, cache_len: int, cache_dtype, mesh) -> KVCache:
    config = self._model(params, model).config
    config = config if self.num_layers is None else dataclasses.replace(config, num_layers=self.num_layers)
    return KVCache.init(config, rows, cache_len, cache_dtype, mesh)

  def start(self, params, model: Llama, tokens, prompt_lens, cache_len: int, cache_dtype, mesh,
            taps=None) -> KVCache:
    cache = self.empty(params, model, tokens.shape[0], cache_len, cache_dtype, mesh)
    return prefill(self._model(params, model), tokens, prompt_lens, cache, self.num_layers).cache

  def catch_up(self, params, model: Llama, state: KVCache, history, lengths, width: int) -> KVCache:
    # one causal forward of the `width` tokens after each row's cached ones (those past `lengths`
    # are written but not committed)
    positions = state.lengths[:, None] + jnp.arange(width)[None, :]
    tokens = jnp.take_along_axis(history, jnp.minimum(positions, history.shape[1] - 1), axis=1)
    cache = self._model(params, model).hidden_states(tokens, positions, state, num_layers=self.num_layers)[1]
    return dataclasses.replace(cache, lengths=lengths)

  def propose(self, params, model: Llama, ctx: DraftContext, state: KVCache, key) -> Proposal:
    draft = self._model(params, model)
    if self.shape is not None:
      return self._top_k_tree(draft, ctx.root, state)

    def step(carry, key):
      token, cache = carry
      logits, _, cache = draft(token[:, None], cache.lengths[:, None], cache, num_layers=self.num_layers)
      cache = cache.advance(jnp.ones_like(token))
      if params.sampling is None:
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, cache), (nxt, None)
      scaled = sampling_logits(logits[:, 0], params.sampling)
      nxt = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
      return (nxt, cache), (nxt, jax.nn.softmax(scaled, axis=-1))

    # K + 1 forwards: the last writes the K-th token's K/V (its own guess is not used)
    keys = jax.random.split(key, self.num_tokens + 1)
    (_, cache), (drafted, probs) = jax.lax.scan(step, (ctx.root, state), keys)
    if probs is not None:  # node i's tokens came from forward i - 1's distribution: `[b, T, V]`
      probs = jnp.concatenate([jnp.zeros_like(probs[:1]), probs[:-1]]).transpose(1, 0, 2)
    tokens = jnp.concatenate([ctx.root[:, None], drafted[:-1].T], axis=1)
    return Proposal(tokens, probs, dataclasses.replace(cache, lengths=state.lengths))

  def _top_k_tree(self, draft: Llama, root: jax.Array, cache: KVCache) -> Proposal:
    """depth + 1 forwards of the whole tree (tree mask, K/V written after each row's prefix): after
    forward d the nodes of depth d + 1 take their parents' ranked tokens; nodes attend only to
    their ancestors, so deeper nodes' placeholder tokens never change shallower ones. The last
    forward writes every node's K/V."""
    tree = self.shape
    positions = cache.lengths[:, None] + jnp.asarray(tree.depths)[None, :]
    parents = jnp.asarray(np.maximum(tree.parents, 0))
    ranks = jnp.asarray([0] + [p[-1] for p in tree.paths])
    depths = jnp.asarray(tree.depths)
    tokens = jnp.zeros((root.shape[0], tree.size), jnp.int32).at[:, 0].set(root)
    for d in range(tree.depth + 1):
      logits, _, written = draft(tokens, positions, cache, chunk_mask=jnp.asarray(tree.mask),
                                 num_layers=self.num_layers)
      if d < tree.depth:
        top = jax.lax.top_k(jnp.take(logits, parents, axis=1), tree.topk)[1]  # [b, T, k] at each parent
        ranked = jnp.take_along_axis(top, jnp.broadcast_to(ranks[None, :, None], top.shape[:2] + (1,)),
                                     axis=-1)[..., 0]
        tokens = jnp.where(depths[None, :] == d + 1, ranked.astype(jnp.int32), tokens)
    return Proposal(tokens, None, written)

  def commit(self, state: KVCache, path: jax.Array, n: jax.Array, keep: jax.Array, features=None) -> KVCache:
    # the root and the accepted nodes: contiguous in a chain, moved together in a tree
    moved = state.commit_path(path, n) if self.shape is not None else state.advance(n)
    return dataclasses.replace(moved, lengths=jnp.where(keep, state.lengths, moved.lengths))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleState:
  """An `EagleDrafter`'s state between steps."""

  cache: KVCache           # the drafter's entries for the accepted prefix, each from real target features
  pending: jax.Array       # `[batch, D + 1 + backlog, F]` the target's features of the entries still
                           # to write
  pending_count: jax.Array  # `[batch]` how many: the last step's root and accepted nodes, then
                            # the roots of steps decoded without drafting


class EagleParams(NamedTuple):
  """An `EagleDrafter`'s arrays."""

  weights: nnx.State  # the `EagleHead`'s
  ids: jax.Array      # `[Vd]` the drafting vocabulary's token ids (its `lm_head` columns)


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
  """An EAGLE-3-style drafter (`medusa/eagle.py`) over its own KV cache of the accepted prefix.
  Each step it first writes the entries still pending (the last step's root and accepted tokens,
  with their real target features) in one causal chunk, then grows the tree from the root's
  entry: `width` beams, `depth` levels (`EagleHead.expand`), the best `budget` nodes kept
  (`dynamic_tree.ranked_tree`). Its trees are deterministic drafts, verified by the tree rules.
  Steps decoded without it (a server's plain chunks) hand it their features (`observe`); up to
  `backlog` of them wait beside the last step's, more are written as they come. Params:
  `EagleParams`."""

  graphdef: nnx.GraphDef
  taps: tuple[int, ...]
  width: int
  depth: int
  budget: int
  backlog: int = 0

  @property
  def tree(self) -> TreeShape:
    return TreeShape(self.budget, self.depth)

  @property
  def _pending(self) -> int:
    """Entries that may wait to be written: a step's root and accepted nodes, and the backlog."""
    return self.depth + 1 + self.backlog

  def _head(self, params: EagleParams):
    return nnx.merge(self.graphdef, params.weights)

  def empty(self, params, model: Llama, rows: int, cache_len: int, cache_dtype, mesh) -> EagleState:
    head = self._head(params)
    features = len(self.taps) * model.config.hidden_size
    return EagleState(head.empty_cache(rows, cache_len, cache_dtype, mesh),
                      jnp.zeros((rows, self._pending, features), model.dtype), jnp.zeros((rows,), jnp.int32))

  def start(self, params, model: Llama, tokens, prompt_lens, cache_len: int, cache_dtype, mesh,
            taps=None) -> EagleState:
    # entries 0..P-2 from the prompt (entry i: the taps at i and token i + 1); the last prompt
    # position's entry needs the first generated token, so it waits as pending
    state = self.empty(params, model, tokens.shape[0], cache_len, cache_dtype, mesh)
    following = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    head = self._head(params)
    _, cache = head.chunk(model, head.fuse(taps), following, state.cache, span=tokens.shape[1])
    last = jnp.take_along_axis(taps, (prompt_lens - 1)[:, None, None], axis=1)
    pending = state.pending.at[:, :1].set(last.astype(state.pending.dtype))
    return EagleState(dataclasses.replace(cache, lengths=prompt_lens.astype(jnp.int32) - 1), pending,
                      jnp.ones_like(state.pending_count))

  def _write_pending(self, head, model: Llama, state: EagleState, history: jax.Array):
    """The pending entries written to the cache (their next tokens read from `history`): (their
    outputs `[batch, pending, embed]`, the state with none pending)."""
    start = state.cache.lengths
    following = gather_rows(history, start[:, None] + 1 + jnp.arange(self._pending)[None, :])
    out, cache = head.chunk(model, head.fuse(state.pending), following, state.cache)
    return out, dataclasses.replace(state, cache=cache.advance(state.pending_count),
                                    pending_count=jnp.zeros_like(state.pending_count))

  def observe(self, params, model: Llama, state: EagleState, features: jax.Array, history: jax.Array,
              keep: jax.Array) -> EagleState:
    """After a step decoded without drafting (one token emitted after the root): the root's target
    features `[batch, F]` join the pending entries of the rows not in `keep`; `history` holds
    every row's tokens through the root. When some row's pending entries are full they are all
    written first."""
    head = self._head(params)
    full = jnp.any(state.pending_count >= self._pending)
    state = jax.lax.cond(full, lambda s: self._write_pending(head, model, s, history)[1], lambda s: s, state)
    pending = write_rows(state.pending, features[:, None].astype(state.pending.dtype), state.pending_count)
    return EagleState(state.cache, jnp.where(keep[:, None, None], state.pending, pending),
                      jnp.where(keep, state.pending_count, state.pending_count + 1))

  def catch_up(self, params, model: Llama, state, history, lengths, width: int):
    return state  # every step decoded without it was `observe`d

  def propose(self, params, model: Llama, ctx: DraftContext, state: EagleState, key) -> Proposal:
    head = self._head(params)
    count = state.pending_count  # the pending entries end at the root's position - 1
    out, state = self._write_pending(head, model, state, ctx.history)
    root_out = jnp.take_along_axis(out, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    drafted = head.expand(model, root_out, state.cache, params.ids, self.width, self.depth)
    tokens, tree = ranked_tree(ctx.root, drafted.tokens, drafted.parents, drafted.scores, drafted.depths,
                               self.budget)
    return Proposal(tokens, None, state, tree)

  def commit(self, state: EagleState, path: jax.Array, n: jax.Array, keep: jax.Array,
             features=None) -> EagleState:
    kept = jnp.take_along_axis(features, path[:, :, None], axis=1).astype(state.pending.dtype)
    pending = state.pending.at[:, :path.shape[1]].set(kept)
    return EagleState(state.cache, jnp.where(keep[:, None, None], state.pending, pending),
                      jnp.where(keep, 0, n).astype(jnp.int32))
