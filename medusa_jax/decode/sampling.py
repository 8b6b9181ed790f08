"""Choosing the next token from logits: greedy, or temperature + top-p (nucleus) sampling."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """`temperature == 0` means greedy. A static (hashable) argument of the jitted loops."""

  temperature: float = 0.0
  top_p: float = 1.0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Masks `[..., vocab]` logits outside the smallest set whose probability reaches `top_p`: a
  number, or an array broadcastable to `[..., 1]` (per-row settings; rows at 1 are left whole)."""
  if not isinstance(top_p, jax.Array):
    if top_p >= 1.0:
      return logits
    return _top_p_mask(logits, top_p)
  return jax.lax.cond(jnp.any(top_p < 1.0),
                      lambda x: jnp.where(top_p >= 1.0, x, _top_p_mask(x, top_p)), lambda x: x, logits)


def _top_p_mask(logits: jax.Array, top_p) -> jax.Array:
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
  cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sampling_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """`[..., vocab]` logits -> those `sample` draws from at temperature > 0: scaled by the
  temperature, `-inf` outside the top-p set."""
  return top_p_filter(logits / params.temperature, params.top_p)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
  """`[batch, vocab]` float32 logits -> `[batch]` int32 tokens."""
  if params.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, sampling_logits(logits, params), axis=-1).astype(jnp.int32)
