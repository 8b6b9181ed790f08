"""Medusa tree decoding: one jitted `jax.lax.while_loop`, static shapes, batch > 1.

Each step, per row: (1) the tree's tokens from the root (last emitted token) and the heads' guesses
at the last accepted position (`MedusaHeads.draft_tree`: top-k per head, or depth by depth for
Hydra heads); (2) one forward over all tree tokens with the tree mask, their
K/V written after the row's prefix; (3) acceptance on the device; (4) the accepted path's K/V moved
to contiguous positions; the accepted tokens plus one bonus token (from the base logits at the
last accepted node) emitted; the hidden state there seeds the next step's guesses (over the heads'
drafting vocabulary, `draft_vocab.py`), with no extra forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.acceptance import Rule, accept, first_token
from medusa_jax.decode.plain import DecodeOutput, Emitted, prefill
from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama


def tree_forward(model: Llama, cache: KVCache, tokens: jax.Array, tree: Tree):
  """The tree's tokens `[batch, T]` (`MedusaHeads.draft_tree`) through the model in one forward,
  their K/V written after each row's prefix. Returns (positions `[batch, T]`, float32 logits
  `[batch, T, vocab]`, hidden states `[batch, T, embed]`, cache)."""
  positions = cache.lengths[:, None] + jnp.asarray(tree.depths)[None, :]
  node_hidden, cache = model.hidden_states(tokens, positions, cache, chunk_mask=jnp.asarray(tree.mask))
  return positions, model.logits(node_hidden), node_hidden, cache


def keep_path(tokens: jax.Array, node_hidden: jax.Array, cache: KVCache, path: jax.Array,
              accepted: jax.Array, last: jax.Array, bonus: jax.Array, tree: Tree):
  """After acceptance (`acceptance.accept`'s path, accepted count, last node and bonus token):
  (emitted `[batch, depth + 1]`: the accepted tokens then the bonus, emitted count `[batch]`, the
  cache with the accepted path's K/V moved to contiguous positions and committed, the last
  accepted node's hidden state `[batch, embed]`)."""
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # [b, D+1]
  shifted = jnp.concatenate([path_tokens[:, 1:], bonus[:, None]], axis=1)
  j = jnp.arange(tree.depth + 1)[None, :]
  emitted = jnp.where(j < accepted[:, None], shifted, jnp.where(j == accepted[:, None], bonus[:, None], 0))
  last_hidden = jnp.take_along_axis(node_hidden, last[:, :, None], axis=1)[:, 0]
  return emitted, accepted + 1, cache.commit_path(path, accepted + 1), last_hidden


def medusa_step(model: Llama, heads: MedusaHeads, cache: KVCache, root: jax.Array, hidden: jax.Array,
                tree: Tree, key: jax.Array, rule: Rule, draft: DraftVocab | None = None):
  """One tree step under the acceptance `rule`, its candidates the heads' guesses at `hidden`
  `[batch, embed]` (the last accepted position's hidden state) over the drafting vocabulary
  `draft`. Returns (emitted `[batch, depth + 1]`, emitted count `[batch]`, the cache with the
  accepted path committed, next root `[batch]`, the hidden state the next step's heads read
  `[batch, embed]`). One vocab matmul over every tree node gives the logits for acceptance and
  the bonus token."""
  tokens = heads.draft_tree(model, hidden, root, tree, draft)
  _, logits, node_hidden, cache = tree_forward(model, cache, tokens, tree)
  path, accepted, last, bonus = accept(tokens, logits, tree, rule, key)
  emitted, n, cache, last_hidden = keep_path(tokens, node_hidden, cache, path, accepted, last, bonus, tree)
  return emitted, n, cache, bonus, last_hidden


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache
  root: jax.Array   # `[batch]` the token emitted last: the next tree's root
  hidden: jax.Array  # `[batch, embed]` the hidden state at the last accepted position (heads read it)
  emitted: Emitted
  steps: jax.Array  # `[batch]` forward passes of each row until it was done
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "heads_graphdef", "tree", "max_new_tokens",
                                             "cache_len", "rule", "pad_id", "cache_dtype", "mesh"))
def medusa_generate(state: nnx.State, heads_state: nnx.State, draft: DraftVocab | None,
                    tokens: jax.Array, prompt_lens: jax.Array, key: jax.Array, eos_ids: jax.Array, *,
                    graphdef: nnx.GraphDef, heads_graphdef: nnx.GraphDef, tree: Tree, max_new_tokens: int,
                    cache_len: int, rule: Rule, pad_id: int,
                    cache_dtype=jnp.float32, mesh: Mesh | None = None) -> DecodeOutput:
  """Medusa decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`) under the
  acceptance `rule` (None: greedy; `acceptance.py`); the heads draft from `draft` (None: the whole
  vocabulary). `cache_len` must be at least P + max_new_tokens + tree.size. On `mesh` the KV cache
  is sharded as the weights are (`KVCache.init`)."""
  model = nnx.merge(graphdef, state)
  heads = nnx.merge(heads_graphdef, heads_state)
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype, mesh)
  logits, hidden, cache = prefill(model, tokens, prompt_lens, cache)
  key, sub = jax.random.split(key)
  root = first_token(logits, sub, rule)  # from the very logits (and key) the baseline's first token comes from
  ones = jnp.ones((batch,), jnp.int32)
  emitted = Emitted.init(batch, max_new_tokens, tree.depth + 1, pad_id).record(
      root[:, None], ones, eos_ids, max_new_tokens)

  def body(c: _Carry) -> _Carry:
    key, sub = jax.random.split(c.key)
    new, n, cache, root, hidden = medusa_step(model, heads, c.cache, c.root, c.hidden, tree, sub, rule, draft)
    done = c.emitted.done
    cache = dataclasses.replace(cache, lengths=jnp.where(done, c.cache.lengths, cache.lengths))
    return _Carry(cache, root, hidden, c.emitted.record(new, n, eos_ids, max_new_tokens),
                  c.steps + (~done).astype(jnp.int32), key)

  start = _Carry(cache, root, hidden, emitted, ones, key)
  end = jax.lax.while_loop(lambda c: ~jnp.all(c.emitted.done), body, start)
  return DecodeOutput(tokens=end.emitted.tokens[:, :max_new_tokens], num_tokens=end.emitted.count,
                      steps=end.steps)
