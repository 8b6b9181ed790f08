"""The Llama-family backbone in Flax NNX: decoder blocks over per-layer weights, final norm, lm_head."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.model.attention import Attention
from medusa_jax.model.config import ModelConfig
from medusa_jax.model.kv_cache import KVCache, attention_mask
from medusa_jax.model.layers import MLP, Embed, Linear, RMSNorm


class Forward(NamedTuple):
  hidden: jax.Array          # `[batch, T, embed]` after the final norm
  cache: KVCache | None      # with the chunk's K/V written (lengths unchanged)
  taps: jax.Array | None     # `[batch, T, len(taps) * embed]` the tapped layers' inputs


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
    self.attn = Attention(config, rngs=rngs, **kw)
    self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
    self.mlp = MLP(config.hidden_size, config.intermediate_size, rngs=rngs, **kw)

  def __call__(self, x, positions, mask, write=None):
    h, kv = self.attn(self.attn_norm(x), positions, mask, write=write)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv


def causal_mask(t: int) -> jax.Array:
  """`[t, t]` lower-triangular bool mask."""
  return jnp.asarray(np.tril(np.ones((t, t), bool)))


class Llama(nnx.Module):
  """Llama-family decoder. Layers are separate modules (per-layer arrays): a batch-1 decode step
  reads each weight once, with no slicing of stacked arrays inside the jitted loop."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.dtype = dtype
    self.embed = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
    self.layers = nnx.List([Block(config, rngs=rngs, **kw) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
    self.lm_head = (
        None if config.tie_embeddings
        else Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs=rngs, **kw)
    )

  def hidden_states(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                    chunk_mask: jax.Array | None = None,
                    num_layers: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens, positions `[batch, T]` -> final-norm hidden states `[batch, T, embed]` and the cache
    (`forward` without taps)."""
    out = self.forward(tokens, positions, cache, chunk_mask, num_layers)
    return out.hidden, out.cache

  def forward(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
              chunk_mask: jax.Array | None = None, num_layers: int | None = None,
              taps: tuple[int, ...] = ()) -> Forward:
    """tokens, positions `[batch, T]` -> final-norm hidden states `[batch, T, embed]`, the cache,
    and the residual stream entering each layer of `taps` (`len(layers)`: the last layer's output,
    before the final norm), concatenated `[batch, T, len(taps) * embed]` (an EAGLE-3 drafter's
    input; None without taps).

    With a cache, the chunk's K/V are written at `cache.lengths` and it attends to the cached
    prefix plus itself under `chunk_mask` `[T, T]` or `[batch, T, T]` (causal by default; a tree
    mask for Medusa).
    `cache.lengths` is left unchanged. `num_layers`: run only the first layers (then the final
    norm), as a self-drafting model does; the cache holds that many layers.
    """
    t = tokens.shape[1]
    chunk_mask = causal_mask(t) if chunk_mask is None else chunk_mask
    x = self.embed(tokens)
    if cache is None:
      mask = jnp.broadcast_to(chunk_mask, (tokens.shape[0], t, t))
    else:
      mask = attention_mask(cache.lengths, chunk_mask, cache.attended)
    tapped, keys, values = {}, [], []
    for i, block in enumerate(self.layers[:num_layers]):
      if i in taps:
        tapped[i] = x
      write = None if cache is None else (lambda k, v, i=i: cache.write(i, k, v))
      x, kv = block(x, positions, mask, write=write)
      if cache is not None:
        keys.append(kv[0])
        values.append(kv[1])
    tapped[len(self.layers[:num_layers])] = x
    features = jnp.concatenate([tapped[i] for i in taps], axis=-1) if taps else None
    if cache is not None:
      cache = dataclasses.replace(cache, keys=tuple(keys), values=tuple(values))
    return Forward(self.norm(x), cache, features)

  def lm_head_kernel(self) -> jax.Array:
    """The output projection `[embed, vocab]`: the tied embedding table transposed, or the lm_head."""
    return self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """`[..., embed]` -> float32 logits `[..., vocab]`."""
    out = self.embed.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return out.astype(jnp.float32)

  def __call__(self, tokens, positions, cache=None, chunk_mask=None, num_layers=None):
    """Returns (logits `[batch, T, vocab]`, hidden `[batch, T, embed]`, cache)."""
    hidden, cache = self.hidden_states(tokens, positions, cache, chunk_mask, num_layers)
    return self.logits(hidden), hidden, cache
