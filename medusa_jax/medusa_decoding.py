"""Medusa tree decoding: one jitted `jax.lax.while_loop`, static shapes, batch > 1.

Each step, per row: (1) the tree's tokens from the root (last emitted token) and the heads' top-k
at the last accepted position; (2) one forward over all tree tokens with the tree mask, their
K/V written after the row's prefix; (3) acceptance on the device; (4) the accepted path's K/V moved
to contiguous positions; the accepted tokens plus one bonus token (from the base logits at the
last accepted node) emitted; the heads' guesses there (over their drafting vocabulary,
`draft_vocab.py`) seed the next step, with no extra forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.acceptance import Rule, accept, first_token
from medusa_jax.draft_vocab import DraftVocab
from medusa_jax.decoding import DecodeOutput, output_buffer, prefill, record
from medusa_jax.heads import MedusaHeads
from medusa_jax.kv_cache import KVCache
from medusa_jax.llama import Llama
from medusa_jax.tree import Tree


def heads_top(model: Llama, heads: MedusaHeads, hidden: jax.Array, tree: Tree,
              draft: DraftVocab | None) -> jax.Array:
  """The first `tree.depth` heads' top-k ids `[batch, depth, topk]` at hidden states `[batch, embed]`,
  over the drafting vocabulary `draft` (None: the whole vocabulary)."""
  feats = heads.hidden(hidden, tree.depth)
  top = (jax.lax.top_k(heads.logits(feats, model), tree.topk)[1] if draft is None
         else draft.top_k(feats, tree.topk))
  return jnp.moveaxis(top, 0, 1).astype(jnp.int32)


def tree_tokens(root: jax.Array, top: jax.Array, tree: Tree) -> jax.Array:
  """root `[batch]`, heads' top-k `[batch, depth, topk]` -> the tree's tokens `[batch, T]`."""
  flat = jnp.concatenate([root[:, None], top.reshape(top.shape[0], -1)], axis=1)
  return jnp.take(flat, jnp.asarray(tree.candidate_index), axis=1)


def medusa_step(model: Llama, heads: MedusaHeads, cache: KVCache, root: jax.Array, top: jax.Array,
                tree: Tree, key: jax.Array, rule: Rule, draft: DraftVocab | None = None):
  """One tree step. Returns (emitted `[batch, depth + 1]`, emitted count `[batch]`, the cache with
  the accepted path committed, next root `[batch]`, next heads' top-k).

  One vocab matmul over every tree node gives the logits for acceptance and the bonus token
  (`acceptance.accept` under `rule`); the heads then project only the last accepted node, over
  the drafting vocabulary `draft`."""
  tokens = tree_tokens(root, top, tree)
  positions = cache.lengths[:, None] + jnp.asarray(tree.depths)[None, :]
  hidden, cache = model.hidden_states(tokens, positions, cache, chunk_mask=jnp.asarray(tree.mask))
  logits = model.logits(hidden)  # [b, T, vocab]
  path, accepted, last, bonus = accept(tokens, logits, tree, rule, key)  # path: [b, D+1] node ids
  last_hidden = jnp.take_along_axis(hidden, last[:, :, None], axis=1)[:, 0]
  next_top = heads_top(model, heads, last_hidden, tree, draft)
  path_tokens = jnp.take_along_axis(tokens, path, axis=1)  # [b, D+1]
  shifted = jnp.concatenate([path_tokens[:, 1:], bonus[:, None]], axis=1)
  j = jnp.arange(tree.depth + 1)[None, :]
  emitted = jnp.where(j < accepted[:, None], shifted, jnp.where(j == accepted[:, None], bonus[:, None], 0))
  cache = cache.commit_path(path, accepted + 1)
  return emitted, accepted + 1, cache, bonus, next_top


@functools.partial(jax.jit, static_argnames=("graphdef", "heads_graphdef", "tree", "max_new_tokens",
                                             "cache_len", "rule", "pad_id", "cache_dtype"))
def medusa_generate(state: nnx.State, heads_state: nnx.State, draft: DraftVocab | None,
                    tokens: jax.Array, prompt_lens: jax.Array, key: jax.Array, eos_ids: jax.Array, *,
                    graphdef: nnx.GraphDef, heads_graphdef: nnx.GraphDef, tree: Tree, max_new_tokens: int,
                    cache_len: int, rule: Rule, pad_id: int,
                    cache_dtype=jnp.float32) -> DecodeOutput:
  """Medusa decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`) under the
  acceptance `rule` (None: greedy; `acceptance.py`); the heads draft from `draft` (None: the whole
  vocabulary). `cache_len` must be at least P + max_new_tokens + tree.size."""
  model = nnx.merge(graphdef, state)
  heads = nnx.merge(heads_graphdef, heads_state)
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype)
  logits, hidden, cache = prefill(model, tokens, prompt_lens, cache)
  key, sub = jax.random.split(key)
  root = first_token(logits, sub, rule)  # from the very logits (and key) the baseline's first token comes from
  top = heads_top(model, heads, hidden, tree, draft)
  zeros = jnp.zeros((batch,), jnp.int32)
  out, count, done = record(output_buffer(batch, max_new_tokens, tree.depth + 1, pad_id), zeros,
                            root[:, None], zeros + 1, zeros.astype(bool), eos_ids, max_new_tokens)

  def cond(carry):
    return ~jnp.all(carry[5])

  def body(carry):
    cache, root, top, out, count, done, steps, key = carry
    key, sub = jax.random.split(key)
    emitted, n, new_cache, new_root, new_top = medusa_step(model, heads, cache, root, top, tree, sub,
                                                           rule, draft)
    new_cache = KVCache(new_cache.keys, new_cache.values, jnp.where(done, cache.lengths, new_cache.lengths))
    steps = steps + (~done).astype(jnp.int32)
    out, count, done = record(out, count, emitted, n, done, eos_ids, max_new_tokens)
    return new_cache, new_root, new_top, out, count, done, steps, key

  carry = (cache, root, top, out, count, done, zeros + 1, key)
  cache, root, top, out, count, done, steps, key = jax.lax.while_loop(cond, body, carry)
  return DecodeOutput(tokens=out[:, :max_new_tokens], num_tokens=count, steps=steps)
