"""A training run's directory (orbax checkpoints + `train_config.json`, written by
`training/loop.py`) read as heads: those of its latest checkpoint."""

from __future__ import annotations

import os

from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.model.llama import Llama
from medusa_jax.training import checkpoints


def holds(path: str) -> bool:
  """Whether `path` is a training run directory."""
  return os.path.isfile(os.path.join(path, checkpoints.CONFIG))


def read(path: str, model: Llama) -> MedusaHeads:
  """The heads of the run's latest checkpoint, for `model`."""
  return checkpoints.trained_model(checkpoints.read_config(path), model)[1]
