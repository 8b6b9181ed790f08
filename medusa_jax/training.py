"""Medusa-1 head training: frozen backbone, loss = sum_k decay**k * CE(head_k(h_t), x_{t+k+2}) over
positions whose target is an assistant token. Sharded by the logical axis rules; orbax checkpoints.

Memory: the vocab projection and cross-entropy run over chunks of positions inside a rematerialised
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

from medusa_jax.heads import MedusaHeads
from medusa_jax.llama import Llama
from medusa_jax.train_config import TrainConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadMetrics:
  loss: jax.Array    # scalar: the weighted sum of per-head mean CE
  ce: jax.Array      # `[num_heads]` summed cross-entropy over counted positions
  top1: jax.Array    # `[num_heads]` hits
  top5: jax.Array    # `[num_heads]` hits
  count: jax.Array   # `[num_heads]` counted positions


def head_targets(tokens: jax.Array, mask: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array]:
  """Head k at position t predicts `tokens[t + k + 2]`, valid where that target is an assistant
  token. tokens/mask `[batch, seq]` -> (targets, valid), each `[batch, seq, num_heads]`."""
  targets, valid = [], []
  for k in range(num_heads):
    shift = k + 2
    targets.append(jnp.pad(tokens[:, shift:], ((0, 0), (0, shift))))
    valid.append(jnp.pad(mask[:, shift:], ((0, 0), (0, shift))))
  return jnp.stack(targets, -1), jnp.stack(valid, -1)


def _chunked_ce(project, feats: jax.Array, targets: jax.Array, valid: jax.Array, chunk: int):
  """Sums CE, top-1 and top-5 hits of `project(feats)` over positions, `chunk` positions at a time
  (rematerialised in the backward pass). feats `[n, embed]`, targets/valid `[n]`."""
  n = feats.shape[0]
  chunk = min(chunk, n)
  pad = (-n) % chunk
  feats = jnp.pad(feats, ((0, pad), (0, 0)))
  targets = jnp.pad(targets, (0, pad))
  valid = jnp.pad(valid, (0, pad))
  shape = (-1, chunk)

  @jax.checkpoint
  def body(carry, xs):
    f, t, v = xs
    logits = project(f)  # [chunk, vocab] float32
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=-1) - target_logit
    rank = jnp.sum(logits > target_logit[:, None], axis=-1)
    v = v.astype(jnp.float32)
    return (carry[0] + jnp.sum(ce * v), carry[1] + jnp.sum((rank < 1) * v),
            carry[2] + jnp.sum((rank < 5) * v)), None

  zero = jnp.zeros((), jnp.float32)
  (ce, top1, top5), _ = jax.lax.scan(
      body, (zero, zero, zero),
      (feats.reshape(shape + feats.shape[-1:]), targets.reshape(shape), valid.reshape(shape)))
  return ce, top1, top5


def heads_loss(heads: MedusaHeads, base: Llama, hidden: jax.Array, targets: jax.Array,
               valid: jax.Array, decay: float, chunk: int) -> HeadMetrics:
  """Positions' frozen-backbone hidden states `[n, embed]`, each head's target and validity
  `[n, num_heads]` -> metrics. Heads are per-position, so positions need no sequence order."""
  feats = heads.hidden(jax.lax.stop_gradient(hidden))  # [K, n, e]
  ces, top1s, top5s, counts = [], [], [], []
  loss = jnp.zeros((), jnp.float32)
  for k in range(heads.config.num_heads):
    ce, top1, top5 = _chunked_ce(functools.partial(heads.project, k, base=base), feats[k],
                                 targets[:, k], valid[:, k], chunk)
    count = jnp.sum(valid[:, k]).astype(jnp.float32)
    loss = loss + (decay ** k) * ce / jnp.maximum(count, 1.0)
    ces.append(ce); top1s.append(top1); top5s.append(top5); counts.append(count)
  return HeadMetrics(loss, jnp.stack(ces), jnp.stack(top1s), jnp.stack(top5s), jnp.stack(counts))


def backbone_hidden(base: Llama, tokens: jax.Array) -> jax.Array:
  """Final-norm hidden states of the frozen backbone for `[batch, seq]` tokens."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  hidden, _ = base.hidden_states(tokens, positions)
  return jax.lax.stop_gradient(hidden)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  warmup = max(1, int(cfg.max_steps * cfg.warmup_fraction))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup,
                                                max(cfg.max_steps, warmup + 1))
  opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                    optax.adamw(schedule, weight_decay=cfg.weight_decay))
  return optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else opt


def make_train_step(heads_graphdef, base_graphdef, optimizer, cfg: TrainConfig):
  """Jitted `step(params, opt_state, base_state, batch) -> (params, opt_state, metrics)` and
  `evaluate(params, base_state, batch) -> metrics`; `params` is the heads' pure parameter dict.

  `batch` holds packed sequences (`tokens`, `mask` `[b, seq]`: the backbone runs in the step) or
  cached positions (`hidden` `[n, embed]`, `targets`, `valid` `[n, num_heads]`, from
  `position_targets`)."""

  def loss_fn(params, base_state, batch):
    heads = nnx.merge(heads_graphdef, params)
    base = nnx.merge(base_graphdef, base_state)
    if "hidden" not in batch:
      batch = position_targets(backbone_hidden(base, batch["tokens"]), batch["tokens"], batch["mask"],
                               cfg.num_heads)
    metrics = heads_loss(heads, base, batch["hidden"], batch["targets"], batch["valid"], cfg.decay,
                         cfg.vocab_chunk)
    return metrics.loss, metrics

  @jax.jit
  def step(params, opt_state, base_state, batch):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, base_state, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

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


def summarize(metrics: HeadMetrics) -> dict:
  """Per-head mean loss and top-1/top-5 accuracy as plain floats (for metrics.jsonl)."""
  m = jax.device_get(metrics)
  count = np.maximum(np.asarray(m.count), 1.0)
  return {
      "loss": float(m.loss),
      "head_loss": (np.asarray(m.ce) / count).round(5).tolist(),
      "top1": (np.asarray(m.top1) / count).round(5).tolist(),
      "top5": (np.asarray(m.top5) / count).round(5).tolist(),
      "tokens": int(np.asarray(m.count)[0]),
  }
