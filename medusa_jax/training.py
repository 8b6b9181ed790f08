"""Head training losses and the jitted train step.

Medusa-1 (`method: medusa1`): frozen backbone, loss = sum_k decay**k * CE(head_k(h_t), x_{t+k+2})
over positions whose target is an assistant token.
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


def head_targets(tokens: jax.Array, mask: jax.Array, num_heads: int,
                 first_shift: int = 2) -> tuple[jax.Array, jax.Array]:
  """Head k at position t predicts `tokens[t + k + first_shift]` (2 for Medusa heads, 1 for the
  base lm_head), valid where that target is an assistant token. tokens/mask `[batch, seq]` ->
  (targets, valid), each `[batch, seq, num_heads]`."""
  targets, valid = [], []
  for k in range(num_heads):
    shift = k + first_shift
    targets.append(jnp.pad(tokens[:, shift:], ((0, 0), (0, shift))))
    valid.append(jnp.pad(mask[:, shift:], ((0, 0), (0, shift))))
  return jnp.stack(targets, -1), jnp.stack(valid, -1)


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


def _ce_sums(logits: jax.Array, targets: jax.Array, valid: jax.Array):
  """Summed CE, top-1 and top-5 hits over valid positions. logits `[n, vocab]`, targets/valid `[n]`."""
  target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  ce = jax.nn.logsumexp(logits, axis=-1) - target_logit
  rank = jnp.sum(logits > target_logit[:, None], axis=-1)
  v = valid.astype(jnp.float32)
  return jnp.sum(ce * v), jnp.sum((rank < 1) * v), jnp.sum((rank < 5) * v)


def heads_loss(heads: MedusaHeads, base: Llama, hidden: jax.Array, targets: jax.Array,
               valid: jax.Array, decay: float, chunk: int,
               draft_ids: np.ndarray | None = None) -> StepMetrics:
  """Positions' backbone hidden states `[n, embed]`, each head's target and validity
  `[n, num_heads]` -> metrics. Heads are per-position, so positions need no sequence order.

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
  ces, top1s, top5s, counts, scored_counts = [], [], [], [], []
  loss = jnp.zeros((), jnp.float32)
  for k in range(heads.config.num_heads):
    ce, top1, top5 = _chunked_sum(lambda f, t, s, k=k: _ce_sums(project(k, f), t, s),
                                  (feats[k], targets[:, k], scored[:, k]), chunk)
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
        batch = position_targets(hidden, batch["tokens"], batch["mask"], cfg.num_heads)
      metrics = heads_loss(heads, frozen, batch["hidden"], batch["targets"], batch["valid"],
                           cfg.decay, cfg.vocab_chunk, draft_ids)
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


def position_targets(hidden, tokens, mask, num_heads: int) -> dict:
  """Sequences -> positions: hidden `[b, seq, embed]`, tokens/mask `[b, seq]` -> {"hidden" `[b*seq,
  embed]`, "targets", "valid" `[b*seq, num_heads]`}."""
  targets, valid = head_targets(tokens, mask, num_heads)
  return {"hidden": hidden.reshape(-1, hidden.shape[-1]),
          "targets": targets.reshape(-1, num_heads), "valid": valid.reshape(-1, num_heads)}


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
