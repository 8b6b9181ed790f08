"""Speculative (tree) decoding: one jitted `jax.lax.while_loop`, static shapes, batch > 1.

Each step, per row: (1) the drafter's tree of tokens from the root (the last emitted token;
`drafters.py`: Medusa or Hydra heads' guesses at the last accepted position, prompt lookup, or
both); (2) one forward over all tree tokens with the tree mask, their
K/V written after the row's prefix; (3) acceptance on the device; (4) the accepted path's K/V moved
to contiguous positions; the accepted tokens plus one bonus token (from the base logits at the
last accepted node) emitted; the hidden state there seeds the next step's head guesses, with no
extra forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.acceptance import Accepted, Rule, accept, first_token
from medusa_jax.decode.drafters import DraftContext, Drafter, taps_of
from medusa_jax.decode.plain import DecodeOutput, Emitted, prefill
from medusa_jax.medusa.tree import TreeArrays
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama


class TreeForward(NamedTuple):
  positions: jax.Array  # `[batch, T]` each node's position
  logits: jax.Array     # `[batch, T, vocab]` float32
  hidden: jax.Array     # `[batch, T, embed]`
  cache: KVCache        # the nodes' K/V written after each row's prefix (not committed)
  taps: jax.Array | None = None  # `[batch, T, len(taps) * embed]` the drafter's tapped features


def tree_forward(model: Llama, cache: KVCache, tokens: jax.Array, tree: TreeArrays,
                 taps: tuple[int, ...] = ()) -> TreeForward:
  """The tree's tokens `[batch, T]` (a drafter's proposal) through the model in one forward,
  keeping the inputs of the layers `taps` (`Llama.forward`)."""
  positions = cache.lengths[:, None] + tree.depths
  out = model.forward(tokens, positions, cache, chunk_mask=tree.mask, taps=taps)
  return TreeForward(positions, model.logits(out.hidden), out.hidden, out.cache, out.taps)


class Kept(NamedTuple):
  """A step's outcome once its accepted path is kept."""

  emitted: jax.Array  # `[batch, depth + 1]` the accepted tokens then the bonus, 0 after them
  count: jax.Array    # `[batch]` tokens emitted
  cache: KVCache      # the accepted path's K/V moved to contiguous positions and committed
  hidden: jax.Array   # `[batch, embed]` the hidden state at the last accepted node


def keep_path(tokens: jax.Array, node_hidden: jax.Array, cache: KVCache, accepted: Accepted) -> Kept:
  """The tree's tokens `[batch, T]` and hidden states `[batch, T, embed]` after acceptance."""
  path, count, bonus = accepted.path, accepted.count, accepted.bonus
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # [b, D+1]
  shifted = jnp.concatenate([path_tokens[:, 1:], bonus[:, None]], axis=1)
  j = jnp.arange(path.shape[1])[None, :]
  emitted = jnp.where(j < count[:, None], shifted, jnp.where(j == count[:, None], bonus[:, None], 0))
  last_hidden = jnp.take_along_axis(node_hidden, accepted.last[:, :, None], axis=1)[:, 0]
  return Kept(emitted, count + 1, cache.commit_path(path, count + 1), last_hidden)


class Step(NamedTuple):
  """One speculative step's outcome."""

  emitted: jax.Array  # `[batch, depth + 1]` the accepted tokens then the bonus
  count: jax.Array    # `[batch]` tokens emitted
  cache: KVCache      # the accepted path committed
  root: jax.Array     # `[batch]` the next root (the bonus token)
  hidden: jax.Array   # `[batch, embed]` the hidden state at the last accepted node
  state: Any          # the drafter's state after proposing (before `Drafter.commit`)
  path: jax.Array     # `[batch, depth + 1]` the kept path's nodes, for `Drafter.commit`
  features: jax.Array | None = None  # `[batch, T, F]` the tree's tapped features (`Drafter.taps`)


