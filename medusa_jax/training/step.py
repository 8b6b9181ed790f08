"""The jitted train step and evaluation: Medusa-1 (frozen backbone; sequences or cached positions),
Medusa-2 (backbone and heads jointly), and an EAGLE drafter (frozen backbone; sequences)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from medusa_jax.medusa.eagle import EagleHead
from medusa_jax.training.batches import PositionBatch, SequenceBatch
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.losses import eagle_loss, heads_loss, lm_loss
from medusa_jax.training.targets import (
  backbone_hidden,
  backbone_taps,
  position_targets,
  teacher_distribution,
)


def make_train_step(heads_graphdef, base_graphdef, optimizer, cfg: TrainConfig,
                    state_shardings=None, draft_ids: np.ndarray | None = None):
  """Jitted `step(params, opt_state, base_state, batch) -> (params, opt_state, metrics)` and
  `evaluate(params, base_state, batch) -> metrics`. With `state_shardings` (of `(params,
  opt_state)`) the step returns its state in exactly those shardings (one compilation for the run)
  and donates the state it was given; metrics come back replicated.

  `params` holds pure parameter dicts: `{"heads"}` (Medusa-1) or `{"heads", "backbone"}` (Medusa-2);
  `base_state` is the frozen original backbone. `batch`: a `SequenceBatch` (the backbone runs in
  the step) or, for Medusa-1, a `PositionBatch`. `draft_ids`: the heads' drafting vocabulary, the
  ids their softmax runs over (None: the whole vocabulary)."""
  h = cfg.heads

  def loss_fn(params, base_state, batch: SequenceBatch | PositionBatch):
    heads = nnx.merge(heads_graphdef, params["heads"])
    frozen = nnx.merge(base_graphdef, base_state)
    if isinstance(heads, EagleHead):
      taps, hidden = jax.lax.stop_gradient(backbone_taps(frozen, batch.tokens, heads.config.taps))
      metrics = eagle_loss(heads, frozen, taps, hidden, batch.tokens, batch.mask, h.ttt_steps, h.decay,
                           cfg.optim.vocab_chunk, draft_ids)
      return metrics.loss, metrics
    if "backbone" not in params:  # Medusa-1
      if isinstance(batch, SequenceBatch):
        hidden = jax.lax.stop_gradient(backbone_hidden(frozen, batch.tokens))
        teacher = (teacher_distribution(frozen, hidden, draft_ids, h.teacher_top_k)
                   if h.teacher_top_k else None)
        batch = position_targets(hidden, batch.tokens, batch.mask, h.num_heads, teacher)
      metrics = heads_loss(heads, frozen, batch, h.decay, cfg.optim.vocab_chunk, draft_ids)
      return metrics.loss, metrics
    model = nnx.merge(base_graphdef, params["backbone"])
    hidden = backbone_hidden(model, batch.tokens)
    teacher_hidden = backbone_hidden(frozen, batch.tokens) if cfg.medusa2.lm_loss == "kl" else None
    pos = position_targets(hidden, batch.tokens, batch.mask, h.num_heads)
    metrics = heads_loss(heads, model, pos, h.decay, cfg.optim.vocab_chunk, draft_ids)
    lm_sum, lm_count = lm_loss(model, frozen, hidden, teacher_hidden, batch.tokens, batch.mask,
                               cfg.medusa2.lm_loss, cfg.optim.vocab_chunk)
    loss = lm_sum / jnp.maximum(lm_count, 1.0) + cfg.medusa2.heads_weight * metrics.loss
    return loss, dataclasses.replace(metrics, loss=loss, lm_sum=lm_sum, lm_count=lm_count)

  def step(params, opt_state, base_state, batch):
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, base_state, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  def evaluate(params, base_state, batch):
    return loss_fn(params, base_state, batch)[1]

  if state_shardings is None:
    return jax.jit(step), jax.jit(evaluate)
  # metrics replicated: every process can read them (`distributed.to_host`)
  replicated = NamedSharding(jax.tree.leaves(state_shardings)[0].mesh, PartitionSpec())
  return (jax.jit(step, out_shardings=(*state_shardings, replicated), donate_argnums=(0, 1)),
          jax.jit(evaluate, out_shardings=replicated))
