"""Continuous batching on the device: a fixed number of slots, each one row of a shared KV cache,
that requests enter and leave while the others keep decoding.

`insert` prefills one prompt and writes it into a free slot; `run_chunk` runs a fixed number of
decode steps for the first `bucket` slots at once, over the slots' drafter's tree (Medusa heads,
with a prompt-lookup chain grafted on when asked, prompt lookup alone, a draft model, an EAGLE
drafter) or plain, and returns what each emitted. A draft model keeps its own KV cache rows beside
the slots' (the drafter's state, `drafters.py`): a plain chunk writes its tokens there too, in one
draft forward at its end, so the next tree chunk drafts from the whole text; an EAGLE drafter's
rows take each plain step's target features as it runs (`EagleDrafter.observe`). Every row samples by its own
settings (`coupled.RowSettings`: device arrays, so a new temperature or seed never recompiles),
and a row's tokens depend on its prompt, settings and seed alone: not on the other rows, the
bucket or the tree (`coupled.py`). The host keeps the live rows in the first slots (`move_row`
fills a hole), so a chunk's cost follows the number of live rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.drafters import DraftContext, Drafter, taps_of
from medusa_jax.decode.plain import Emitted, prefill
from medusa_jax.decode.speculative import Step, speculative_step
from medusa_jax.model.config import ModelConfig
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.rows import write_rows
from medusa_jax.serve.coupled import RowSettings, target_logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  cache: KVCache           # `[slots, max_len]` rows
  root: jax.Array          # `[slots]` int32: each row's last emitted token
  hidden: jax.Array        # `[slots, embed]`: the hidden state at its last accepted position
  rows: RowSettings        # per-row sampling settings
  budget: jax.Array        # `[slots]` int32: tokens the row may still emit
  stop_on_eos: jax.Array   # `[slots]` bool: false for `ignore_eos` requests
  done: jax.Array          # `[slots]` bool: finished, or a free slot
  history: jax.Array       # `[slots, max_len]` int32: prompt then emitted tokens, the root at
                           # `cache.lengths` (what prompt lookup reads)
  draft: Any = None        # the drafter's state, `[slots, ...]` (a draft model's KV cache), or None

  @classmethod
  def init(cls, config: ModelConfig, slots: int, max_len: int, dtype, mesh: Mesh | None = None,
           draft: Any = None) -> Slots:
    """Free slots, with the drafter's `empty` state `draft`; on `mesh` the KV cache is sharded as
    `KVCache.init` shards it."""
    def zeros(dtype=jnp.int32):  # a buffer each: the chunk donates them all
      return jnp.zeros((slots,), dtype)

    return cls(KVCache.init(config, slots, max_len, dtype, mesh), zeros(),
               jnp.zeros((slots, config.hidden_size), dtype),
               RowSettings.create(zeros(jnp.float32), zeros(jnp.float32) + 1, zeros()), zeros(),
               zeros(bool) | True, zeros(bool) | True, jnp.zeros((slots, max_len), jnp.int32), draft)


def _first(tree, n: int):
  return jax.tree.map(lambda x: x[:n], tree)


def _put_first(full, part):
  return jax.tree.map(lambda f, p: jax.lax.dynamic_update_slice_in_dim(f, p.astype(f.dtype), 0, 0), full, part)


def _set_row(full, row, i):
  return jax.tree.map(lambda f, r: jax.lax.dynamic_update_index_in_dim(f, r.astype(f.dtype), i, 0), full, row)


def _row(tree, i):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _caches(slots: Slots) -> dict[str, KVCache]:
  return {name: getattr(slots, name) for name in ("cache", "draft") if isinstance(getattr(slots, name), KVCache)}


def _bucket_view(slots: Slots, bucket: int, span: int | None) -> Slots:
  """The first `bucket` rows: per-row arrays cut to them, the cache buffers (the slots' and a
  draft model's) left whole (a forward writes and reads only their first rows, in place) with
  the attention `span`."""
  caches = _caches(slots)
  rows = _first(dataclasses.replace(slots, **{k: c.lengths for k, c in caches.items()}), bucket)
  return dataclasses.replace(rows, **{k: KVCache(c.keys, c.values, getattr(rows, k), span)
                                      for k, c in caches.items()})


def _merge_view(slots: Slots, view: Slots) -> Slots:
  """`slots` with a `_bucket_view`'s rows (and its cache buffers) written back."""
  caches = _caches(view)
  rows = _put_first(dataclasses.replace(slots, **{k: getattr(slots, k).lengths for k in caches}),
                    dataclasses.replace(view, **{k: c.lengths for k, c in caches.items()}))
  return dataclasses.replace(rows, **{k: KVCache(c.keys, c.values, getattr(rows, k))
                                      for k, c in caches.items()})


class Inserted(NamedTuple):
  slots: Slots
  first: jax.Array  # `[]` the row's first new token
  done: jax.Array   # `[]` whether the row is already done


@functools.partial(jax.jit, static_argnames=("graphdef", "drafter"), donate_argnums=(2,))
def insert(state: nnx.State, params, slots: Slots, slot: jax.Array, tokens: jax.Array, prompt_len: jax.Array,
           temperature: jax.Array, top_p: jax.Array, seed: jax.Array, budget: jax.Array,
           stop_on_eos: jax.Array, eos_ids: jax.Array, *, graphdef: nnx.GraphDef, drafter: Drafter | None = None):
  """Prefills one right-padded prompt `tokens` `[1, P]` of `prompt_len` tokens into slot `slot`
  (and `drafter`'s state, with its `params`), with its settings (scalars) and a budget of
  `budget` new tokens."""
  model = nnx.merge(graphdef, state)
  max_len, dtype = slots.cache.max_len, slots.cache.keys[0].dtype
  cache = KVCache.init(model.config, 1, max_len, dtype)
  logits, hidden, cache, taps = prefill(model, tokens, prompt_len[None], cache, taps=taps_of(drafter))
  draft = None if slots.draft is None else _row(drafter.start(params, model, tokens, prompt_len[None], max_len,
                                                              dtype, None, taps), 0)
  rows = RowSettings.create(temperature[None], top_p[None], seed[None])
  first = jnp.argmax(target_logits(logits[:, None], prompt_len[None, None], rows), axis=-1)[0, 0]
  first = first.astype(jnp.int32)
  done = (jnp.isin(first, eos_ids) & stop_on_eos) | (budget <= 1)
  history = jnp.zeros((slots.history.shape[1],), jnp.int32).at[:tokens.shape[1]].set(tokens[0])
  row = Slots(_row(cache, 0), first, hidden[0], _row(rows, 0), budget - 1, stop_on_eos, done,
              history.at[prompt_len].set(first), draft)
  return Inserted(_set_row(slots, row, slot), first, done)


def _plain_step(model, drafter, params, s: Slots, done) -> Step:
  """One token per row; a drafter that reads the target's features `observe`s the root's."""
  out = model.forward(s.root[:, None], s.cache.lengths[:, None], s.cache, taps=taps_of(drafter))
  target = target_logits(model.logits(out.hidden), s.cache.lengths[:, None] + 1, s.rows)
  nxt = jnp.argmax(target, axis=-1)[:, 0].astype(jnp.int32)
  ones = jnp.ones_like(nxt)
  draft = s.draft if out.taps is None else drafter.observe(params, model, s.draft, out.taps[:, 0], s.history, done)
  return Step(nxt[:, None], ones, out.cache.advance(ones), nxt, out.hidden[:, 0], draft, None)


def _tree_step(model, drafter, params, s: Slots, done) -> Step:
  ctx = DraftContext(s.root, s.hidden, s.history, s.cache.lengths + 1)
  step = speculative_step(model, drafter, params, s.cache, ctx, s.draft, jax.random.PRNGKey(0), None,
                          functools.partial(target_logits, rows=s.rows))
  return step._replace(state=drafter.commit(step.state, step.path, step.count, done, step.features))


class Chunk(NamedTuple):
  slots: Slots
  tokens: jax.Array  # `[bucket, steps * (depth + 1)]` what each row emitted
  counts: jax.Array  # `[bucket]` how many


@functools.partial(jax.jit, static_argnames=("graphdef", "drafter", "bucket", "steps", "span", "plain"),
                   donate_argnums=(2,))
def run_chunk(state: nnx.State, params, slots: Slots, eos_ids: jax.Array, *, graphdef: nnx.GraphDef,
              drafter: Drafter | None, bucket: int, steps: int, span: int | None = None, plain: bool = False):
  """`steps` decode steps for the first `bucket` slots: over `drafter`'s tree (with its `params`:
  heads, a grafted lookup chain, prompt lookup, a draft model; `drafters.py`), or plain when
  `plain` or it is None (a draft model's state then catches up at the chunk's end). They attend
  to their first `span` positions (None: all; it must hold every row's length plus what the
  chunk writes: `steps * (depth + 1) + size` of the tree)."""
  model = nnx.merge(graphdef, state)
  tree = None if drafter is None or plain else drafter.tree
  live = _bucket_view(slots, bucket, span)
  width = steps * (1 if tree is None else tree.depth + 1)
  emitted = Emitted(jnp.zeros((bucket, width + (1 if tree is None else tree.depth + 1)), jnp.int32),
                    jnp.zeros((bucket,), jnp.int32), live.done)

  def body(_, carry):
    s, out = carry
    done = out.done
    step = (_plain_step(model, drafter, params, s, done) if tree is None
            else _tree_step(model, drafter, params, s, done))
    cache = dataclasses.replace(step.cache, lengths=jnp.where(done, s.cache.lengths, step.cache.lengths))
    keep = done[:, None]
    s = dataclasses.replace(s, cache=cache, root=jnp.where(done, s.root, step.root),
                            hidden=jnp.where(keep, s.hidden, step.hidden.astype(s.hidden.dtype)),
                            history=write_rows(s.history, step.emitted, s.cache.lengths + 1), draft=step.state)
    return s, out.record(step.emitted, step.count, eos_ids, s.budget, s.stop_on_eos)

  live, out = jax.lax.fori_loop(0, steps, body, (live, emitted))
  if tree is None and live.draft is not None:
    live = dataclasses.replace(live, draft=drafter.catch_up(params, model, live.draft, live.history,
                                                            live.cache.lengths, steps))
  live = dataclasses.replace(live, budget=live.budget - out.count, done=out.done)
  return Chunk(_merge_view(slots, live), out.tokens[:, :width], out.count)


@functools.partial(jax.jit, donate_argnums=(0,))
def move_row(slots: Slots, src: jax.Array, dst: jax.Array) -> Slots:
  """Slot `src` copied into slot `dst`, and `src` marked free."""
  slots = _set_row(slots, _row(slots, src), dst)
  return dataclasses.replace(slots, done=slots.done.at[src].set(True))


@functools.partial(jax.jit, donate_argnums=(0,))
def free_row(slots: Slots, i: jax.Array) -> Slots:
  """Slot `i` marked done (a finished or cancelled request)."""
  return dataclasses.replace(slots, done=slots.done.at[i].set(True))
