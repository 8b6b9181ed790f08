"""The acceptance rule: which candidate path of the tree the base model keeps, and the token it
adds after the path (the bonus token). Three rules, chosen by the kind of `rule` (its settings are
device arrays, so new values never recompile):

- `None`, greedy (temperature 0): node i (token `tokens[i]`, parent `parents[i]`) is acceptable
  when `tokens[i] == argmax(logits[parent])`; lossless: the output equals plain greedy decoding.
  Bonus: the argmax at the last accepted node.
- `SamplingParams`, lossless sampling (temperature > 0, top-p): recursive rejection sampling over
  the tree (SpecInfer, EAGLE) with the heads' guesses as deterministic drafts. At a node whose
  distribution is p (`sampling.sampling_logits`: temperature, then top-p), its children
  c_1..c_m are tried in rank order, c_j accepted with probability
  p(c_j) / (1 - p(c_1) - ... - p(c_{j-1})); the first accepted child is kept and the walk goes
  on from it. Where no child is accepted, the bonus token is drawn from p without the children's
  tokens. Every emitted token has exactly the distribution plain sampling gives it; the heads
  change only how many tokens a step emits.
  With `draft_probs` (a chain sampled from a draft model's distributions q), the standard
  speculative sampling rule instead (Leviathan et al., Chen et al.): node c is accepted with
  probability min(1, p(c) / q(c)); after a rejection the bonus token is drawn from the
  normalised max(0, p - q). Also exact.
- `TypicalParams`, typical acceptance (Medusa's): acceptable when
  `p(tokens[i]) > min(epsilon, delta * exp(-H(p)))`, p = softmax(logits[parent] / T); not
  lossless, by design. Bonus: drawn from the tokens above that threshold (the argmax always
  among them).
A path is accepted up to its first unacceptable node. The longest accepted prefix wins; ties go
to the highest summed log-probability of the accepted tokens (greedy: the first such path;
lossless sampling accepts at most one child per node, so it has no ties).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medusa_jax.decode.sampling import SamplingParams, per_row, sample, sampling_logits
from medusa_jax.medusa.tree import Tree, TreeArrays


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TypicalParams:
  """Typical acceptance settings, each `[batch]` or a scalar (defaults in `GenerationConfig`)."""

  temperature: jax.Array
  posterior_threshold: jax.Array  # epsilon
  posterior_alpha: jax.Array      # delta


def typical_threshold(probs: jax.Array, params: TypicalParams) -> jax.Array:
  """`[..., vocab]` probabilities -> `[...]` threshold min(epsilon, delta * exp(-entropy))."""
  entropy = -jnp.sum(probs * jnp.log(probs + 1e-5), axis=-1)
  return jnp.minimum(per_row(params.posterior_threshold, entropy.ndim),
                     per_row(params.posterior_alpha, entropy.ndim) * jnp.exp(-entropy))


def node_acceptance(tokens: jax.Array, internal_logits: jax.Array, tree: TreeArrays,
                    typical: TypicalParams | None = None) -> tuple[jax.Array, jax.Array]:
  """tokens `[batch, T]`, logits at the tree's internal nodes `[batch, I, vocab]` (`tree.internal`:
  a leaf's logits decide nothing here) -> (acceptable `[batch, T]` bool, log-probability of each
  token under its parent's distribution `[batch, T]`); root entries unused."""
  slots = tree.parent_slot
  if typical is None:
    ok = tokens == jnp.take_along_axis(jnp.argmax(internal_logits, axis=-1), slots, axis=1)
    return ok, jnp.zeros(tokens.shape, jnp.float32)
  parent_logits = jnp.take_along_axis(internal_logits, slots[..., None], axis=1)  # [b, T, V]
  probs = jax.nn.softmax(parent_logits / per_row(typical.temperature, parent_logits.ndim), axis=-1)
  p = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
  return p > typical_threshold(probs, typical), jnp.log(p + 1e-30)


