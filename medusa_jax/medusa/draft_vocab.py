"""The heads' drafting vocabulary: the token ids Medusa heads may propose.

A head's guess counts only when the base model emits the same token, and a model's answers use a
small part of its vocabulary (SmolLM2's self-distilled answers: 8,192 of 49,152 ids cover 96.8%
of held-out answer tokens). Projecting the heads' features onto those ids alone makes the heads'
vocab matmul `vocab / Vd` times cheaper, and top-k runs over `Vd` logits. Outputs do not change:
the base model checks every guess against its full-vocabulary logits, so greedy Medusa stays
identical to greedy decoding; only a guess outside the set is lost.

On disk, `draft_vocab.json` beside the heads: `{"ids": [...]}` most frequent first, plus how many
answer tokens were counted. Medusa, TGI and vLLM ignore the file; without it heads use the whole
vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.atomic import write_text
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import DRAFT_VOCAB_SIZE
from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.model.llama import Llama

FILE = "draft_vocab.json"
DEFAULT_SIZE = DRAFT_VOCAB_SIZE  # ids the heads guess among unless told otherwise (defined without JAX)


def rank_by_frequency(token_lists: Iterable[Sequence[int]]) -> tuple[np.ndarray, int]:
  """Token ids seen in `token_lists`, most frequent first (ties: smaller id first), and the count
  of tokens seen."""
  counts: collections.Counter = collections.Counter()
  for tokens in token_lists:
    counts.update(int(t) for t in tokens)
  ranked = sorted(counts, key=lambda t: (-counts[t], t))
  return np.asarray(ranked, np.int32), sum(counts.values())


def save(heads_dir: str, ids: np.ndarray, tokens_counted: int | None = None) -> None:
  """Writes `heads_dir/draft_vocab.json` (atomically)."""
  content = {"ids": [int(i) for i in ids]}
  if tokens_counted is not None:
    content["tokens_counted"] = int(tokens_counted)
  write_text(os.path.join(heads_dir, FILE), json.dumps(content))


def read(heads_dir: str | None, size: int | None) -> np.ndarray | None:
  """The `size` most frequent ids of `heads_dir`'s drafting vocabulary (all of them when `size` is
  None); None when the directory has no `draft_vocab.json` or `size` is 0 (whole vocabulary)."""
  if size is not None and size < 0:
    raise MedusaError(f"drafting vocabulary size must be >= 0 (0: the whole vocabulary), got {size}")
  path = os.path.join(heads_dir, FILE) if heads_dir else ""
  if size == 0 or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      ids = np.asarray(json.load(f)["ids"], np.int32)
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise MedusaError(f"{path} is not a drafting vocabulary ({type(e).__name__}: {e})") from None
  return ids if size is None else ids[:size]


def check(ids: Sequence[int], vocab_size: int, topk: int = 1) -> np.ndarray:
  """`ids` as an array, or a one-line error unless they are at least `topk` distinct ids of the
  vocabulary."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or len(ids) < topk or len(set(ids.tolist())) != len(ids):
    raise MedusaError(f"a drafting vocabulary needs at least {topk} distinct token ids, got {len(ids)}")
  if ids.min() < 0 or ids.max() >= vocab_size:
    raise MedusaError(f"drafting vocabulary holds a token id outside [0, {vocab_size})")
  return ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftVocab:
  """The heads' vocab projection restricted to `ids`."""

  ids: jax.Array      # `[Vd]` int32 token ids
  kernels: jax.Array | None  # `[1 or num_heads, embed, Vd]`: one kernel shared by all heads, or one
                             # each; None for a drafter with its own projection (EAGLE)

  @classmethod
  def build(cls, model: Llama, heads: MedusaHeads | None, ids: Sequence[int],
            topk: int = 1) -> "DraftVocab":
    """Gathers the `ids` columns of the heads' vocab projection (the base lm_head when shared, or
    when `heads` is None)."""
    ids = jnp.asarray(check(ids, model.config.vocab_size, topk), jnp.int32)
    if heads is not None and heads.lm_heads is not None:
      kernels = jnp.stack([jnp.take(lm.kernel[...], ids, axis=1) for lm in heads.lm_heads])
    else:
      kernels = jnp.take(model.lm_head_kernel(), ids, axis=1)[None]
    return cls(ids, kernels.astype(model.dtype))

  def project(self, k: int, x: jax.Array) -> jax.Array:
    """Head `k`'s float32 logits over `ids` `[..., Vd]` from its features `x` `[..., embed]`."""
    kernel = self.kernels[k if len(self.kernels) > 1 else 0]
    return jnp.matmul(x.astype(kernel.dtype), kernel).astype(jnp.float32)

  def index(self, tokens: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """Token ids (any shape) -> (their column among `ids`, 0 where absent; whether present)."""
    lookup = jnp.full((vocab_size,), -1, jnp.int32).at[self.ids].set(
        jnp.arange(len(self.ids), dtype=jnp.int32))
    column = lookup[tokens]
    return jnp.maximum(column, 0), column >= 0

  def logits(self, feats: jax.Array) -> jax.Array:
    """Heads' features `[num_heads, ..., embed]` -> float32 logits over `ids` `[num_heads, ..., Vd]`."""
    flat = feats.reshape(feats.shape[0], -1, feats.shape[-1]).astype(self.kernels.dtype)
    out = jnp.matmul(flat, self.kernels[: feats.shape[0]] if len(self.kernels) > 1 else self.kernels)
    return out.reshape(feats.shape[:-1] + (out.shape[-1],)).astype(jnp.float32)

  def top_k(self, feats: jax.Array, k: int) -> jax.Array:
    """Heads' features `[num_heads, ..., embed]` -> their top-k token ids `[num_heads, ..., k]`."""
    return jnp.take(self.ids, jax.lax.top_k(self.logits(feats), k)[1])
