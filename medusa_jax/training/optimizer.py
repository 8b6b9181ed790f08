"""The optimizer: AdamW with warmup + cosine, one global-norm clip, optional accumulation."""

from __future__ import annotations

import optax

from medusa_jax.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Over params `{"heads": ..., "backbone": ...}` (the backbone only with Medusa-2, at
  `medusa2.backbone_learning_rate`)."""
  o = cfg.optim
  warmup = max(1, int(cfg.max_steps * o.warmup_fraction))

  def adamw(lr):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(cfg.max_steps, warmup + 1))
    return optax.adamw(schedule, weight_decay=o.weight_decay)

  opt = optax.chain(optax.clip_by_global_norm(o.clip_norm), optax.multi_transform(
      {"heads": adamw(o.learning_rate), "backbone": adamw(cfg.medusa2.backbone_learning_rate)},
      lambda params: {group: group for group in params}))
  return optax.MultiSteps(opt, every_k_schedule=o.grad_accum) if o.grad_accum > 1 else opt
