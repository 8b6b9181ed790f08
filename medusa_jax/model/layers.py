"""Basic NNX layers with logical axis names on every parameter: Linear, Embed, RMSNorm, SwiGLU MLP."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DType = jnp.dtype | type


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel `[in, out]` with logical `axes`."""

  def __init__(self, in_features: int, out_features: int, axes: Sequence[str | None], *,
               use_bias: bool = False, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        (init_std * jax.random.normal(rngs.params(), (in_features, out_features))).astype(param_dtype),
        axes=tuple(axes),
    )
    self.bias = (
        nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[-1],)) if use_bias else None
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `[vocab, embed]`; `attend` uses it as a tied output projection."""

  def __init__(self, vocab_size: int, features: int, *, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.embedding = nnx.Param(
        (0.02 * jax.random.normal(rngs.params(), (vocab_size, features))).astype(param_dtype),
        axes=("vocab", "embed"),
    )
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """`[batch, seq]` int -> `[batch, seq, embed]`."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`[..., embed]` -> logits `[..., vocab]`."""
    return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32."""

  def __init__(self, features: int, *, eps: float, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=("embed",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, features: int, hidden: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Linear(features, hidden, ("embed", "mlp"), **kw)
    self.up = Linear(features, hidden, ("embed", "mlp"), **kw)
    self.down = Linear(hidden, features, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
