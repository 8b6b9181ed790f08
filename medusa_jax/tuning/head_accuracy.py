"""How often the Medusa heads guess the base model's own greedy continuation: per head and rank,
and jointly along tree paths, and the tokens per step a tree would accept.

At a decode position t, head k's guess of rank i is right when it is the token the base model
emits k + 2 ahead. A tree path `(i0, i1, ...)` is right at t when each head's guess along it is.
A path is right only where its parent is, and siblings hold different guesses, so at most one
node per depth is right and a tree step at t accepts 1 + the number of its paths right at t
(`path_counts` sums those over positions; `tree_builder.tree_from_path_counts` builds the tree of
a given size that is right most often).
Decoding does not visit every position, though: the next step starts where this one stopped, and
steps stop at hard positions, so `expected_tokens_per_step` replays the tree along each answer
(the per-position mean overstates it; the replay matches decoding's tokens per step).
Hydra heads read the path's tokens: here the true ones, which are the drafted ones exactly where
the path is right, so the ranks are those decoding sees.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.decode.engine import Engine, bucket, pad_prompts
from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.heads import head_targets
from medusa_jax.medusa.tree import Path


def tokens_per_step(answer_ranks: Sequence[np.ndarray], paths: Sequence[Sequence[int]]) -> float:
  """Tokens per step of greedy Medusa decoding with the tree `paths`, replayed on answers whose
  heads' ranks are `answer_ranks` (one `[num_heads, answer_len]` array per answer: at column i, the
  rank of the right token among head k's guesses at the position that emits answer token i; -1
  where head k has no target there, the vocabulary size where the token is outside the drafting
  vocabulary). As decoding counts them: the prefill step emits token 0; a tree step at column i
  emits tokens i+1 .. i+1+d (d: the longest path right there; no more than the answer has left),
  and the next step starts at the last of them."""
  tokens = steps = 0
  for ranks in answer_ranks:
    n = ranks.shape[1]
    depth = np.zeros(n, int)
    for p in paths:
      right = np.all(ranks[: len(p)] == np.asarray(p)[:, None], axis=0)
      depth = np.maximum(depth, len(p) * right)
    i, steps = 0, steps + 1  # the prefill
    while i < n - 1:
      i += min(1 + depth[i], n - 1 - i)
      steps += 1
    tokens += n
  return tokens / max(steps, 1)


@dataclasses.dataclass
class HeadAccuracy:
  per_rank: np.ndarray                 # `[num_heads, topk]`: fraction of positions where rank i of head k is right
  positions: int                       # decode positions counted (head 0's)
  path_counts: dict[Path, int]         # positions where every guess along the path is right
  answer_ranks: list[np.ndarray]       # per answer `[num_heads, answer_len]` (see `tokens_per_step`)

  def expected_tokens_per_step(self, paths: Sequence[Sequence[int]]) -> float:
    """Tokens per step greedy decoding with the tree `paths` would reach on these answers."""
    return tokens_per_step(self.answer_ranks, paths)


@functools.partial(jax.jit, static_argnames=("graphdef", "heads_graphdef"))
def _ranks(state, heads_state, draft: DraftVocab | None, tokens: jax.Array, first: jax.Array,
           end: jax.Array, *, graphdef, heads_graphdef) -> jax.Array:
  """tokens `[batch, L]` (prompt + greedy answer); decode positions `t` in `[first, end)` per row.
  Returns the rank of the right token among each head's guesses `[num_heads, batch, L]` (0 = its
  top guess; over the drafting vocabulary `draft` when given, where a token outside it never
  ranks), -1 where the target lies past `end` or `t` is not a decode position."""
  model = nnx.merge(graphdef, state)
  heads = nnx.merge(heads_graphdef, heads_state)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = model.hidden_states(tokens, positions)
  num_heads = heads.config.num_heads
  path, _ = head_targets(tokens, jnp.ones(tokens.shape, bool), num_heads, first_shift=1)
  feats = heads.hidden(hidden, path=path, base=model)  # [K, b, L, e]; Hydra heads read the true path
  targets, _ = head_targets(tokens, jnp.ones(tokens.shape, bool), num_heads)
  vocab = model.config.vocab_size
  if draft is not None:  # each target's slot among the draft ids (-1: not there)
    slot = jnp.full((vocab,), -1, jnp.int32).at[draft.ids].set(jnp.arange(len(draft.ids), dtype=jnp.int32))
    targets, draft_logits = slot[targets], draft.logits(feats)
  t = jnp.arange(tokens.shape[1])[None, :]
  ranks = []
  for k in range(heads.config.num_heads):
    valid = (t >= first[:, None]) & (t + k + 2 < end[:, None])
    logits = heads.project(k, feats[k], model) if draft is None else draft_logits[k]  # [b, L, V]
    target = targets[..., k]
    target_logit = jnp.take_along_axis(logits, jnp.maximum(target, 0)[..., None], axis=-1)
    rank = jnp.where(target >= 0, jnp.sum(logits > target_logit, axis=-1), vocab)
    ranks.append(jnp.where(valid, rank, -1))
  return jnp.stack(ranks)


def greedy_answers(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128
                   ) -> list[list[int]]:
  """The base model's greedy answers (token lists, EOS included) to `prompts`, one at a time."""
  out = []
  for prompt in prompts:
    answer = engine.generate_ids([prompt], max_new_tokens=max_new_tokens, mode="baseline")
    out.append([int(x) for x in answer.tokens[0, : int(answer.num_tokens[0])]])
  return out


def head_accuracy(engine: Engine, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                  topk: int = 10, answers: Sequence[Sequence[int]] | None = None) -> HeadAccuracy:
  """Accuracy of `engine`'s heads against its base model's greedy answers to `prompts` (token
  lists), one prompt at a time, for ranks below `topk`. `answers`: those answers when already
  computed (`greedy_answers`; they depend on the base model alone, so several heads can share
  them)."""
  engine.plan(mode="medusa")  # a one-line error without heads
  num_heads = engine.heads_config.num_heads
  hits = np.zeros((num_heads, topk))
  total = np.zeros(num_heads)
  counts: collections.Counter = collections.Counter()
  answer_ranks = []
  if answers is None:
    answers = greedy_answers(engine, prompts, max_new_tokens)
  for prompt, answer in zip(prompts, answers, strict=True):
    seq = list(prompt) + list(answer)
    tokens, _ = pad_prompts([seq], bucket(len(seq)), engine.pad_id)  # one compile per bucket
    ranks = np.asarray(_ranks(engine.state, engine.heads_state, engine.draft, jnp.asarray(tokens),
                              jnp.asarray([len(prompt) - 1]), jnp.asarray([len(seq)]),
                              graphdef=engine.graphdef, heads_graphdef=engine.heads_graphdef))[:, 0]
    answer_ranks.append(ranks[:, len(prompt) - 1: len(seq) - 1])
    for k in range(num_heads):
      r = ranks[k][ranks[k] >= 0]
      total[k] += len(r)
      hits[k] += np.bincount(r[r < topk], minlength=topk)
    for column in ranks[:, ranks[0] >= 0].T:  # one decode position: the ranks of heads 0, 1, ...
      path: Path = ()
      for r in column:
        if not 0 <= r < topk:
          break
        path += (int(r),)
        counts[path] += 1
  return HeadAccuracy(hits / np.maximum(total, 1)[:, None], int(total[0]), dict(counts), answer_ranks)
