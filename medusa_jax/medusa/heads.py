"""Medusa heads: head k reads the base model's final hidden state at position t and predicts the
token at t + k + 2 (the base lm_head predicts t + 1).

head = `num_layers` ResBlocks (each with its own weights; `y = x + SiLU(W x + b)`, W and b zero at
start so the head starts as the identity), then a vocab projection: its own `lm_head` (initialised
from the base lm_head), or the frozen base lm_head itself with `share_lm_head=True`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

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


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
  num_heads: int = 4
  num_layers: int = 1
  share_lm_head: bool = True


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

  @classmethod
  def for_model(cls, model: Llama, config: HeadsConfig, *, seed: int = 0,
                param_dtype=None) -> "MedusaHeads":
    """Fresh heads for `model`: identity ResBlocks, per-head lm_heads copied from the base one."""
    heads = cls(config, model.config.hidden_size, model.config.vocab_size, dtype=model.dtype,
                param_dtype=param_dtype or model.dtype, rngs=nnx.Rngs(seed))
    if heads.lm_heads is not None:
      base = model.lm_head_kernel()
      for lm in heads.lm_heads:
        lm.kernel[...] = base.astype(lm.kernel[...].dtype)
    return heads

  def hidden(self, h: jax.Array, num_heads: int | None = None) -> jax.Array:
    """`[..., embed]` -> the first `num_heads` (default all) heads' features before their vocab
    projection `[num_heads, ..., embed]`."""
    outs = []
    for blocks in self.blocks[:num_heads]:
      x = h
      for block in blocks:
        x = block(x)
      outs.append(x)
    return jnp.stack(outs)

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

  def __call__(self, h: jax.Array, base: Llama, num_heads: int | None = None) -> jax.Array:
    """`[..., embed]` -> the first `num_heads` (default all) heads' float32 logits
    `[num_heads, ..., vocab]`."""
    return self.logits(self.hidden(h, num_heads), base)
