"""An EAGLE-3-style drafter (`head_type="eagle"`): one decoder layer that drafts from the target's
own features, with its own attention over every earlier position (its own small KV cache).

At target position t the drafter reads the target's residual stream entering three layers (low,
middle, high: `taps`, `[..., 3 * embed]`), fused by `fc` to `embed`, and the embedding of the next
token x_{t+1} (the frozen base embedding). Its layer (RMSNorms on both inputs, attention over their
concatenation `[..., 2 * embed]` with RoPE at position t, SwiGLU MLP) gives an output o_t whose
final norm and `lm_head` (over the drafting vocabulary's ids, `draft_vocab.json`) predict x_{t+2}.
Drafting deeper feeds o_t back in place of the fused features at t + 1, with the drafted token.

Training (`training/losses.eagle_loss`) unrolls that feedback ("training-time test", EAGLE-3):
at step j the entry at t reads step j - 1's output at t - 1, and attends to the real entries up to
t - j and to its own chain of drafted entries (`ttt_mask`), exactly the keys it sees when it drafts
j levels past the accepted prefix. Decoding (`decode/drafters.EagleDrafter`) grows a tree per step
as EAGLE-2 does (`expand`, `medusa/dynamic_tree.ranked_tree`).

Where this differs from the EAGLE-3 reference: the drafting vocabulary is a list of token ids (a
`d2t` offset table in the reference; `formats/eagle.py` converts), and the layer's residual is the
fused features before their norm, as in the reference's default.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.errors import MedusaError
from medusa_jax.model.attention import Attention
from medusa_jax.model.config import ModelConfig
from medusa_jax.model.kv_cache import KVCache, attention_mask
from medusa_jax.model.layers import MLP, Linear, RMSNorm
from medusa_jax.model.llama import Llama, causal_mask


def default_taps(num_layers: int) -> tuple[int, ...]:
  """EAGLE-3's layers for a target of `num_layers`: the inputs of layers 2, L // 2 and L - 3
  (clipped to the model's layers for tiny ones), ascending (the order vLLM concatenates them in)."""
  return tuple(sorted(min(max(i, 0), num_layers) for i in (2, num_layers // 2, num_layers - 3)))


@dataclasses.dataclass(frozen=True)
class EagleConfig:
  """The drafter's shape and its default tree: each step `width` (k) beams expanded `depth` (D)
  levels deep, the best `budget` (N) nodes verified (EAGLE-2)."""

  taps: tuple[int, ...]
  draft_vocab_size: int
  width: int = 4
  depth: int = 4
  budget: int = 16

  head_type = "eagle"  # beside `HeadsConfig.head_type`'s medusa and hydra

  def __post_init__(self):
    if not self.taps or min(self.taps) < 0:
      raise MedusaError(f"an EAGLE drafter reads one or more target layers, got taps {self.taps}")
    if min(self.width, self.depth, self.budget) < 1:
      raise MedusaError(f"EAGLE tree settings must be >= 1, got width {self.width} depth {self.depth} "
                        f"budget {self.budget}")


class Drafted(NamedTuple):
  """The candidates of one step's expansion, in pool order (a parent before its children)."""

  tokens: jax.Array   # `[batch, P]` token ids
  parents: jax.Array  # `[batch, P]` the parent's pool index (-1: the root)
  scores: jax.Array   # `[batch, P]` summed log-probabilities along the path
  depths: np.ndarray  # `[P]` 1..D (static)


class EagleHead(nnx.Module):
  """The drafter's weights (module docstring): `fc` `[len(taps) * embed, embed]`, one decoder layer
  over `[embed ; fused]`, final norm, `lm_head` `[embed, draft_vocab_size]`."""

  def __init__(self, config: EagleConfig, base: ModelConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    e = base.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.config = config
    self.base_config = dataclasses.replace(base, num_layers=1)  # the drafter's KV cache: one layer
    self.fc = Linear(len(config.taps) * e, e, ("mlp", "embed"), rngs=rngs, **kw)
    self.input_norm = RMSNorm(e, eps=base.rms_norm_eps, **kw)
    self.hidden_norm = RMSNorm(e, eps=base.rms_norm_eps, **kw)
    self.attn = Attention(base, in_features=2 * e, rngs=rngs, **kw)
    self.mlp_norm = RMSNorm(e, eps=base.rms_norm_eps, **kw)
    self.mlp = MLP(e, base.intermediate_size, rngs=rngs, **kw)
    self.norm = RMSNorm(e, eps=base.rms_norm_eps, **kw)
    self.lm_head = Linear(e, config.draft_vocab_size, ("embed", "vocab"), rngs=rngs, **kw)

  @staticmethod
  def for_model(model: Llama, config: EagleConfig, ids: np.ndarray, *, seed: int = 0,
                param_dtype=None) -> EagleHead:
    """A fresh drafter for `model`, its `lm_head` and final norm started from the base model's
    (the `ids` columns), its MLP from the base's last layer."""
    if max(config.taps) > model.config.num_layers:
      raise MedusaError(f"EAGLE taps {config.taps} name layers past the model's {model.config.num_layers}")
    head = EagleHead(config, model.config, dtype=model.dtype, param_dtype=param_dtype or model.dtype,
                     rngs=nnx.Rngs(seed))
    dtype = head.lm_head.kernel[...].dtype
    head.lm_head.kernel[...] = jnp.take(model.lm_head_kernel(), jnp.asarray(ids), axis=1).astype(dtype)
    head.norm.scale[...] = model.norm.scale[...].astype(dtype)
    last = model.layers[-1].mlp
    for name in ("gate", "up", "down"):
      getattr(head.mlp, name).kernel[...] = getattr(last, name).kernel[...].astype(dtype)
    return head

  def fuse(self, taps: jax.Array) -> jax.Array:
    """The target's tapped features `[..., len(taps) * embed]` -> `[..., embed]`."""
    return self.fc(taps)

  def layer(self, feats: jax.Array, embedded: jax.Array, positions: jax.Array, mask: jax.Array,
            write=None) -> tuple[jax.Array, tuple | None]:
    """One decoder layer over entries `[batch, T]`: features `feats` (fused, or the previous
    output) and the embedded next tokens `embedded`, each `[batch, T, embed]`, at `positions`;
    `mask`/`write` as `Attention` takes them. Returns (outputs `[batch, T, embed]`, K/V buffers)."""
    x = jnp.concatenate([self.input_norm(embedded), self.hidden_norm(feats)], axis=-1)
    h, kv = self.attn(x, positions, mask, write=write)
    h = feats.astype(h.dtype) + h
    return h + self.mlp(self.mlp_norm(h)), kv

  def logits(self, out: jax.Array) -> jax.Array:
    """Outputs `[..., embed]` -> float32 logits over the drafting vocabulary `[..., Vd]`."""
    return self.lm_head(self.norm(out)).astype(jnp.float32)

  def empty_cache(self, rows: int, max_len: int, dtype, mesh) -> KVCache:
    return KVCache.init(self.base_config, rows, max_len, dtype, mesh)

  def chunk(self, base: Llama, feats: jax.Array, tokens: jax.Array, cache: KVCache,
            span: int | None = None) -> tuple[jax.Array, KVCache]:
    """Entries `[batch, T]` written at `cache.lengths` (causal, after the cached prefix): their
    features `[batch, T, embed]` (fused taps, or earlier outputs) and next tokens `[batch, T]`.
    Returns the outputs `[batch, T, embed]` and the cache with their K/V written (lengths
    unchanged). `span`: attend only to the first positions (a prefill of `span` tokens)."""
    t = tokens.shape[1]
    own = cache if span is None else dataclasses.replace(cache, span=span)
    positions = cache.lengths[:, None] + jnp.arange(t)[None, :]
    mask = attention_mask(cache.lengths, causal_mask(t), own.attended)
    out, (k, v) = self.layer(feats, base.embed(tokens), positions, mask,
                             write=lambda k, v: cache.write(0, k, v))
    return out, dataclasses.replace(cache, keys=(k,), values=(v,))

  def expand(self, base: Llama, out: jax.Array, cache: KVCache, ids: jax.Array, width: int,
             depth: int) -> Drafted:
    """EAGLE-2's expansion from the output `out` `[batch, embed]` of the root's entry (the last
    cached one, `cache.lengths` - 1): the root's top-`width` children, then `depth` - 1 times the
    top-`width` children of each of the `width` best nodes of the last level (by summed
    log-probability). Every node's entry attends to the cache and to its own ancestors' entries.
    Returns the `width + (depth - 1) * width**2` candidates."""
    batch, e = out.shape
    span = cache.attended
    logp, cols = jax.lax.top_k(jax.nn.log_softmax(self.logits(out), axis=-1), width)  # [b, k]
    tokens, parents, scores = [jnp.take(ids, cols)], [jnp.full((batch, width), -1, jnp.int32)], [logp]
    beam_tokens, beam_scores = tokens[0], logp
    beam_feats = jnp.broadcast_to(out[:, None], (batch, width, e))
    beam_pool = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    slots = (depth - 1) * width
    kv_shape = (batch, slots) + cache.keys[0].shape[2:]
    scratch_k = jnp.zeros(kv_shape, cache.keys[0].dtype)
    scratch_v = jnp.zeros(kv_shape, cache.values[0].dtype)
    ancestors = jnp.zeros((batch, width, slots), bool)
    in_cache = (jnp.arange(span)[None, :] < cache.lengths[:, None])[:, None, :]  # [b, 1, S]
    offset = width
    for level in range(1, depth):
      own = jnp.arange((level - 1) * width, level * width)
      ancestors = ancestors.at[:, jnp.arange(width), own].set(True)
      mask = jnp.concatenate([jnp.broadcast_to(in_cache, (batch, width, span)), ancestors], axis=-1)
      positions = jnp.broadcast_to(cache.lengths[:, None] + level - 1, (batch, width))

      def write(k, v, own=own):
        k_all = jnp.concatenate([cache.keys[0][:batch, :span], scratch_k.at[:, own].set(k)], axis=1)
        v_all = jnp.concatenate([cache.values[0][:batch, :span], scratch_v.at[:, own].set(v)], axis=1)
        return k_all, v_all

      level_out, (k_all, v_all) = self.layer(beam_feats, base.embed(beam_tokens), positions, mask, write)
      scratch_k, scratch_v = k_all[:, span:], v_all[:, span:]
      lp, cols = jax.lax.top_k(jax.nn.log_softmax(self.logits(level_out), axis=-1), width)  # [b, k, k]
      child_scores = (beam_scores[:, :, None] + lp).reshape(batch, -1)
      child_tokens = jnp.take(ids, cols).reshape(batch, -1)
      tokens.append(child_tokens)
      parents.append(jnp.repeat(beam_pool, width, axis=1))
      scores.append(child_scores)
      beam_scores, best = jax.lax.top_k(child_scores, width)
      parent = best // width  # [b, k] the beam each new beam grows from
      beam_tokens = jnp.take_along_axis(child_tokens, best, axis=1)
      beam_feats = jnp.take_along_axis(level_out, parent[:, :, None], axis=1)
      ancestors = jnp.take_along_axis(ancestors, parent[:, :, None], axis=1)
      beam_pool = (offset + best).astype(jnp.int32)
      offset += width * width
    depths = np.concatenate([np.full(width, 1)] + [np.full(width * width, d + 1) for d in range(1, depth)])
    return Drafted(jnp.concatenate(tokens, axis=1).astype(jnp.int32), jnp.concatenate(parents, axis=1),
                   jnp.concatenate(scores, axis=1), depths)


def ttt_mask(seq: int, step: int) -> np.ndarray:
  """Training-time test's mask `[seq, (step + 1) * seq]` for step `step`'s queries over the keys of
  steps 0..step (concatenated): the entry at t sees step 0's real entries up to t - step and step
  i's entry at t - step + i (its own chain of drafted entries, itself last)."""
  t = np.arange(seq)[:, None]
  s = np.arange(seq)[None, :]
  blocks = [s <= t - step] + [s == t - step + i for i in range(1, step + 1)]
  return np.concatenate(blocks, axis=1)


def ttt_outputs(head: EagleHead, base: Llama, taps: jax.Array, tokens: jax.Array, steps: int) -> jax.Array:
  """Training-time test: the drafter's outputs `[steps, batch, seq, embed]` over sequences, from
  the target's taps `[batch, seq, len(taps) * embed]` and tokens `[batch, seq]`. Step j's entry at
  t reads the token x_{t+1} and step j - 1's output at t - 1 (step 0: the fused taps at t), and its
  logits predict x_{t+2}; it stands for drafting j levels past an accepted prefix ending at t - j."""
  b, seq = tokens.shape
  embedded = base.embed(jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1))
  positions = jnp.broadcast_to(jnp.arange(seq), (b, seq))
  feats = head.fuse(taps)
  keys, values, outs = [], [], []
  for step in range(steps):
    mask = jnp.broadcast_to(jnp.asarray(ttt_mask(seq, step)), (b, seq, (step + 1) * seq))

    def write(k, v):
      keys.append(k)
      values.append(v)
      return jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)

    out, _ = head.layer(feats, embedded, positions, mask, write)
    outs.append(out)
    feats = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
  return jnp.stack(outs)
