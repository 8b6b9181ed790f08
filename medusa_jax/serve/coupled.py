"""Per-row sampling coupled to a seed and a position, for batches whose rows each have their own
settings (a server's requests).

The token at position p of a row is the argmax of its sampling logits (temperature, then top-p)
plus Gumbel noise drawn from (the row's key, p): by the Gumbel-max trick an exact sample of
temperature / top-p sampling, yet fixed by the seed and the position alone. Speculation then
verifies drafts against that argmax exactly as greedy decoding does (`acceptance.accept` with the
greedy rule), so every tree, or none, emits the same tokens: a request's output depends on its
prompt, settings and seed, never on what else shares the batch. A draft token is accepted with
probability p(token), as recursive rejection sampling accepts it. Temperature 0 rows are greedy.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medusa_jax.decode.sampling import SamplingParams, sampling_logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSettings:
  """Each row's sampling settings and key: device arrays, so a new setting never recompiles."""

  sampling: SamplingParams  # `[batch]` temperature (0: greedy) and top-p
  key: jax.Array            # `[batch, 2]` uint32: each row's PRNG key (from its seed)

  @classmethod
  def create(cls, temperature, top_p, seeds) -> RowSettings:
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    return cls(SamplingParams(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32)), keys)


def target_logits(logits: jax.Array, positions: jax.Array, rows: RowSettings) -> jax.Array:
  """logits `[batch, n, vocab]` predicting the tokens at `positions` `[batch, n]` -> logits whose
  argmax is the row's token there: the logits themselves for greedy rows, else the sampling logits
  plus the Gumbel noise of (row key, position)."""
  greedy = (rows.sampling.temperature <= 0)[:, None, None]

  def row_noise(key, pos):  # [n] -> [n, vocab]
    return jax.vmap(lambda p: jax.random.gumbel(jax.random.fold_in(key, p), logits.shape[-1:]))(pos)

  def sampled(x):
    noise = jax.vmap(row_noise)(rows.key, positions.astype(jnp.uint32))
    return jnp.where(greedy, x, sampling_logits(x, rows.sampling) + noise)

  return jax.lax.cond(jnp.any(~greedy), sampled, lambda x: x, logits)  # all greedy: as is
