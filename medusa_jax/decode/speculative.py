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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.acceptance import Rule, accept, first_token
from medusa_jax.decode.drafters import DraftContext, Drafter
from medusa_jax.decode.plain import DecodeOutput, Emitted, prefill
from medusa_jax.medusa.tree import TreeArrays
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama


def tree_forward(model: Llama, cache: KVCache, tokens: jax.Array, tree: TreeArrays):
  """The tree's tokens `[batch, T]` (a drafter's proposal) through the model in one forward,
  their K/V written after each row's prefix. Returns (positions `[batch, T]`, float32 logits
  `[batch, T, vocab]`, hidden states `[batch, T, embed]`, cache)."""
  positions = cache.lengths[:, None] + tree.depths
  node_hidden, cache = model.hidden_states(tokens, positions, cache, chunk_mask=tree.mask)
  return positions, model.logits(node_hidden), node_hidden, cache


def keep_path(tokens: jax.Array, node_hidden: jax.Array, cache: KVCache, path: jax.Array,
              accepted: jax.Array, last: jax.Array, bonus: jax.Array):
  """After acceptance (`acceptance.accept`'s path `[batch, depth + 1]`, accepted count, last node
  and bonus token): (emitted `[batch, depth + 1]`: the accepted tokens then the bonus, emitted count `[batch]`, the
  cache with the accepted path's K/V moved to contiguous positions and committed, the last
  accepted node's hidden state `[batch, embed]`)."""
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # [b, D+1]
  shifted = jnp.concatenate([path_tokens[:, 1:], bonus[:, None]], axis=1)
  j = jnp.arange(path.shape[1])[None, :]
  emitted = jnp.where(j < accepted[:, None], shifted, jnp.where(j == accepted[:, None], bonus[:, None], 0))
  last_hidden = jnp.take_along_axis(node_hidden, last[:, :, None], axis=1)[:, 0]
  return emitted, accepted + 1, cache.commit_path(path, accepted + 1), last_hidden


def speculative_step(model: Llama, drafter: Drafter, params, cache: KVCache, ctx: DraftContext, state,
                     key: jax.Array, rule: Rule, target=None):
  """One step under the acceptance `rule`: the drafter's tree of candidates (`drafters.py`; its
  `state`), one forward over it, acceptance, compaction. `target(logits, positions)`, when given,
  maps the logits `[batch, T, vocab]` predicting `positions` `[batch, T]` to those acceptance
  reads (the server's per-row sampling, `coupled.target_logits`). Returns (emitted
  `[batch, depth + 1]`, emitted count `[batch]`, the cache with the accepted path committed, the
  next root `[batch]`, the hidden state at the last accepted node `[batch, embed]`, the drafter's
  state, the kept path's nodes `[batch, depth + 1]` for `Drafter.commit`). One vocab matmul over
  every tree node gives the logits for acceptance and the bonus. A drafter with `branches`
  (`GatedHybrid`) runs the first or the second (stateless) one, as its `use_first` says."""
  if not hasattr(drafter, "branches"):
    return _step(model, drafter, params, cache, ctx, state, key, rule, target)
  depth = drafter.tree.depth

  def run(branch):
    def step(cache):
      emitted, n, cache, root, hidden, _, path = _step(model, branch, params, cache, ctx, None, key, rule,
                                                       target)
      pad = ((0, 0), (0, depth - branch.tree.depth))
      return jnp.pad(emitted, pad), n, cache, root, hidden, state, jnp.pad(path, pad, mode="edge")
    return step

  return jax.lax.cond(drafter.use_first(ctx), *map(run, drafter.branches), cache)


def _step(model: Llama, drafter: Drafter, params, cache: KVCache, ctx: DraftContext, state, key: jax.Array,
          rule: Rule, target):
  key_draft, key_accept = jax.random.split(key)
  tokens, draft_probs, state, tree = drafter.propose(params, model, ctx, state, key_draft)
  tree = drafter.tree.arrays(tokens.shape[0]) if tree is None else tree
  positions, logits, node_hidden, cache = tree_forward(model, cache, tokens, tree)
  if target is not None:
    logits = target(logits, positions + 1)
  path, accepted, last, bonus = accept(tokens, logits, tree, rule, key_accept, draft_probs)
  emitted, n, cache, last_hidden = keep_path(tokens, node_hidden, cache, path, accepted, last, bonus)
  return emitted, n, cache, bonus, last_hidden, state, path


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache
  ctx: DraftContext
  state: Any  # the drafter's (`Drafter.start`)
  emitted: Emitted
  steps: jax.Array  # `[batch]` forward passes of each row until it was done
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "drafter", "max_new_tokens", "cache_len", "rule",
                                             "pad_id", "cache_dtype", "mesh"))
def speculative_generate(state: nnx.State, params, tokens: jax.Array, prompt_lens: jax.Array,
                         key: jax.Array, eos_ids: jax.Array, *, graphdef: nnx.GraphDef, drafter: Drafter,
                         max_new_tokens: int, cache_len: int, rule: Rule, pad_id: int,
                         cache_dtype=jnp.float32, mesh: Mesh | None = None) -> DecodeOutput:
  """Speculative decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`): `drafter`
  proposes (with its `params`), the base model verifies under the acceptance `rule` (None:
  greedy; `acceptance.py`). `cache_len` must be at least P + max_new_tokens + drafter.tree.size.
  On `mesh` the KV cache is sharded as the weights are (`KVCache.init`)."""
  model = nnx.merge(graphdef, state)
  tree = drafter.tree
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype, mesh)
  logits, hidden, cache = prefill(model, tokens, prompt_lens, cache)
  key, sub = jax.random.split(key)
  root = first_token(logits, sub, rule)  # from the very logits (and key) the baseline's first token comes from
  ones = jnp.ones((batch,), jnp.int32)
  emitted = Emitted.init(batch, max_new_tokens, tree.depth + 1, pad_id).record(
      root[:, None], ones, eos_ids, max_new_tokens)
  ctx = DraftContext.start(tokens, prompt_lens, root, hidden, tokens.shape[1] + max_new_tokens + tree.depth + 2)

  def body(c: _Carry) -> _Carry:
    key, sub = jax.random.split(c.key)
    new, n, cache, root, hidden, state, path = speculative_step(model, drafter, params, c.cache, c.ctx,
                                                                c.state, sub, rule)
    done = c.emitted.done
    cache = dataclasses.replace(cache, lengths=jnp.where(done, c.cache.lengths, cache.lengths))
    return _Carry(cache, c.ctx.advance(new, n, root, hidden, done), drafter.commit(state, path, n, done),
                  c.emitted.record(new, n, eos_ids, max_new_tokens), c.steps + (~done).astype(jnp.int32), key)

  state = drafter.start(params, model, tokens, prompt_lens, cache_len, cache_dtype, mesh)
  end = jax.lax.while_loop(lambda c: ~jnp.all(c.emitted.done), body,
                           _Carry(cache, ctx, state, emitted, ones, key))
  return DecodeOutput(tokens=end.emitted.tokens[:, :max_new_tokens], num_tokens=end.emitted.count,
                      steps=end.steps)