def choose_path(ok: jax.Array, logp: jax.Array, tree: TreeArrays) -> tuple[jax.Array, jax.Array]:
  """Per-node acceptability `[batch, T]` -> (winning leaf path `[batch]`, accepted length `[batch]`
  in 0..depth). The accepted tokens are nodes `tree.retrieve[row, path, 1 : length + 1]`."""
  retrieve = tree.retrieve[:, :, 1:]  # [b, L, D]

  def per_path(x):  # node values `[b, T]` -> along each leaf's path `[b, L, D]`
    return jnp.take_along_axis(x, retrieve.reshape(x.shape[0], -1), axis=1).reshape(retrieve.shape)

  matches = per_path(ok) & tree.retrieve_mask[:, :, 1:]
  lengths = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1)  # [b, L]
  longest = jnp.max(lengths, axis=-1)
  in_prefix = jnp.arange(tree.depth)[None, None, :] < longest[:, None, None]
  score = jnp.sum(jnp.where(in_prefix, per_path(logp), 0.0), axis=-1)
  score = jnp.where(lengths == longest[:, None], score, -jnp.inf)
  return jnp.argmax(score, axis=-1).astype(jnp.int32), longest.astype(jnp.int32)


def typical_sample(logits: jax.Array, key: jax.Array, params: TypicalParams) -> jax.Array:
  """The next token in typical mode: sampled from softmax(logits / T) restricted to tokens above
  the typical threshold (the most likely token always stays). `[batch, vocab]` -> `[batch]`."""
  scaled = logits / per_row(params.temperature, logits.ndim)
  probs = jax.nn.softmax(scaled, axis=-1)
  keep = (probs > typical_threshold(probs, params)[..., None]) | (
      scaled == jnp.max(scaled, axis=-1, keepdims=True))
  return jax.random.categorical(key, jnp.where(keep, scaled, -jnp.inf), axis=-1).astype(jnp.int32)


Rule = TypicalParams | SamplingParams | None


def lossless_acceptance(tokens: jax.Array, internal_probs: jax.Array, uniform: jax.Array,
                        tree: TreeArrays) -> jax.Array:
  """tokens `[batch, T]`, probabilities at the tree's internal nodes `[batch, I, vocab]`, uniform
  draws `[batch, T]` -> `[batch, T]` bool: node n is the first of its siblings, in rank order, to
  pass its test `u_n < p(c_n) / (1 - p(earlier siblings))` (root entry unused)."""
  rows = jnp.arange(tokens.shape[0])[:, None]
  p = internal_probs[rows, tree.parent_slot, tokens]  # [b, T]
  earlier = tree.earlier_siblings  # [b, T, T]
  repeated = jnp.any(earlier & (tokens[:, :, None] == tokens[:, None, :]), axis=-1)
  p = jnp.where(repeated, 0.0, p)  # a token already tried here (heads' top-k never repeat one)
  left = 1.0 - jnp.sum(jnp.where(earlier, p[:, None, :], 0.0), axis=-1)  # mass the earlier ones left
  passed = (uniform * left < p) & (p > 0)  # u < p / left, without dividing by a vanishing `left`
  return passed & ~jnp.any(earlier & passed[:, None, :], axis=-1)


def draft_ratio_acceptance(tokens: jax.Array, internal_probs: jax.Array, draft_probs: jax.Array,
                           uniform: jax.Array, tree: TreeArrays) -> jax.Array:
  """tokens `[batch, T]` sampled from `draft_probs` `[batch, T, vocab]` (node n's q: the draft
  distribution it was drawn from), target probabilities at the internal nodes `[batch, I, vocab]`,
  uniform draws `[batch, T]` -> `[batch, T]` bool: u_n < p(c_n) / q(c_n) (root entry unused)."""
  rows = jnp.arange(tokens.shape[0])[:, None]
  p = internal_probs[rows, tree.parent_slot, tokens]
  q = jnp.take_along_axis(draft_probs, tokens[..., None], axis=-1)[..., 0]
  return uniform * q < p