def speculative_step(model: Llama, drafter: Drafter, params, cache: KVCache, ctx: DraftContext, state,
                     key: jax.Array, rule: Rule, target=None) -> Step:
  """One step under the acceptance `rule`: the drafter's tree of candidates (`drafters.py`; its
  `state`), one forward over it, acceptance, compaction. `target(logits, positions)`, when given,
  maps the logits `[batch, T, vocab]` predicting `positions` `[batch, T]` to those acceptance
  reads (the server's per-row sampling, `serve/coupled.target_logits`). One vocab matmul over
  every tree node gives the logits for acceptance and the bonus. A drafter with `branches`
  (`GatedHybrid`) runs the first or the second (stateless) one, as its `use_first` says."""
  if not hasattr(drafter, "branches"):
    return _step(model, drafter, params, cache, ctx, state, key, rule, target)
  depth = drafter.tree.depth

  def run(branch):
    def step(cache):
      out = _step(model, branch, params, cache, ctx, None, key, rule, target)
      pad = ((0, 0), (0, depth - branch.tree.depth))
      return out._replace(emitted=jnp.pad(out.emitted, pad), state=state,
                          path=jnp.pad(out.path, pad, mode="edge"))
    return step

  return jax.lax.cond(drafter.use_first(ctx), *map(run, drafter.branches), cache)


def _step(model: Llama, drafter: Drafter, params, cache: KVCache, ctx: DraftContext, state, key: jax.Array,
          rule: Rule, target) -> Step:
  key_draft, key_accept = jax.random.split(key)
  proposal = drafter.propose(params, model, ctx, state, key_draft)
  tokens = proposal.tokens
  tree = drafter.tree.arrays(tokens.shape[0]) if proposal.tree is None else proposal.tree
  fwd = tree_forward(model, cache, tokens, tree, taps_of(drafter))
  logits = fwd.logits if target is None else target(fwd.logits, fwd.positions + 1)
  accepted = accept(tokens, logits, tree, rule, key_accept, proposal.draft_probs)
  kept = keep_path(tokens, fwd.hidden, fwd.cache, accepted)
  return Step(kept.emitted, kept.count, kept.cache, accepted.bonus, kept.hidden, proposal.state, accepted.path,
              fwd.taps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache
  ctx: DraftContext
  state: Any  # the drafter's (`Drafter.start`)
  emitted: Emitted
  steps: jax.Array  # `[batch]` forward passes of each row until it was done
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "drafter", "max_new_tokens", "cache_len",
                                             "pad_id", "cache_dtype", "mesh"))
def speculative_generate(state: nnx.State, params, rule: Rule, tokens: jax.Array, prompt_lens: jax.Array,
                         key: jax.Array, eos_ids: jax.Array, *, graphdef: nnx.GraphDef, drafter: Drafter,
                         max_new_tokens: int, cache_len: int, pad_id: int,
                         cache_dtype=jnp.float32, mesh: Mesh | None = None) -> DecodeOutput:
  """Speculative decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`): `drafter`
  proposes (with its `params`), the base model verifies under the acceptance `rule` (None:
  greedy; its settings are device arrays; `acceptance.py`). `cache_len` must be at least P + max_new_tokens + drafter.tree.size.
  On `mesh` the KV cache is sharded as the weights are (`KVCache.init`)."""
  model = nnx.merge(graphdef, state)
  tree = drafter.tree
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype, mesh)
  logits, hidden, cache, taps = prefill(model, tokens, prompt_lens, cache, taps=taps_of(drafter))
  key, sub = jax.random.split(key)
  root = first_token(logits, sub, rule)  # from the very logits (and key) the baseline's first token comes from
  ones = jnp.ones((batch,), jnp.int32)
  emitted = Emitted.init(batch, max_new_tokens, tree.depth + 1, pad_id).record(
      root[:, None], ones, eos_ids, max_new_tokens)
  ctx = DraftContext.start(tokens, prompt_lens, root, hidden, tokens.shape[1] + max_new_tokens + tree.depth + 2)

  def body(c: _Carry) -> _Carry:
    key, sub = jax.random.split(c.key)
    step = speculative_step(model, drafter, params, c.cache, c.ctx, c.state, sub, rule)
    done = c.emitted.done
    cache = dataclasses.replace(step.cache, lengths=jnp.where(done, c.cache.lengths, step.cache.lengths))
    return _Carry(cache, c.ctx.advance(step.emitted, step.count, step.root, step.hidden, done),
                  drafter.commit(step.state, step.path, step.count, done, step.features),
                  c.emitted.record(step.emitted, step.count, eos_ids, max_new_tokens),
                  c.steps + (~done).astype(jnp.int32), key)

  state = drafter.start(params, model, tokens, prompt_lens, cache_len, cache_dtype, mesh, taps)
  end = jax.lax.while_loop(lambda c: ~jnp.all(c.emitted.done), body,
                           _Carry(cache, ctx, state, emitted, ones, key))
  return DecodeOutput(tokens=end.emitted.tokens[:, :max_new_tokens], num_tokens=end.emitted.count,
                      steps=end.steps)
