"""Prefill and the plain (baseline) decode loop: one jitted program, a `jax.lax.while_loop` over
steps, no host round trip per token. Rows of a batch have their own prompt length and stop on
EOS independently."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.decode.sampling import SamplingParams, sample
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.llama import Llama
from medusa_jax.model.rows import gather_rows, write_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  tokens: jax.Array      # `[batch, max_new_tokens]` new tokens, `pad` past `num_tokens`
  num_tokens: jax.Array  # `[batch]` tokens emitted (EOS included)
  steps: jax.Array       # `[batch]` forward passes that emitted them (prefill counts as one)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Emitted:
  """The tokens emitted so far, per row."""

  tokens: jax.Array  # `[batch, max_new_tokens + slack]`: `slack` so a step's fixed-size write never clips
  count: jax.Array   # `[batch]` int32
  done: jax.Array    # `[batch]` bool: EOS emitted or `max_new_tokens` reached

  @classmethod
  def init(cls, batch: int, max_new_tokens: int, slack: int, pad_id: int) -> "Emitted":
    zeros = jnp.zeros((batch,), jnp.int32)
    return cls(jnp.full((batch, max_new_tokens + slack), pad_id, jnp.int32), zeros, zeros.astype(bool))

  def record(self, new: jax.Array, new_count: jax.Array, eos_ids: jax.Array,
             max_new_tokens: int | jax.Array, stop_on_eos: jax.Array | None = None) -> "Emitted":
    """Appends `new_count` `[batch]` of `new` `[batch, n]` for rows not done, truncated at the first
    EOS (in rows where `stop_on_eos` `[batch]`, default all) and at `max_new_tokens` (a number, or
    one per row `[batch]`)."""
    n = new.shape[1]
    valid = (jnp.arange(n)[None, :] < new_count[:, None]) & ~self.done[:, None]
    is_eos = jnp.isin(new, eos_ids) & valid
    if stop_on_eos is not None:
      is_eos = is_eos & stop_on_eos[:, None]
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
    take = jnp.minimum(jnp.where(valid.any(axis=1), jnp.minimum(new_count, first_eos), 0),
                       max_new_tokens - self.count)
    keep = jnp.arange(n)[None, :] < take[:, None]
    old = gather_rows(self.tokens, self.count[:, None] + jnp.arange(n)[None, :])
    tokens = write_rows(self.tokens, jnp.where(keep, new, old), self.count)
    count = self.count + take
    done = self.done | is_eos.any(axis=1) | (count >= max_new_tokens)
    return Emitted(tokens, count, done)


class Prefilled(NamedTuple):
  logits: jax.Array        # `[batch, vocab]` at each row's last prompt token
  hidden: jax.Array        # `[batch, embed]` there
  cache: KVCache           # `lengths == prompt_lens`
  taps: jax.Array | None = None  # `[batch, P, len(taps) * embed]` the tapped layers' inputs


def prefill(model: Llama, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache,
            num_layers: int | None = None, taps: tuple[int, ...] = ()) -> Prefilled:
  """Runs right-padded prompts `[batch, P]` through the model (its first `num_layers` layers
  only, when given: a self-drafting model), keeping the inputs of the layers `taps` (an EAGLE
  drafter's features, `Llama.forward`). The cache must be empty: the prompts attend to their
  own `P` positions only, not to the whole cache."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  own = dataclasses.replace(cache, span=tokens.shape[1])
  out = model.forward(tokens, positions, own, num_layers=num_layers, taps=taps)
  last = jnp.take_along_axis(out.hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
  return Prefilled(model.logits(last), last,
                   dataclasses.replace(out.cache, span=cache.span, lengths=prompt_lens.astype(jnp.int32)),
                   out.taps)


def decode_step(model: Llama, cache: KVCache, last: jax.Array, key: jax.Array,
                sampling: SamplingParams | None) -> tuple[jax.Array, KVCache]:
  """One plain decode step: `last` `[batch]` tokens in, next tokens `[batch]` out (`sampling`
  None: greedy); their K/V written at `cache.lengths` (not committed)."""
  logits, _, cache = model(last[:, None], cache.lengths[:, None], cache)
  return sample(logits[:, 0], key, sampling), cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Carry:
  cache: KVCache
  last: jax.Array     # `[batch]` the token emitted last (the next step's input)
  emitted: Emitted
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "pad_id",
                                             "cache_dtype", "mesh"))
def baseline_generate(state: nnx.State, sampling: SamplingParams | None, tokens: jax.Array,
                      prompt_lens: jax.Array, key: jax.Array, eos_ids: jax.Array, *, graphdef: nnx.GraphDef,
                      max_new_tokens: int, cache_len: int, pad_id: int, cache_dtype=jnp.float32,
                      mesh: Mesh | None = None) -> DecodeOutput:
  """Plain autoregressive decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`),
  greedy or sampled (`sampling`: device arrays, so new settings reuse the program); on `mesh` the
  KV cache is sharded as the weights are (`KVCache.init`)."""
  model = nnx.merge(graphdef, state)
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype, mesh)
  logits, _, cache, _ = prefill(model, tokens, prompt_lens, cache)
  key, sub = jax.random.split(key)
  first = sample(logits, sub, sampling)
  ones = jnp.ones((batch,), jnp.int32)
  emitted = Emitted.init(batch, max_new_tokens, 1, pad_id).record(first[:, None], ones, eos_ids,
                                                                  max_new_tokens)

  def body(c: _Carry) -> _Carry:
    key, sub = jax.random.split(c.key)
    nxt, cache = decode_step(model, c.cache, c.last, sub, sampling)
    return _Carry(cache.advance(~c.emitted.done), nxt,
                  c.emitted.record(nxt[:, None], ones, eos_ids, max_new_tokens), key)

  out = jax.lax.while_loop(lambda c: ~jnp.all(c.emitted.done), body,
                           _Carry(cache, first, emitted, key)).emitted
  return DecodeOutput(tokens=out.tokens[:, :max_new_tokens], num_tokens=out.count, steps=out.count)
