"""Head training losses and the jitted train step.

Medusa-1 (`method: medusa1`): frozen backbone, loss = sum_k decay**k * CE(head_k(h_t), x_{t+k+2})
over positions whose target is an assistant token. With `teacher_top_k: M` (teacher distillation,
as in Hydra++) head k's target is the base model's own next-token distribution at t+k+1 (its top-M
tokens, renormalised) instead of the one token x_{t+k+2}: on self-distilled data that token is the
distribution's argmax, and the rest of the distribution is extra signal per position.
Medusa-2 (`method: medusa2`): the backbone trains with the heads, loss = L_LM + heads_weight *
(the Medusa-1 loss), where L_LM is the KL divergence from the frozen original model's next-token
distribution (`lm_loss: kl`, for self-distilled data) or the next-token CE (`lm_loss: ce`); the
backbone has its own learning rate.

Memory: vocab projections and their losses run over chunks of positions inside a rematerialised
scan, so float32 logits `[batch, seq, vocab]` are never held for all heads (or even one) at once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medusa_jax.draft_vocab import DraftVocab
from medusa_jax.heads import MedusaHeads
from medusa_jax.llama import Llama
from medusa_jax.train_config import TrainConfig


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


def _shifted(x: jax.Array, shift: int) -> jax.Array:
  """`x[:, t + shift]` at position t (zeros past the end); x `[batch, seq, ...]`."""
  return jnp.pad(x[:, shift:], [(0, 0), (0, shift)] + [(0, 0)] * (x.ndim - 2))


def head_targets(tokens: jax.Array, mask: jax.Array, num_heads: int,
                 first_shift: int = 2) -> tuple[jax.Array, jax.Array]:
  """Head k at position t predicts `tokens[t + k + first_shift]` (2 for Medusa heads, 1 for the
  base lm_head), valid where that target is an assistant token. tokens/mask `[batch, seq]` ->
  (targets, valid), each `[batch, seq, num_heads]`."""
  shifts = range(first_shift, first_shift + num_heads)
  return (jnp.stack([_shifted(tokens, s) for s in shifts], -1),
          jnp.stack([_shifted(mask, s) for s in shifts], -1))


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
    ok = _shifted(available, k + 1)[..., None]
    hard = jnp.zeros(teacher_ids.shape, teacher_ids.dtype).at[..., 0].set(targets[..., k])
    ids.append(jnp.where(ok, _shifted(teacher_ids, k + 1), hard))
    probs.append(jnp.where(ok, _shifted(teacher_probs, k + 1), one_hot_probs))
  return jnp.stack(ids, 2), jnp.stack(probs, 2)


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


def heads_loss(heads: MedusaHeads, base: Llama, hidden: jax.Array, targets: jax.Array,
               valid: jax.Array, decay: float, chunk: int,
               draft_ids: np.ndarray | None = None,
               soft: tuple[jax.Array, jax.Array] | None = None) -> StepMetrics:
  """Positions' backbone hidden states `[n, embed]`, each head's target and validity
  `[n, num_heads]` -> metrics. Heads are per-position, so positions need no sequence order.
  `soft`: (ids, probs) `[n, num_heads, M]` from `soft_head_targets`: the CE is against them.

  With `draft_ids` `[Vd]` (a drafting vocabulary) the heads' softmax runs over those ids only, as
  decoding uses them: the vocab projection costs `Vd / vocab` of the full one. A target outside
  them has no logit: it adds no loss and counts as a miss in top-1/top-5."""
  feats = heads.hidden(hidden)  # [K, n, e]
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


def backbone_hidden(base: Llama, tokens: jax.Array) -> jax.Array:
  """Final-norm hidden states `[batch, seq, embed]` of the backbone for `[batch, seq]` tokens."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return base.hidden_states(tokens, positions)[0]


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with warmup + cosine over params `{"heads": ..., "backbone": ...}` (the backbone only
  with Medusa-2, at `backbone_learning_rate`), one global-norm clip, optional accumulation."""
  warmup = max(1, int(cfg.max_steps * cfg.warmup_fraction))

  def adamw(lr):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(cfg.max_steps, warmup + 1))
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)

  opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.multi_transform(
      {"heads": adamw(cfg.learning_rate), "backbone": adamw(cfg.backbone_learning_rate)},
      lambda params: {group: group for group in params}))
  return optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else opt


def make_train_step(heads_graphdef, base_graphdef, optimizer, cfg: TrainConfig,
                    state_shardings=None, draft_ids: np.ndarray | None = None):
  """Jitted `step(params, opt_state, base_state, batch) -> (params, opt_state, metrics)` and
  `evaluate(params, base_state, batch) -> metrics`. With `state_shardings` (of `(params,
  opt_state)`) the step returns its state in exactly those shardings (one compilation for the run)
  and donates the state it was given.

  `params` holds pure parameter dicts: `{"heads"}` (Medusa-1) or `{"heads", "backbone"}` (Medusa-2);
  `base_state` is the frozen original backbone. `batch` holds packed sequences (`tokens`, `mask`
  `[b, seq]`: the backbone runs in the step) or, for Medusa-1, cached positions (`hidden`
  `[n, embed]`, `targets`, `valid` `[n, num_heads]`, from `position_targets`). `draft_ids`: the
  heads' drafting vocabulary, the ids their softmax runs over (None: the whole vocabulary)."""

  def loss_fn(params, base_state, batch):
    heads = nnx.merge(heads_graphdef, params["heads"])
    frozen = nnx.merge(base_graphdef, base_state)
    if "backbone" not in params:  # Medusa-1
      if "hidden" not in batch:
        hidden = jax.lax.stop_gradient(backbone_hidden(frozen, batch["tokens"]))
        teacher = (teacher_distribution(frozen, hidden, draft_ids, cfg.teacher_top_k)
                   if cfg.teacher_top_k else None)
        batch = position_targets(hidden, batch["tokens"], batch["mask"], cfg.num_heads, teacher)
      soft = (batch["soft_ids"], batch["soft_probs"]) if "soft_ids" in batch else None
      metrics = heads_loss(heads, frozen, batch["hidden"], batch["targets"], batch["valid"],
                           cfg.decay, cfg.vocab_chunk, draft_ids, soft)
      return metrics.loss, metrics
    model = nnx.merge(base_graphdef, params["backbone"])
    tokens, mask = batch["tokens"], batch["mask"]
    hidden = backbone_hidden(model, tokens)
    teacher_hidden = backbone_hidden(frozen, tokens) if cfg.lm_loss == "kl" else None
    pos = position_targets(hidden, tokens, mask, cfg.num_heads)
    metrics = heads_loss(heads, model, pos["hidden"], pos["targets"], pos["valid"], cfg.decay,
                         cfg.vocab_chunk, draft_ids)
    lm_sum, lm_count = lm_loss(model, frozen, hidden, teacher_hidden, tokens, mask, cfg.lm_loss,
                               cfg.vocab_chunk)
    loss = lm_sum / jnp.maximum(lm_count, 1.0) + cfg.heads_weight * metrics.loss
    return loss, dataclasses.replace(metrics, loss=loss, lm_sum=lm_sum, lm_count=lm_count)

  def step(params, opt_state, base_state, batch):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, base_state, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  if state_shardings is None:
    step = jax.jit(step)
  else:
    step = jax.jit(step, out_shardings=(*state_shardings, None), donate_argnums=(0, 1))

  @jax.jit
  def evaluate(params, base_state, batch):
    return loss_fn(params, base_state, batch)[1]

  return step, evaluate


def position_targets(hidden, tokens, mask, num_heads: int,
                     teacher: tuple[jax.Array, jax.Array] | None = None) -> dict:
  """Sequences -> positions: hidden `[b, seq, embed]`, tokens/mask `[b, seq]` -> {"hidden" `[b*seq,
  embed]`, "targets", "valid" `[b*seq, num_heads]`}; with `teacher` (`teacher_distribution` at
  every position, `[b, seq, M]` each) also "soft_ids", "soft_probs" `[b*seq, num_heads, M]`."""
  targets, valid = head_targets(tokens, mask, num_heads)
  out = {"hidden": hidden.reshape(-1, hidden.shape[-1]),
         "targets": targets.reshape(-1, num_heads), "valid": valid.reshape(-1, num_heads)}
  if teacher is not None:
    ids, probs = soft_head_targets(*teacher, jnp.ones(tokens.shape, bool), targets)
    out["soft_ids"], out["soft_probs"] = (x.reshape((-1,) + x.shape[2:]) for x in (ids, probs))
  return out


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
