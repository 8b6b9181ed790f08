"""Training configuration: YAML files with `key=value` overrides (dotted keys, e.g. `mesh.data=2`).
Unknown keys are errors, so a typo never silently trains the wrong thing."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import yaml

from medusa_jax.errors import MedusaError


@dataclasses.dataclass
class MeshConfig:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class TrainConfig:
  model: str = "random:tiny"
  data: list = dataclasses.field(default_factory=list)   # conversation files
  output_dir: str = "runs/heads"
  num_heads: int = 4
  num_layers: int = 1
  share_lm_head: bool = True
  seq_len: int = 256
  batch_size: int = 8
  grad_accum: int = 1
  max_steps: int = 100
  learning_rate: float = 1e-3
  warmup_fraction: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  decay: float = 0.8                 # head k's loss weight is decay**k
  vocab_chunk: int = 1024            # positions per chunk of the chunked vocab projection + CE
  compute_dtype: str = "bfloat16"
  eval_fraction: float = 0.05
  eval_every: int = 50
  eval_batches: int = 4
  save_every: int = 50
  keep_checkpoints: int = 2
  log_every: int = 10
  method: str = "medusa1"            # medusa1: frozen backbone; medusa2: backbone trains jointly
  heads_weight: float = 0.2          # Medusa-2: loss = L_LM + heads_weight * heads loss
  lm_loss: str = "kl"                # Medusa-2 L_LM: kl (to the frozen original; self-distilled
                                     # data) or ce (next-token cross-entropy)
  backbone_learning_rate: float = 2e-5  # Medusa-2: peak learning rate of the backbone
  init_heads: str = ""               # start from these trained heads (e.g. Medusa-1's, for Medusa-2)
  cache_hidden: bool = False         # Medusa-1: frozen backbone's hidden states computed once; a step
                                     # then draws batch_size * seq_len labelled positions
  draft_vocab: int = 0               # heads' softmax over the N most frequent answer tokens of the
                                     # training data (their drafting vocabulary, as decoding uses
                                     # them); 0: the whole vocabulary
  teacher_top_k: int = 0             # Medusa-1: head k learns the base model's own next-token
                                     # distribution at its target (top-k tokens, renormalised;
                                     # teacher distillation); 0: the data's token
  hidden_cache_dir: str = ""         # with cache_hidden: keep those hidden states here and reuse them
                                     # in later runs on the same model and data (e.g. head sweeps)
  seed: int = 0
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


def _parse_value(text: str) -> Any:
  return yaml.safe_load(text)


def _apply(obj, key: str, value: Any, full_key: str):
  head, _, rest = key.partition(".")
  fields = {f.name: f for f in dataclasses.fields(obj)}
  if head not in fields:
    raise MedusaError(f"unknown config key {full_key!r}")
  if rest:
    sub = getattr(obj, head)
    if not dataclasses.is_dataclass(sub):
      raise MedusaError(f"unknown config key {full_key!r}")
    _apply(sub, rest, value, full_key)
    return
  current = getattr(obj, head)
  if dataclasses.is_dataclass(current):
    if not isinstance(value, dict):
      raise MedusaError(f"config key {full_key!r} needs a mapping")
    for k, v in value.items():
      _apply(current, k, v, f"{full_key}.{k}")
    return
  if isinstance(current, bool) and not isinstance(value, bool):
    raise MedusaError(f"config key {full_key!r} needs true or false, got {value!r}")
  if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and not value.is_integer():
    raise MedusaError(f"config key {full_key!r} needs a whole number, got {value!r}")
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    try:
      value = type(current)(value)
    except (TypeError, ValueError):
      raise MedusaError(f"config key {full_key!r} needs a number, got {value!r}") from None
  if isinstance(current, str) and value is None:  # `key=` clears a string (checked after for required keys)
    value = ""
  if isinstance(current, str) and not isinstance(value, str):
    raise MedusaError(f"config key {full_key!r} needs a string, got {value!r}")
  if isinstance(current, list):
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise MedusaError(f"config key {full_key!r} needs a path or a list of paths, got {value!r}")
  setattr(obj, head, value)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
  """A TrainConfig from a YAML file (relative data paths resolved against the working directory)
  and `key=value` overrides."""
  config = TrainConfig()
  if path:
    if not os.path.isfile(path):
      raise MedusaError(f"config file not found: {path}")
    with open(path) as f:
      try:
        values = yaml.safe_load(f) or {}
      except yaml.YAMLError as e:
        raise MedusaError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
      raise MedusaError(f"{path} must hold a mapping of config keys, got a {type(values).__name__}")
    for k, v in values.items():
      _apply(config, k, v, k)
  for item in overrides:
    if "=" not in item:
      raise MedusaError(f"override {item!r} is not key=value")
    k, v = item.split("=", 1)
    _apply(config, k.strip(), _parse_value(v), k.strip())
  _check_choices(config)
  return config


def _check_choices(config: TrainConfig) -> None:
  for key, choices in (("method", ("medusa1", "medusa2")), ("lm_loss", ("kl", "ce"))):
    if getattr(config, key) not in choices:
      raise MedusaError(f"config key {key!r} must be one of {', '.join(choices)}, "
                        f"got {getattr(config, key)!r}")
  for key in ("model", "output_dir"):
    if not getattr(config, key):
      raise MedusaError(f"config key {key!r} must not be empty")
  for key in ("num_heads", "num_layers", "seq_len", "batch_size", "grad_accum", "max_steps", "vocab_chunk",
              "eval_batches", "save_every", "keep_checkpoints", "log_every", "mesh.data", "mesh.fsdp", "mesh.tensor"):
    value = getattr(config.mesh if key.startswith("mesh.") else config, key.rpartition(".")[2])
    if value < 1:
      raise MedusaError(f"config key {key!r} must be at least 1, got {value}")
  if config.eval_every < 0:
    raise MedusaError(f"config key 'eval_every' must be >= 0 (0: no evaluation), got {config.eval_every}")
  for key in ("learning_rate", "backbone_learning_rate"):
    if not getattr(config, key) > 0:
      raise MedusaError(f"config key {key!r} must be positive, got {getattr(config, key)}")
  for key in ("warmup_fraction", "eval_fraction"):
    if not 0 <= getattr(config, key) < 1:
      raise MedusaError(f"config key {key!r} must be in [0, 1), got {getattr(config, key)}")
  if config.draft_vocab < 0:
    raise MedusaError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {config.draft_vocab}")
  if config.teacher_top_k < 0:
    raise MedusaError(f"teacher_top_k must be >= 0 (0: the data's tokens), got {config.teacher_top_k}")
  if config.teacher_top_k and config.method != "medusa1":
    raise MedusaError("teacher_top_k needs method medusa1 (the frozen backbone is the teacher)")
  if config.cache_hidden and config.method != "medusa1":
    raise MedusaError("cache_hidden needs method medusa1 (a frozen backbone)")
