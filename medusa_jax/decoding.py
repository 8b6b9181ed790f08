"""Prefill and the plain (baseline) decode loop: one jitted program, a `jax.lax.while_loop` over
steps, no host round trip per token. Rows of a batch have their own prompt length and stop on
EOS independently."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from medusa_jax.kv_cache import KVCache
from medusa_jax.llama import Llama
from medusa_jax.ops import gather_rows, write_rows
from medusa_jax.sampling import SamplingParams, sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
  tokens: jax.Array      # `[batch, max_new_tokens]` new tokens, `pad` past `num_tokens`
  num_tokens: jax.Array  # `[batch]` tokens emitted (EOS included)
  steps: jax.Array       # `[batch]` forward passes that emitted them (prefill counts as one)


def prefill(model: Llama, tokens: jax.Array, prompt_lens: jax.Array, cache: KVCache):
  """Runs right-padded prompts `[batch, P]` through the model.

  Returns (logits `[batch, vocab]` and hidden `[batch, embed]` at each row's last prompt token,
  the cache with `lengths == prompt_lens`).
  """
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, cache = model.hidden_states(tokens, positions, cache)
  last = jnp.take_along_axis(hidden, (prompt_lens - 1)[:, None, None], axis=1)[:, 0]
  return model.logits(last), last, dataclasses.replace(cache, lengths=prompt_lens.astype(jnp.int32))


def record(out: jax.Array, count: jax.Array, new: jax.Array, new_count: jax.Array, done: jax.Array,
           eos_ids: jax.Array, max_new_tokens: int):
  """Appends `new_count` `[batch]` of `new` `[batch, n]` to `out` at `count`, for rows not `done`.

  Truncates at the first EOS and at `max_new_tokens`. Returns (out, count, done).
  """
  n = new.shape[1]
  valid = (jnp.arange(n)[None, :] < new_count[:, None]) & ~done[:, None]
  is_eos = jnp.isin(new, eos_ids) & valid
  first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
  take = jnp.minimum(jnp.where(valid.any(axis=1), jnp.minimum(new_count, first_eos), 0),
                     max_new_tokens - count)
  keep = jnp.arange(n)[None, :] < take[:, None]
  old = gather_rows(out, count[:, None] + jnp.arange(n)[None, :])
  out = write_rows(out, jnp.where(keep, new, old), count)
  count = count + take
  done = done | (is_eos.any(axis=1)) | (count >= max_new_tokens)
  return out, count, done


def output_buffer(batch: int, max_new_tokens: int, extra: int, pad_id: int) -> jax.Array:
  """`[batch, max_new_tokens + extra]`: `extra` slack so a step's fixed-size write never clips."""
  return jnp.full((batch, max_new_tokens + extra), pad_id, jnp.int32)


def decode_step(model: Llama, cache: KVCache, last: jax.Array, key: jax.Array,
                sampling: SamplingParams) -> tuple[jax.Array, KVCache]:
  """One plain decode step: `last` `[batch]` tokens in, next tokens `[batch]` out; their K/V
  written at `cache.lengths` (not committed)."""
  logits, _, cache = model(last[:, None], cache.lengths[:, None], cache)
  return sample(logits[:, 0], key, sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "sampling",
                                             "pad_id", "cache_dtype"))
def baseline_generate(state: nnx.State, tokens: jax.Array, prompt_lens: jax.Array,
                      key: jax.Array, eos_ids: jax.Array, *, graphdef: nnx.GraphDef,
                      max_new_tokens: int, cache_len: int, sampling: SamplingParams, pad_id: int,
                      cache_dtype=jnp.float32) -> DecodeOutput:
  """Plain autoregressive decoding of right-padded prompts `[batch, P]` (lengths `prompt_lens`)."""
  model = nnx.merge(graphdef, state)
  batch = tokens.shape[0]
  cache = KVCache.init(model.config, batch, cache_len, cache_dtype)
  logits, _, cache = prefill(model, tokens, prompt_lens, cache)
  key, sub = jax.random.split(key)
  first = sample(logits, sub, sampling)
  zeros = jnp.zeros((batch,), jnp.int32)
  ones = jnp.ones((batch,), jnp.int32)
  out, count, done = record(output_buffer(batch, max_new_tokens, 1, pad_id), zeros, first[:, None],
                            ones, zeros.astype(bool), eos_ids, max_new_tokens)

  def cond(carry):
    return ~jnp.all(carry[4])

  def body(carry):
    cache, last, out, count, done, key = carry
    key, sub = jax.random.split(key)
    nxt, cache = decode_step(model, cache, last, sub, sampling)
    cache = cache.advance(~done)
    out, count, done = record(out, count, nxt[:, None], ones, done, eos_ids, max_new_tokens)
    return cache, nxt, out, count, done, key

  carry = jax.lax.while_loop(cond, body, (cache, first, out, count, done, key))
  out, count = carry[2], carry[3]
  return DecodeOutput(tokens=out[:, :max_new_tokens], num_tokens=count, steps=count)
