"""Grouped-query self-attention with RoPE, reading and writing the KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from medusa_jax.model.config import ModelConfig
from medusa_jax.model.rope import apply_rope, inverse_frequencies

_MASKED = -1e30


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q `[batch, T, heads, head_dim]`, k/v `[batch, S, kv_heads, head_dim]`, mask `[batch, T, S]` bool
  -> `[batch, T, heads, head_dim]`. Scores and softmax in float32."""
  kv_heads = k.shape[2]
  q = rearrange(q, "b t (k g) d -> b t k g d", k=kv_heads)
  # [b, t, k, g, s] keeps the cache's [b, s, k, d] layout: no transpose of the cache per step.
  scores = jnp.einsum("btkgd,bskd->btkgs", q, k, preferred_element_type=jnp.float32)
  scores = scores * (q.shape[-1] ** -0.5)
  scores = jnp.where(mask[:, :, None, None, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("btkgs,bskd->btkgd", probs, v)
  return rearrange(out, "b t k g d -> b t (k g) d")


class Attention(nnx.Module):
  """Llama attention: q/k/v projections `[in_features, heads, head_dim]` (`in_features`: the
  hidden size unless given, e.g. an EAGLE-3 drafter's `2 * embed`), the output projection back to
  the hidden size, optional q/k/v bias (Qwen2)."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs,
               in_features: int | None = None):
    e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    i = in_features or e

    def param(shape, axes):
      return nnx.Param((0.02 * jax.random.normal(rngs.params(), shape)).astype(param_dtype), axes=axes)

    self.q = param((i, h, d), ("embed", "q_heads", "head_dim"))
    self.k = param((i, kv, d), ("embed", "kv_heads", "head_dim"))
    self.v = param((i, kv, d), ("embed", "kv_heads", "head_dim"))
    self.o = param((h, d, e), ("q_heads", "head_dim", "embed"))
    if config.attention_bias:
      self.q_bias = nnx.Param(jnp.zeros((h, d), param_dtype), axes=("q_heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((kv, d), param_dtype), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((kv, d), param_dtype), axes=("kv_heads", "head_dim"))
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.config = config
    self.dtype = dtype

  def _project(self, x, kernel, bias):
    y = jnp.einsum("bte,ehd->bthd", x, kernel[...].astype(self.dtype))
    return y if bias is None else y + bias[...].astype(self.dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, write=None):
    """x `[batch, T, embed]`, positions `[batch, T]`, mask `[batch, T, S]`.

    Without a cache (`write is None`) the chunk attends to itself (S = T). With one, `write(k, v)`
    stores the chunk's K/V and returns the layer's full buffers `[rows, S, kv_heads, head_dim]`
    (rows >= batch: the batch is their first rows).
    Returns (`[batch, T, embed]`, the layer's K/V buffers or None).
    """
    x = x.astype(self.dtype)
    inv_freq = inverse_frequencies(self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
    q = apply_rope(self._project(x, self.q, self.q_bias), positions, inv_freq)
    k = apply_rope(self._project(x, self.k, self.k_bias), positions, inv_freq)
    v = self._project(x, self.v, self.v_bias)
    kv = (k, v) if write is None else write(k, v)
    # A cache may hold more rows than this batch (a server's slots) and more positions than the
    # mask attends (its span): attend to the first rows and positions only.
    b, span = q.shape[0], mask.shape[-1]
    out = dot_product_attention(q, kv[0][:b, :span], kv[1][:b, :span], mask)
    # One [b, t, h*d] x [h*d, e] matmul: with an einsum over (h, d) XLA:CPU copies the weight
    # transposed on every call that no loop hoists it out of (e.g. a single jitted decode step).
    h, d, e = self.o.shape
    y = jnp.dot(out.reshape(out.shape[:2] + (h * d,)), self.o[...].astype(self.dtype).reshape(h * d, e))
    return y, (None if write is None else kv)
