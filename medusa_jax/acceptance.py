"""The acceptance rule: which candidate path of the tree the base model keeps.

After the tree forward, node i (token `tokens[i]`, parent `parents[i]`) is *acceptable* when the
base model's logits at its parent agree with it:
- greedy: `tokens[i] == argmax(logits[parent])`; lossless, the output equals plain greedy decoding;
- typical: `p(tokens[i]) > min(epsilon, delta * exp(-H(p)))`, p = softmax(logits[parent] / T)
  (Medusa's typical acceptance; not lossless, by design).
A path is accepted up to its first unacceptable node. The longest accepted prefix wins; ties go to
the highest summed log-probability of the accepted tokens (greedy: the first such path).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medusa_jax.tree import Tree


@dataclasses.dataclass(frozen=True)
class TypicalParams:
  """Typical acceptance settings (a static jit argument)."""

  temperature: float = 0.7
  posterior_threshold: float = 0.09  # epsilon
  posterior_alpha: float = 0.3       # delta


def typical_threshold(probs: jax.Array, params: TypicalParams) -> jax.Array:
  """`[..., vocab]` probabilities -> `[...]` threshold min(epsilon, delta * exp(-entropy))."""
  entropy = -jnp.sum(probs * jnp.log(probs + 1e-5), axis=-1)
  return jnp.minimum(params.posterior_threshold, params.posterior_alpha * jnp.exp(-entropy))


def node_acceptance(tokens: jax.Array, internal_logits: jax.Array, tree: Tree,
                    typical: TypicalParams | None = None) -> tuple[jax.Array, jax.Array]:
  """tokens `[batch, T]`, logits at the tree's internal nodes `[batch, I, vocab]` (`tree.internal`:
  a leaf's logits decide nothing here) -> (acceptable `[batch, T]` bool, log-probability of each
  token under its parent's distribution `[batch, T]`); root entries unused."""
  slots = jnp.asarray(tree.parent_slot)
  if typical is None:
    ok = tokens == jnp.take(jnp.argmax(internal_logits, axis=-1), slots, axis=1)
    return ok, jnp.zeros(tokens.shape, jnp.float32)
  parent_logits = jnp.take(internal_logits, slots, axis=1)  # [b, T, V]
  probs = jax.nn.softmax(parent_logits / typical.temperature, axis=-1)
  p = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  return p > typical_threshold(probs, typical), jnp.log(p + 1e-30)


def choose_path(ok: jax.Array, logp: jax.Array, tree: Tree) -> tuple[jax.Array, jax.Array]:
  """Per-node acceptability `[batch, T]` -> (winning leaf path `[batch]`, accepted length `[batch]`
  in 0..depth). The accepted tokens are nodes `tree.retrieve[path, 1 : length + 1]`."""
  retrieve = jnp.asarray(tree.retrieve[:, 1:])  # [L, D]
  valid = jnp.asarray(tree.retrieve_mask[:, 1:])
  matches = jnp.take(ok, retrieve, axis=1) & valid  # [b, L, D]
  lengths = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)  # [b, L]
  longest = jnp.max(lengths, axis=-1)
  in_prefix = jnp.arange(tree.depth)[None, None, :] < longest[:, None, None]
  score = jnp.sum(jnp.where(in_prefix, jnp.take(logp, retrieve, axis=1), 0.0), axis=-1)
  score = jnp.where(lengths == longest[:, None], score, -jnp.inf)
  return jnp.argmax(score, axis=-1).astype(jnp.int32), longest.astype(jnp.int32)


def typical_sample(logits: jax.Array, key: jax.Array, params: TypicalParams) -> jax.Array:
  """The next token in typical mode: sampled from softmax(logits / T) restricted to tokens above
  the typical threshold (the most likely token always stays). `[batch, vocab]` -> `[batch]`."""
  scaled = logits / params.temperature
  probs = jax.nn.softmax(scaled, axis=-1)
  keep = (probs > typical_threshold(probs, params)[..., None]) | (
      scaled == jnp.max(scaled, axis=-1, keepdims=True))
  return jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)
