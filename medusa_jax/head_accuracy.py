"""How often each Medusa head guesses the base model's own greedy continuation, by rank.

`accuracies[k, i]` is the fraction of decode positions where head k's rank-i token is the token
the base model emits k + 2 ahead. This is what `tree.tree_from_accuracies` builds a tree from.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.engine import Engine, bucket, pad_prompts
from medusa_jax.training import head_targets


@functools.partial(jax.jit, static_argnames=("graphdef", "heads_graphdef", "topk"))
def _rank_counts(state, heads_state, tokens: jax.Array, first: jax.Array, end: jax.Array, *,
                 graphdef, heads_graphdef, topk: int) -> tuple[jax.Array, jax.Array]:
  """tokens `[batch, L]` (prompt + greedy answer); positions `t` in `[first, end)` per row count.
  Returns (hits `[num_heads, topk]`: target at rank i, positions `[num_heads]`)."""
  model = nnx.merge(graphdef, state)
  heads = nnx.merge(heads_graphdef, heads_state)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = model.hidden_states(tokens, positions)
  feats = heads.hidden(hidden)  # [K, b, L, e]
  targets, _ = head_targets(tokens, jnp.ones(tokens.shape, bool), heads.config.num_heads)
  hits, counts = [], []
  t = jnp.arange(tokens.shape[1])[None, :]
  for k in range(heads.config.num_heads):
    valid = (t >= first[:, None]) & (t + k + 2 < end[:, None])
    logits = heads.project(k, feats[k], model)  # [b, L, vocab]
    target_logit = jnp.take_along_axis(logits, targets[..., k, None], axis=-1)
    rank = jnp.sum(logits > target_logit, axis=-1)  # [b, L]
    hits.append(jnp.sum((rank[..., None] == jnp.arange(topk)) & valid[..., None], axis=(0, 1)))
    counts.append(jnp.sum(valid))
  return jnp.stack(hits), jnp.stack(counts)


def head_accuracy(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                  topk: int = 10) -> tuple[np.ndarray, int]:
  """Per-head, per-rank accuracy `[num_heads, topk]` of `engine`'s heads against its base model's
  greedy answers to `prompts` (token lists), one prompt at a time; and the positions counted."""
  engine.resolve_mode("medusa")
  hits = np.zeros((engine.heads_config.num_heads, topk))
  total = np.zeros(engine.heads_config.num_heads)
  for prompt in prompts:
    answer, count, _, _ = engine.generate_ids([prompt], max_new_tokens=max_new_tokens, mode="baseline")
    seq = list(prompt) + [int(x) for x in answer[0, : int(count[0])]]
    tokens, _ = pad_prompts([seq], bucket(len(seq)), engine.pad_id)  # one compile per bucket
    h, n = _rank_counts(engine.state, engine.heads_state, jnp.asarray(tokens),
                        jnp.asarray([len(prompt) - 1]), jnp.asarray([len(seq)]),
                        graphdef=engine.graphdef, heads_graphdef=engine.heads_graphdef, topk=topk)
    hits += np.asarray(h)
    total += np.asarray(n)
  return hits / np.maximum(total, 1)[:, None], int(total[0])
