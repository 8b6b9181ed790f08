"""Training configuration, nested by section: YAML files with `key=value` overrides (dotted keys,
e.g. `mesh.data=2`, `optim.learning_rate=1e-3`). Unknown keys are errors, so a typo never silently
trains the wrong thing. The flat names of earlier configs (`num_heads`, `learning_rate`, `data`,
`model`, ...) are still accepted for their new place (`FLAT_NAMES`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import yaml

from medusa_jax.errors import MedusaError
from medusa_jax.medusa.heads import HEAD_TYPES


@dataclasses.dataclass
class ModelSection:
  spec: str = "random:tiny"          # a model spec (`weights/specs.py`)
  compute_dtype: str = "bfloat16"


@dataclasses.dataclass
class HeadsSection:
  num_heads: int = 4
  num_layers: int = 1
  share_lm_head: bool = True
  head_type: str = "medusa"          # medusa (each head reads the hidden state), hydra (head k
                                     # also reads the path's tokens; `medusa/heads.py`) or eagle
                                     # (one decoder layer over the target's features; `medusa/eagle.py`)
  taps: list = dataclasses.field(default_factory=list)  # eagle: the target layers it reads (their
                                     # inputs); empty: EAGLE-3's low, middle and high layers
  ttt_steps: int = 3                 # eagle: training-time test steps (its own outputs fed back);
                                     # step j's loss weight is decay**j
  init: str = ""                     # start from these trained heads (e.g. Medusa-1's, for Medusa-2)
  draft_vocab: int = 0               # heads' softmax over the N most frequent answer tokens of the
                                     # training data (their drafting vocabulary, as decoding uses
                                     # them); 0: the whole vocabulary
  teacher_top_k: int = 0             # Medusa-1: head k learns the base model's own next-token
                                     # distribution at its target (top-k tokens, renormalised;
                                     # teacher distillation); 0: the data's token
  decay: float = 0.8                 # head k's loss weight is decay**k


@dataclasses.dataclass
class DataSection:
  files: list = dataclasses.field(default_factory=list)  # conversation files
  seq_len: int = 256
  batch_size: int = 8
  eval_fraction: float = 0.05


@dataclasses.dataclass
class OptimSection:
  learning_rate: float = 1e-3
  warmup_fraction: float = 0.1
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  grad_accum: int = 1
  vocab_chunk: int = 1024            # positions per chunk of the chunked vocab projection + CE


@dataclasses.dataclass
class Medusa2Section:
  heads_weight: float = 0.2          # loss = L_LM + heads_weight * heads loss
  lm_loss: str = "kl"                # L_LM: kl (to the frozen original; self-distilled data) or ce
  backbone_learning_rate: float = 2e-5


@dataclasses.dataclass
class CacheSection:
  hidden: bool = False               # Medusa-1: frozen backbone's hidden states computed once; a step
                                     # then draws batch_size * seq_len labelled positions
  dir: str = ""                      # keep those hidden states here and reuse them in later runs on
                                     # the same model and data (e.g. head sweeps)


@dataclasses.dataclass
class MeshSection:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1


@dataclasses.dataclass
class TrainConfig:
  output_dir: str = "runs/heads"
  method: str = "medusa1"            # medusa1: frozen backbone; medusa2: backbone trains jointly
  max_steps: int = 100
  seed: int = 0
  log_every: int = 10
  eval_every: int = 50
  eval_batches: int = 4
  save_every: int = 50
  keep_checkpoints: int = 2
  model: ModelSection = dataclasses.field(default_factory=ModelSection)
  heads: HeadsSection = dataclasses.field(default_factory=HeadsSection)
  data: DataSection = dataclasses.field(default_factory=DataSection)
  optim: OptimSection = dataclasses.field(default_factory=OptimSection)
  medusa2: Medusa2Section = dataclasses.field(default_factory=Medusa2Section)
  cache: CacheSection = dataclasses.field(default_factory=CacheSection)
  mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

  @classmethod
  def from_dict(cls, values: dict, overrides: Sequence[str] = ()) -> "TrainConfig":
    """A config from nested (or flat) values, then `key=value` overrides, checked."""
    config = cls()
    for k, v in values.items():
      _apply(config, str(k), v, str(k))
    for item in overrides:
      if "=" not in item:
        raise MedusaError(f"override {item!r} is not key=value")
      k, v = item.split("=", 1)
      _apply(config, k.strip(), yaml.safe_load(v), k.strip())
    _check(config)
    return config

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


# Flat names of earlier configs -> their place now.
FLAT_NAMES = {
    "num_heads": "heads.num_heads", "num_layers": "heads.num_layers",
    "share_lm_head": "heads.share_lm_head", "init_heads": "heads.init",
    "draft_vocab": "heads.draft_vocab", "teacher_top_k": "heads.teacher_top_k",
    "decay": "heads.decay", "compute_dtype": "model.compute_dtype", "seq_len": "data.seq_len",
    "batch_size": "data.batch_size", "eval_fraction": "data.eval_fraction",
    "learning_rate": "optim.learning_rate", "warmup_fraction": "optim.warmup_fraction",
    "weight_decay": "optim.weight_decay", "clip_norm": "optim.clip_norm",
    "grad_accum": "optim.grad_accum", "vocab_chunk": "optim.vocab_chunk",
    "heads_weight": "medusa2.heads_weight", "lm_loss": "medusa2.lm_loss",
    "backbone_learning_rate": "medusa2.backbone_learning_rate",
    "cache_hidden": "cache.hidden", "hidden_cache_dir": "cache.dir",
}
# Sections that a plain (non-mapping) value sets one key of: `model: X`, `data: [files]`.
SECTION_VALUE = {"model": "model.spec", "data": "data.files"}


def _apply(obj, key: str, value: Any, full_key: str):
  if obj.__class__ is TrainConfig:
    key = FLAT_NAMES.get(key, key)
    if key in SECTION_VALUE and not isinstance(value, dict):
      key = SECTION_VALUE[key]
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
      _apply(current, str(k), v, f"{full_key}.{k}")
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
  values = {}
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
  return TrainConfig.from_dict(values, overrides)


def _get(config: TrainConfig, key: str):
  for part in key.split("."):
    config = getattr(config, part)
  return config


def _check(config: TrainConfig) -> None:
  for key, choices in (("method", ("medusa1", "medusa2")), ("medusa2.lm_loss", ("kl", "ce")),
                       ("heads.head_type", HEAD_TYPES)):
    if _get(config, key) not in choices:
      raise MedusaError(f"config key {key!r} must be one of {', '.join(choices)}, "
                        f"got {_get(config, key)!r}")
  for key in ("model.spec", "output_dir"):
    if not _get(config, key):
      raise MedusaError(f"config key {key!r} must not be empty")
  for key in ("heads.num_heads", "heads.num_layers", "data.seq_len", "data.batch_size",
              "optim.grad_accum", "max_steps", "optim.vocab_chunk", "eval_batches", "save_every",
              "keep_checkpoints", "log_every", "mesh.data", "mesh.fsdp", "mesh.tensor"):
    if _get(config, key) < 1:
      raise MedusaError(f"config key {key!r} must be at least 1, got {_get(config, key)}")
  if config.eval_every < 0:
    raise MedusaError(f"config key 'eval_every' must be >= 0 (0: no evaluation), got {config.eval_every}")
  for key in ("optim.learning_rate", "medusa2.backbone_learning_rate"):
    if not _get(config, key) > 0:
      raise MedusaError(f"config key {key!r} must be positive, got {_get(config, key)}")
  for key in ("optim.warmup_fraction", "data.eval_fraction"):
    if not 0 <= _get(config, key) < 1:
      raise MedusaError(f"config key {key!r} must be in [0, 1), got {_get(config, key)}")
  heads = config.heads
  if heads.draft_vocab < 0:
    raise MedusaError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {heads.draft_vocab}")
  if heads.teacher_top_k < 0:
    raise MedusaError(f"teacher_top_k must be >= 0 (0: the data's tokens), got {heads.teacher_top_k}")
  if heads.teacher_top_k and config.method != "medusa1":
    raise MedusaError("teacher_top_k needs method medusa1 (the frozen backbone is the teacher)")
  if config.cache.hidden and config.method != "medusa1":
    raise MedusaError("cache_hidden needs method medusa1 (a frozen backbone)")
  if heads.head_type == "eagle":
    if config.method != "medusa1" or config.cache.hidden or heads.teacher_top_k:
      raise MedusaError("an eagle drafter trains with method medusa1 on sequences (no cache.hidden or "
                        "teacher_top_k)")
    if heads.ttt_steps < 1:
      raise MedusaError(f"config key 'heads.ttt_steps' must be at least 1, got {heads.ttt_steps}")
