"""What the heads learn at each position: hard targets (`medusa.heads.head_targets`), the
teacher's distribution (teacher distillation, `heads.teacher_top_k`), and sequences turned into
labelled positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.heads import head_targets, shift_left
from medusa_jax.model.llama import Llama
from medusa_jax.training.batches import PositionBatch


def backbone_hidden(base: Llama, tokens: jax.Array) -> jax.Array:
  """Final-norm hidden states `[batch, seq, embed]` of the backbone for `[batch, seq]` tokens."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return base.hidden_states(tokens, positions)[0]


def backbone_taps(base: Llama, tokens: jax.Array, taps: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """The inputs of the backbone's layers `taps`, concatenated `[batch, seq, len(taps) * embed]`
  (an EAGLE drafter's features), and its final-norm hidden states `[batch, seq, embed]`, for
  `[batch, seq]` tokens."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  out = base.forward(tokens, positions, taps=taps)
  return out.taps, out.hidden




def teacher_distribution(base: Llama, hidden: jax.Array, draft_ids: np.ndarray | None,
                         top_k: int) -> tuple[jax.Array, jax.Array]:
  """The base model's next-token distribution at each position, kept to its `top_k` tokens:
  hidden `[..., embed]` -> (token ids, probabilities renormalised over them), each `[..., top_k]`.
  Over the drafting vocabulary `draft_ids` when given (the heads' softmax runs over it)."""
  if draft_ids is None:
    top, ids = jax.lax.top_k(base.logits(hidden), top_k)
  else:
    draft = DraftVocab.build(base, None, draft_ids)
    top, cols = jax.lax.top_k(draft.project(0, hidden), top_k)
    ids = draft.ids[cols]
  return ids, jax.nn.softmax(top, axis=-1)




def soft_head_targets(teacher_ids: jax.Array, teacher_probs: jax.Array, available: jax.Array,
                      targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Head k at position t learns the teacher's distribution at t + k + 1 (which predicts
  `tokens[t + k + 2]`, head k's hard target). teacher_ids/probs `[batch, seq, M]` (from
  `teacher_distribution`), available `[batch, seq]` (where they were computed), targets
  `[batch, seq, num_heads]` (from `head_targets`) -> (ids, probs) `[batch, seq, num_heads, M]`;
  where the teacher's position is not available, the hard target with probability 1."""
  one_hot_probs = jnp.zeros(teacher_probs.shape, teacher_probs.dtype).at[..., 0].set(1.0)
  ids, probs = [], []
  for k in range(targets.shape[-1]):
    ok = shift_left(available, k + 1)[..., None]
    hard = jnp.zeros(teacher_ids.shape, teacher_ids.dtype).at[..., 0].set(targets[..., k])
    ids.append(jnp.where(ok, shift_left(teacher_ids, k + 1), hard))
    probs.append(jnp.where(ok, shift_left(teacher_probs, k + 1), one_hot_probs))
  return jnp.stack(ids, 2), jnp.stack(probs, 2)




def position_targets(hidden: jax.Array, tokens: jax.Array, mask: jax.Array, num_heads: int,
                     teacher: tuple[jax.Array, jax.Array] | None = None) -> PositionBatch:
  """Sequences -> positions: hidden `[b, seq, embed]`, tokens/mask `[b, seq]` -> a `PositionBatch`
  of `b * seq` positions; with `teacher` (`teacher_distribution` at every position, `[b, seq, M]`
  each) also its soft targets."""
  targets, valid = head_targets(tokens, mask, num_heads)
  next_tokens = shift_left(tokens, 1)
  soft = (None, None)
  if teacher is not None:
    ids, probs = soft_head_targets(*teacher, jnp.ones(tokens.shape, bool), targets)
    soft = tuple(x.reshape((-1,) + x.shape[2:]) for x in (ids, probs))
  return PositionBatch(hidden.reshape(-1, hidden.shape[-1]), next_tokens.reshape(-1),
                       targets.reshape(-1, num_heads), valid.reshape(-1, num_heads), *soft)
