"""Head training losses (the step that applies them: `step.py`).

Medusa-1 (`method: medusa1`): frozen backbone, loss = sum_k decay**k * CE(head_k(h_t), x_{t+k+2})
over positions whose target is an assistant token. With `heads.teacher_top_k: M` (teacher distillation,
as in Hydra++) head k's target is the base model's own next-token distribution at t+k+1 (its top-M
tokens, renormalised) instead of the one token x_{t+k+2}: on self-distilled data that token is the
distribution's argmax, and the rest of the distribution is extra signal per position.
Medusa-2 (`method: medusa2`): the backbone trains with the heads, loss = L_LM + heads_weight *
(the Medusa-1 loss), where L_LM is the KL divergence from the frozen original model's next-token
distribution (`medusa2.lm_loss: kl`, for self-distilled data) or the next-token CE (`ce`); the
backbone has its own learning rate.

EAGLE (`heads.head_type: eagle`): the drafter's training-time test (`medusa/eagle.ttt_outputs`,
`heads.ttt_steps` K) over sequences; step j at position t learns the target's own distribution
over the drafting vocabulary at t + 1 (which predicts x_{t+2}; as EAGLE-3 does), where x_{t+2} is
an answer token and t >= j (the chain needs a real entry at t - j);
loss = sum_j decay**j * CE_j. Metrics report step j as "head" j, top-1/top-5 of the target's
most likely token.

Memory: vocab projections and their losses run over chunks of positions inside a rematerialised
scan, so float32 logits `[batch, seq, vocab]` are never held for all heads (or even one) at once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.eagle import EagleHead, ttt_outputs
from medusa_jax.medusa.heads import MedusaHeads, head_targets, shift_left
from medusa_jax.model.llama import Llama
from medusa_jax.training.batches import PositionBatch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMetrics:
  loss: jax.Array    # scalar: the training loss (Medusa-1: the weighted sum of per-head mean CE)
  ce: jax.Array      # `[num_heads]` summed cross-entropy over counted positions
  top1: jax.Array    # `[num_heads]` hits
  top5: jax.Array    # `[num_heads]` hits
  count: jax.Array   # `[num_heads]` counted positions
  scored: jax.Array  # `[num_heads]` of those whose target has a logit (all without a drafting vocabulary)
  lm_sum: jax.Array | None = None    # Medusa-2: summed L_LM over its positions (scalar)
  lm_count: jax.Array | None = None  # Medusa-2: positions counted in lm_sum


def _chunked_sum(fn, xs: tuple, chunk: int) -> tuple:
  """Sums the scalars `fn(*xs_chunk)` returns over chunks of `chunk` positions, rematerialising
  each chunk in the backward pass. Every x in `xs` is `[n, ...]`; padding positions are zeros, so
  `fn` must weigh positions by a validity argument."""
  n = xs[0].shape[0]
  chunk = min(chunk, n)
  pad = (-n) % chunk
  xs = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape((-1, chunk) + x.shape[1:])
             for x in xs)
  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, *(x[0] for x in xs)))

  @jax.checkpoint
  def body(carry, x):
    return jax.tree.map(jnp.add, carry, fn(*x)), None

  return jax.lax.scan(body, zeros, xs)[0]


def _ce_sums(logits: jax.Array, targets: jax.Array, valid: jax.Array,
             soft_cols: jax.Array | None = None, soft_probs: jax.Array | None = None):
  """Summed CE, top-1 and top-5 hits of `targets` over valid positions. logits `[n, vocab]`,
  targets/valid `[n]`. With soft targets (columns and probabilities `[n, M]`, summing to 1) the CE
  is against that distribution; hits still count `targets`."""
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  expected = target_logit if soft_cols is None else jnp.sum(
      soft_probs * jnp.take_along_axis(logits, soft_cols, axis=-1), axis=-1)
  ce = jax.nn.logsumexp(logits, axis=-1) - expected
  rank = jnp.sum(logits > target_logit[:, None], axis=-1)
  v = valid.astype(jnp.float32)
  return jnp.sum(ce * v), jnp.sum((rank < 1) * v), jnp.sum((rank < 5) * v)


def heads_loss(heads: MedusaHeads, base: Llama, positions: PositionBatch, decay: float, chunk: int,
               draft_ids: np.ndarray | None = None) -> StepMetrics:
  """Labelled positions (backbone hidden states `[n, embed]`, each head's target and validity
  `[n, num_heads]`, the path tokens Hydra heads read, the teacher's soft targets when present)
  -> metrics. Heads are per-position, so positions need no sequence order.
  With soft targets ((ids, probs) `[n, num_heads, M]`, `soft_head_targets`) the CE is against them.

  With `draft_ids` `[Vd]` (a drafting vocabulary) the heads' softmax runs over those ids only, as
  decoding uses them: the vocab projection costs `Vd / vocab` of the full one. A target outside
  them has no logit: it adds no loss and counts as a miss in top-1/top-5."""
  feats = heads.hidden(positions.hidden, path=positions.path, base=base)  # [K, n, e]
  targets, valid, soft = positions.targets, positions.valid, positions.soft
  if draft_ids is None:
    project, scored = (lambda k, f: heads.project(k, f, base)), valid
  else:
    draft = DraftVocab.build(base, heads, draft_ids)
    project = draft.project
    targets, present = draft.index(targets, base.config.vocab_size)
    scored = valid & present
    if soft is not None:
      cols, in_draft = draft.index(soft[0], base.config.vocab_size)
      soft = (cols, soft[1] * in_draft)
  ces, top1s, top5s, counts, scored_counts = [], [], [], [], []
  loss = jnp.zeros((), jnp.float32)
  for k in range(heads.config.num_heads):
    xs = (feats[k], targets[:, k], scored[:, k])
    if soft is not None:
      xs += (soft[0][:, k], soft[1][:, k])
    ce, top1, top5 = _chunked_sum(lambda f, *rest, k=k: _ce_sums(project(k, f), *rest), xs, chunk)
    count = jnp.sum(valid[:, k]).astype(jnp.float32)
    scored_count = jnp.sum(scored[:, k]).astype(jnp.float32)
    loss = loss + (decay ** k) * ce / jnp.maximum(scored_count, 1.0)
    ces.append(ce); top1s.append(top1); top5s.append(top5); counts.append(count)
    scored_counts.append(scored_count)
  return StepMetrics(loss, jnp.stack(ces), jnp.stack(top1s), jnp.stack(top5s), jnp.stack(counts),
                     jnp.stack(scored_counts))


def _distill_sums(logits: jax.Array, teacher_logits: jax.Array, valid: jax.Array):
  """Summed CE against the teacher's distribution, top-1 and top-5 hits of the teacher's argmax,
  over valid positions. logits/teacher_logits `[n, V]`, valid `[n]`."""
  p = jax.nn.softmax(teacher_logits, axis=-1)
  ce = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(p * logits, axis=-1)
  best = jnp.argmax(teacher_logits, axis=-1)
  rank = jnp.sum(logits > jnp.take_along_axis(logits, best[:, None], axis=-1), axis=-1)
  v = valid.astype(jnp.float32)
  return jnp.sum(ce * v), jnp.sum((rank < 1) * v), jnp.sum((rank < 5) * v)


def eagle_loss(head: EagleHead, base: Llama, taps: jax.Array, hidden: jax.Array, tokens: jax.Array,
               mask: jax.Array, steps: int, decay: float, chunk: int,
               draft_ids: np.ndarray | None) -> StepMetrics:
  """The EAGLE drafter's loss (module docstring) on sequences: the target's taps
  `[b, seq, len(taps) * embed]` and final hidden states `[b, seq, embed]` (its distribution over
  the drafting vocabulary `draft_ids`, None: the whole vocabulary, is the teacher), tokens and
  assistant mask `[b, seq]`: positions whose x_{t+2} is an answer token count (a prompt's text,
  its template and system prompt above all, is not what the drafter drafts)."""
  outs = ttt_outputs(head, base, taps, tokens, steps)  # [K, b, seq, e]
  ids = np.arange(base.config.vocab_size) if draft_ids is None else draft_ids
  draft = DraftVocab.build(base, None, ids)
  e = outs.shape[-1]
  teacher = shift_left(hidden, 1).reshape(-1, e)  # at t: the target at t + 1, predicting x_{t+2}
  predicted = shift_left(mask, 2)
  ces, top1s, top5s, counts = [], [], [], []
  loss = jnp.zeros((), jnp.float32)
  for j in range(steps):
    counted = (predicted & (jnp.arange(tokens.shape[1]) >= j)[None, :]).reshape(-1)
    xs = (outs[j].reshape(-1, e), teacher, counted)
    ce, top1, top5 = _chunked_sum(lambda f, th, v: _distill_sums(head.logits(f), draft.project(0, th), v),
                                  xs, chunk)
    count = jnp.sum(counted).astype(jnp.float32)
    loss = loss + (decay ** j) * ce / jnp.maximum(count, 1.0)
    ces.append(ce); top1s.append(top1); top5s.append(top5); counts.append(count)
  counts = jnp.stack(counts)
  return StepMetrics(loss, jnp.stack(ces), jnp.stack(top1s), jnp.stack(top5s), counts, counts)


def lm_loss(model: Llama, teacher: Llama, hidden: jax.Array, teacher_hidden: jax.Array | None,
            tokens: jax.Array, mask: jax.Array, kind: str, chunk: int) -> tuple[jax.Array, jax.Array]:
  """Medusa-2's L_LM summed over positions whose next token is an assistant token, and their count.

  hidden/teacher_hidden `[b, seq, embed]` (the trained backbone's and the frozen original's; the
  latter only for "kl"), tokens/mask `[b, seq]`. `kind` "kl": KL(teacher || model) of the
  next-token distributions; "ce": CE of the next token."""
  e = hidden.shape[-1]
  targets, valid = (x.reshape(-1) for x in head_targets(tokens, mask, 1, first_shift=1))
  if kind == "ce":
    total = _chunked_sum(lambda h, t, v: _ce_sums(model.logits(h), t, v)[:1],
                         (hidden.reshape(-1, e), targets, valid), chunk)[0]
  else:
    def kl(h, th, v):
      logp, logq = jax.nn.log_softmax(teacher.logits(th)), jax.nn.log_softmax(model.logits(h))
      return (jnp.sum(jnp.sum(jnp.exp(logp) * (logp - logq), -1) * v.astype(jnp.float32)),)

    total = _chunked_sum(kl, (hidden.reshape(-1, e), jax.lax.stop_gradient(teacher_hidden).reshape(-1, e),
                              valid), chunk)[0]
  return total, jnp.sum(valid).astype(jnp.float32)


def summarize(metrics: StepMetrics) -> dict:
  """Per-head mean loss and top-1/top-5 accuracy (and Medusa-2's mean L_LM) as plain floats (for
  metrics.jsonl)."""
  m = jax.device_get(metrics)
  count = np.maximum(np.asarray(m.count), 1.0)
  out = {
      "loss": float(m.loss),
      "head_loss": (np.asarray(m.ce) / np.maximum(np.asarray(m.scored), 1.0)).round(5).tolist(),
      "top1": (np.asarray(m.top1) / count).round(5).tolist(),
      "top5": (np.asarray(m.top5) / count).round(5).tolist(),
      "tokens": int(np.asarray(m.count)[0]),
  }
  if m.lm_sum is not None:
    out["lm_loss"] = round(float(m.lm_sum) / max(float(m.lm_count), 1.0), 6)
  return out
