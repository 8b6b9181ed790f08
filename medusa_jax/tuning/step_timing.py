"""Wall time of one decode step on this device (a plain step, or a Medusa step over a given tree),
and the bytes such a step must read (its memory-bandwidth floor).

A Medusa step verifies `tree.size` tokens where a plain step reads one, so its speedup is
(tokens per step) / (step time ratio). On a GPU a step over a few dozen tokens costs about what a
one-token step does (both read every weight once); on a CPU each extra row costs real time. The
ratio measured here, with the tokens per step that `head_accuracy` predicts, picks the tree size
that is fastest on the device at hand (`infer/benchmark.py --tree-nodes auto`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.decode.drafters import DraftContext, HeadsDrafter
from medusa_jax.decode.engine import Engine
from medusa_jax.decode.plain import decode_step
from medusa_jax.decode.speculative import speculative_step
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.kv_cache import KVCache


@functools.partial(jax.jit, static_argnames=("graphdef", "heads_graphdef", "tree"), donate_argnums=(3,))
def _step(state, heads_state, draft, cache: KVCache, root: jax.Array, hidden: jax.Array, *, graphdef,
          heads_graphdef, tree: Tree | None) -> KVCache:
  """One step (plain when `tree` is None); returns the cache with its lengths unchanged, so that
  every repetition sees the same context."""
  model = nnx.merge(graphdef, state)
  key = jax.random.PRNGKey(0)
  if tree is None:
    _, new = decode_step(model, cache, root, key, None)
  else:
    new = speculative_step(model, HeadsDrafter(heads_graphdef, tree), (heads_state, draft), cache,
                           DraftContext.without_history(root, hidden), None, key, None).cache
  return KVCache(new.keys, new.values, cache.lengths)


def step_seconds(engine: Engine, tree: Tree | None, *, batch: int = 1, context: int = 256,
                 repeats: int = 20) -> float:
  """Seconds of one decode step of `engine` (plain when `tree` is None, else a Medusa step over
  `tree`) for `batch` rows with `context` tokens cached: the fastest of `repeats` after a warm-up
  (on the engine's mesh, if it has one)."""
  size = 1 if tree is None else tree.size
  cache = KVCache.init(engine.config, batch, -(-(context + size) // 64) * 64, engine.dtype, engine.mesh)
  cache = KVCache(cache.keys, cache.values, jnp.full((batch,), context, jnp.int32))
  root = jnp.zeros((batch,), jnp.int32)
  hidden = jnp.zeros((batch, engine.config.hidden_size), engine.dtype)
  run = functools.partial(_step, engine.state, engine.heads_state, engine.draft, graphdef=engine.graphdef,
                          heads_graphdef=engine.heads_graphdef, tree=tree)
  cache = jax.block_until_ready(run(cache, root, hidden))  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    cache = jax.block_until_ready(run(cache, root, hidden))
    best = min(best, time.perf_counter() - start)
  return best


def bytes_per_step(state, heads_state, config, *, batch: int, context: int, cache_itemsize: int) -> int:
  """Bytes one decode step must read: the backbone's weights (less an untied embedding table, of
  which it reads `batch` rows), the heads' own weights when given (a tree step), and the keys and
  values of `context` cached tokens per row."""
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  if not config.tie_embeddings:
    table = nnx.to_pure_dict(state)["embed"]["embedding"]
    weights -= table.nbytes - batch * table.nbytes // table.shape[0]
  if heads_state is not None:
    weights += sum(x.nbytes for x in jax.tree_util.tree_leaves(heads_state))
  kv = 2 * config.num_layers * batch * context * config.num_kv_heads * config.head_dim * cache_itemsize
  return weights + kv