def first_token(logits: jax.Array, key: jax.Array, rule: Rule) -> jax.Array:
  """The token after the prompt, as plain decoding draws it (typical: `typical_sample`).
  `[batch, vocab]` -> `[batch]`."""
  if isinstance(rule, TypicalParams):
    return typical_sample(logits, key, rule)
  return sample(logits, key, rule)


class Accepted(NamedTuple):
  """What `accept` keeps of a tree. The accepted tokens are the tree's at `path[:, 1 : count + 1]`."""

  path: jax.Array   # `[batch, depth + 1]` the kept path's nodes, root first
  count: jax.Array  # `[batch]` accepted nodes, 0..depth
  last: jax.Array   # `[batch, 1]` the last accepted node
  bonus: jax.Array  # `[batch]` the token drawn after it


def accept(tokens: jax.Array, logits: jax.Array, tree: Tree | TreeArrays, rule: Rule, key: jax.Array,
           draft_probs: jax.Array | None = None) -> Accepted:
  """tokens `[batch, T]`, the base model's logits at every node of `tree` (static, or per row)
  `[batch, T, vocab]` -> the kept path and the bonus token. `draft_probs` `[batch, T, vocab]`: the draft
  distributions a sampled chain's tokens were drawn from (lossless sampling only; a chain: one
  leaf)."""
  if not isinstance(rule, SamplingParams):
    draft_probs = None  # deterministic drafts: greedy and typical acceptance read only the tokens
  if isinstance(tree, Tree):
    tree = tree.arrays(tokens.shape[0])
  if draft_probs is not None and tree.retrieve.shape[1] != 1:
    raise ValueError("draft probabilities are verified along a chain, not a tree")
  internal = jnp.take(logits, tree.internal, axis=1)
  key_accept, key_bonus = jax.random.split(key)
  if isinstance(rule, SamplingParams):
    probs = jax.nn.softmax(sampling_logits(internal, rule), axis=-1)
    uniform = jax.random.uniform(key_accept, tokens.shape)
    ok = (lossless_acceptance(tokens, probs, uniform, tree) if draft_probs is None
          else draft_ratio_acceptance(tokens, probs, draft_probs, uniform, tree))
    logp = jnp.zeros(tokens.shape, jnp.float32)
  else:
    ok, logp = node_acceptance(tokens, internal, tree, rule)
  best, accepted = choose_path(ok, logp, tree)
  path = jnp.take_along_axis(tree.retrieve, best[:, None, None], axis=1)[:, 0]
  last = jnp.take_along_axis(path, accepted[:, None], axis=1)  # [b, 1]
  last_logits = jnp.take_along_axis(logits, last[:, :, None], axis=1)[:, 0]
  if not isinstance(rule, SamplingParams):
    return Accepted(path, accepted, last, first_token(last_logits, key_bonus, rule))
  children = tree.parents == last  # [b, T]
  vocab = last_logits.shape[-1]
  scaled = sampling_logits(last_logits, rule)
  if draft_probs is not None:  # the child was rejected: draw from max(0, p - q); at the leaf: p
    q = jnp.take_along_axis(draft_probs, jnp.argmax(children, axis=1)[:, None, None], axis=1)[:, 0]
    p = jax.nn.softmax(scaled, axis=-1)
    residual = jnp.where(jnp.any(children, axis=1, keepdims=True), jnp.maximum(p - q, 0.0), p)
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)  # p == q
    bonus = jax.random.categorical(key_bonus, jnp.log(residual), axis=-1)
    return Accepted(path, accepted, last, bonus.astype(jnp.int32))
  # every child of the last node was tried and rejected: draw from p without their tokens
  residual = scaled.at[jnp.arange(tokens.shape[0])[:, None], jnp.where(children, tokens, vocab)].set(
      -jnp.inf, mode="drop")
  # all of p on the children yet all rejected: only by rounding (~1e-7); draw from p then
  residual = jnp.where(jnp.any(residual > -jnp.inf, axis=-1, keepdims=True), residual, scaled)
  return Accepted(path, accepted, last, jax.random.categorical(key_bonus, residual, axis=-1).astype(jnp.int32))
