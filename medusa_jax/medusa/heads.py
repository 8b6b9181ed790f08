"""Drafting heads: head k guesses the token at t + k + 2 from the base model's final hidden state
h_t at position t (the base lm_head predicts t + 1, the root of each step's tree).

- `MedusaHeads` (`head_type="medusa"`): head k reads h_t alone. Head = `num_layers` ResBlocks (each
  with its own weights; `y = x + SiLU(W x + b)`, W and b zero at start so the head starts as the
  identity), then a vocab projection: its own `lm_head` (initialised from the base lm_head), or the
  frozen base lm_head itself with `share_lm_head=True`.
- `HydraHeads` (`head_type="hydra"`, as in Hydra / ReDrafter): heads are sequentially dependent.
  Head k reads h_t, the previous head's features s_k (s_0 = h_t) and the embedding of the token at
  t + k + 1 (the root for head 0, then the drafted tokens of the path): `s_{k+1} =
  ResBlocks_k(W_k [h_t; s_k; rms(E(x_{t+k+1}))])`. W_k starts as `[I; 0; 0]`, so fresh Hydra heads
  are Medusa heads, and trained Medusa heads can start them. A tree's children depend on their
  path, so candidates are drafted depth by depth (`draft_tree`).

Both draft a tree's tokens with `draft_tree` and give teacher-forced features for training with
`hidden`; the vocab projection runs over the whole vocabulary or a drafting vocabulary
(`draft_vocab.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.errors import MedusaError
from medusa_jax.model.layers import Linear
from medusa_jax.model.llama import Llama


def shift_left(x: jax.Array, shift: int) -> jax.Array:
  """`x[:, t + shift]` at position t (zeros past the end); x `[batch, seq, ...]`."""
  return jnp.pad(x[:, shift:], [(0, 0), (0, shift)] + [(0, 0)] * (x.ndim - 2))


def head_targets(tokens: jax.Array, mask: jax.Array, num_heads: int,
                 first_shift: int = 2) -> tuple[jax.Array, jax.Array]:
  """Head k at position t predicts `tokens[t + k + first_shift]` (2 for Medusa heads, 1 for the
  base lm_head), valid where `mask` holds there (e.g. an assistant token). tokens/mask
  `[batch, seq]` -> (targets, valid), each `[batch, seq, num_heads]`."""
  shifts = range(first_shift, first_shift + num_heads)
  return (jnp.stack([shift_left(tokens, s) for s in shifts], -1),
          jnp.stack([shift_left(mask, s) for s in shifts], -1))


HEAD_TYPES = ("medusa", "hydra", "eagle")  # eagle: `medusa/eagle.py`


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  num_heads: int = 4
  num_layers: int = 1
  share_lm_head: bool = True
  head_type: str = "medusa"  # one of HEAD_TYPES

  def __post_init__(self):
    if self.head_type not in ("medusa", "hydra"):
      raise MedusaError(f"unknown Medusa head type {self.head_type!r}; use medusa or hydra (an eagle "
                        "drafter is an `EagleHead`)")


class ResBlock(nnx.Module):
  """`y = x + SiLU(x W + b)`; W `[embed, embed]` and b start at zero (identity)."""

  def __init__(self, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.linear = Linear(features, features, ("embed", "mlp"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, init_std=0.0, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x + jax.nn.silu(self.linear(x))


class MedusaHeads(nnx.Module):
  """`num_heads` heads over hidden states `[..., embed]`."""

  def __init__(self, config: HeadsConfig, hidden_size: int, vocab_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        nnx.List([ResBlock(hidden_size, **kw) for _ in range(config.num_layers)])
        for _ in range(config.num_heads)
    ])
    self.lm_heads = None if config.share_lm_head else nnx.List([
        Linear(hidden_size, vocab_size, ("embed", "vocab"), **kw) for _ in range(config.num_heads)
    ])

  @staticmethod
  def for_model(model: Llama, config: HeadsConfig, *, seed: int = 0,
                param_dtype=None) -> "MedusaHeads":
    """Fresh heads of `config.head_type` for `model`: identity ResBlocks, per-head lm_heads copied
    from the base one."""
    cls = HydraHeads if config.head_type == "hydra" else MedusaHeads
    heads = cls(config, model.config.hidden_size, model.config.vocab_size, dtype=model.dtype,
                param_dtype=param_dtype or model.dtype, rngs=nnx.Rngs(seed))
    if heads.lm_heads is not None:
      base = model.lm_head_kernel()
      for lm in heads.lm_heads:
        lm.kernel[...] = base.astype(lm.kernel[...].dtype)
    return heads

  def _blocks(self, k: int, x: jax.Array) -> jax.Array:
    for block in self.blocks[k]:
      x = block(x)
    return x

  def hidden(self, h: jax.Array, num_heads: int | None = None, *, path: jax.Array | None = None,
             base: Llama | None = None) -> jax.Array:
    """`[..., embed]` -> the first `num_heads` (default all) heads' features before their vocab
    projection `[num_heads, ..., embed]`. `path` `[..., num_heads]`: the tokens at t + 1, t + 2,
    ... (teacher forcing; Medusa heads do not read them, Hydra heads need them and `base`)."""
    return jnp.stack([self._blocks(k, h) for k in range(len(self.blocks[:num_heads]))])

  def project(self, k: int, x: jax.Array, base: Llama) -> jax.Array:
    """Head `k`'s float32 logits `[..., vocab]` from its features `x` `[..., embed]`."""
    if self.lm_heads is None:
      return base.logits(x)
    return self.lm_heads[k](x).astype(jnp.float32)

  def logits(self, feats: jax.Array, base: Llama) -> jax.Array:
    """Heads' features `[num_heads, ..., embed]` -> their float32 logits `[num_heads, ..., vocab]`
    (one vocab matmul for all of them with a shared lm_head)."""
    if self.lm_heads is None:
      return base.logits(feats)
    return jnp.stack([self.project(k, feats[k], base) for k in range(len(feats))])

  def top_tokens(self, k: int, x: jax.Array, base: Llama, draft, topk: int,
                 log_probs: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Head `k`'s top-`topk` token ids `[..., topk]` from its features `x` `[..., embed]`, over
    the drafting vocabulary `draft` (a `DraftVocab`; None: the whole vocabulary); with
    `log_probs`, (their log-probabilities there, the ids)."""
    logits = self.project(k, x, base) if draft is None else draft.project(k, x)
    values, top = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1) if log_probs else logits, topk)
    ids = (top if draft is None else jnp.take(draft.ids, top)).astype(jnp.int32)
    return (values, ids) if log_probs else ids

  def beam_features(self, k: int, h: jax.Array, state: jax.Array, tokens: jax.Array,
                    base: Llama) -> jax.Array:
    """Head `k`'s features for beams whose previous head features are `state` `[batch, W, embed]`
    and whose last tokens are `tokens` `[batch, W]`, from h_t `[batch, embed]`: Medusa heads read
    h_t alone, so one row serves every beam (`[batch, 1, embed]`)."""
    return self._blocks(k, h)[:, None]

  def draft_tree(self, base: Llama, h: jax.Array, root: jax.Array, tree, draft) -> jax.Array:
    """The `tree`'s tokens `[batch, T]` (a `Tree`; node 0 is `root` `[batch]`) from the heads'
    guesses at the hidden states `h` `[batch, embed]` of the position before the root: head k's
    rank-r guess fills the nodes whose path ends in r at depth k + 1."""
    top = jnp.stack([self.top_tokens(k, f, base, draft, tree.topk)
                     for k, f in enumerate(self.hidden(h, tree.depth))], axis=1)  # [b, D, topk]
    flat = jnp.concatenate([root[:, None], top.reshape(top.shape[0], -1)], axis=1)
    return jnp.take(flat, jnp.asarray(tree.candidate_index), axis=1)

  def __call__(self, h: jax.Array, base: Llama, num_heads: int | None = None, *,
               path: jax.Array | None = None) -> jax.Array:
    """`[..., embed]` -> the first `num_heads` (default all) heads' float32 logits
    `[num_heads, ..., vocab]` (`path` as in `hidden`)."""
    return self.logits(self.hidden(h, num_heads, path=path, base=base), base)


def _unit_rms(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


class HydraHeads(MedusaHeads):
  """Sequentially dependent heads (module docstring): head k reads the features of head k - 1
  (h_t for head 0) and the embedding of the token at t + k + 1."""

  def __init__(self, config: HeadsConfig, hidden_size: int, vocab_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(config, hidden_size, vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kernel = jnp.concatenate([jnp.eye(hidden_size), jnp.zeros((2 * hidden_size, hidden_size))])
    self.inputs = nnx.List([Linear(3 * hidden_size, hidden_size, ("mlp", "embed"), dtype=dtype,
                                   param_dtype=param_dtype, init_std=0.0, rngs=rngs)
                            for _ in range(config.num_heads)])
    for linear in self.inputs:
      linear.kernel[...] = kernel.astype(param_dtype)

  def step(self, k: int, h: jax.Array, state: jax.Array, token: jax.Array, base: Llama) -> jax.Array:
    """Head k's features `[..., embed]` from h_t and the previous head's features (h_t for k = 0)
    `state`, each `[..., embed]`, and the token `[...]` at t + k + 1."""
    emb = _unit_rms(base.embed(token)).astype(state.dtype)
    return self._blocks(k, self.inputs[k](jnp.concatenate([h, state, emb], axis=-1)))

  def beam_features(self, k: int, h: jax.Array, state: jax.Array, tokens: jax.Array,
                    base: Llama) -> jax.Array:
    return self.step(k, jnp.broadcast_to(h[:, None], state.shape), state, tokens, base)

  def hidden(self, h: jax.Array, num_heads: int | None = None, *, path: jax.Array | None = None,
             base: Llama | None = None) -> jax.Array:
    if path is None or base is None:
      raise MedusaError("Hydra heads read the path's tokens: pass path= and base=")
    outs, state = [], h
    for k in range(len(self.blocks[:num_heads])):
      state = self.step(k, h, state, path[..., k], base)
      outs.append(state)
    return jnp.stack(outs)

  def draft_tree(self, base: Llama, h: jax.Array, root: jax.Array, tree, draft) -> jax.Array:
    """As `MedusaHeads.draft_tree`, depth by depth: the heads run once per node with children,
    on its path's state and token, and their top-k fill its children."""
    parents, depths = np.asarray(tree.parents), np.asarray(tree.depths)
    ranks = np.asarray([0] + [p[-1] for p in tree.paths])
    tokens = jnp.zeros((root.shape[0], tree.size), jnp.int32).at[:, 0].set(root)
    states, level = h[:, None], np.asarray([0])  # features of the previous level's parents
    for d in range(tree.depth):
      nodes = np.asarray([n for n in tree.internal if depths[n] == d])
      prev = states[:, np.searchsorted(level, parents[nodes])] if d else states
      states = self.step(d, jnp.broadcast_to(h[:, None], prev.shape[:2] + h.shape[-1:]), prev,
                         tokens[:, nodes], base)  # [b, n, e]
      top = self.top_tokens(d, states, base, draft, tree.topk)  # [b, n, topk]
      children = np.nonzero(depths == d + 1)[0]
      tokens = tokens.at[:, children].set(top[:, np.searchsorted(nodes, parents[children]), ranks[children]])
      level = nodes
    return tokens
