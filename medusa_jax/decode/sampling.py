"""Choosing the next token from logits: greedy, or temperature + top-p (nucleus) sampling.

Sampling settings are device arrays (`SamplingParams`), one value per row, so a new temperature
or top-p never compiles a new program; greedy decoding is the absence of settings (None)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Temperature and top-p, each `[batch]` (or a scalar for every row); a row at temperature 0
  is greedy. A jit argument like any array."""

  temperature: jax.Array
  top_p: jax.Array

  @classmethod
  def create(cls, temperature, top_p, batch: int) -> SamplingParams:
    """The same settings for `batch` rows, as float32 `[batch]` arrays (NumPy: place them)."""
    import numpy as np

    return cls(np.full((batch,), temperature, np.float32), np.full((batch,), top_p, np.float32))


def per_row(x: jax.Array | float, ndim: int) -> jax.Array:
  """A per-row setting (a scalar, or `[batch]`) shaped to broadcast against `ndim`-dimensional
  arrays whose first axis is the batch."""
  x = jnp.asarray(x)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


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
  """`[batch, ..., vocab]` logits -> those `sample` draws from: scaled by each row's temperature
  (rows at 0 left as they are), `-inf` outside its top-p set."""
  t = per_row(params.temperature, logits.ndim)
  return top_p_filter(logits / jnp.where(t > 0, t, 1.0), per_row(params.top_p, logits.ndim))


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams | None) -> jax.Array:
  """`[batch, vocab]` float32 logits -> `[batch]` int32 tokens; `params` None: greedy."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if params is None:
    return greedy
  drawn = jax.random.categorical(key, sampling_logits(logits, params), axis=-1).astype(jnp.int32)
  return jnp.where(per_row(params.temperature, 1) > 0, drawn, greedy)
