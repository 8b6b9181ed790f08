"""Medusa heads in vLLM's layout, read and written.

`config.json` with `model_type: medusa`, `hidden_size`, `vocab_size`, `num_heads`,
`num_hidden_layers`, `medusa_fc_bias: true`; `model.safetensors` with
`blocks.{h}.layers.{l}.weight|bias` and `lm_heads.{h}.weight` (copies of the base lm_head for
heads that share it). With a drafting vocabulary, also `token_map` (its ids) and
`truncated_vocab_size`, from which vLLM's Medusa proposes only those ids.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError
from medusa_jax.formats import medusa as medusa_format
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
from medusa_jax.model.llama import Llama

WEIGHTS = "model.safetensors"


def holds(path: str) -> bool:
  """Whether `path` is a vLLM Medusa directory."""
  cfg = os.path.join(path, "config.json")
  if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(path, WEIGHTS))):
    return False
  try:
    with open(cfg) as f:
      return json.load(f).get("model_type") == "medusa"
  except (OSError, ValueError, AttributeError):
    return False


def write(path: str, heads: MedusaHeads, model: Llama, *, base_model: str,
          draft_ids: np.ndarray | None = None, force: bool = False) -> None:
  """Writes `heads` (for `model`) as a vLLM Medusa directory, atomically."""
  from safetensors.numpy import save_file

  c, n = model.config, heads.config.num_layers
  src = medusa_format.to_tensors(heads, model)
  tensors = {}
  for h in range(heads.config.num_heads):
    for l in range(n):
      tensors[f"blocks.{h}.layers.{l}.weight"] = src[f"{h}.{l}.linear.weight"]
      tensors[f"blocks.{h}.layers.{l}.bias"] = src[f"{h}.{l}.linear.bias"]
    tensors[f"lm_heads.{h}.weight"] = src[f"{h}.{n}.weight"]  # vLLM keeps the token_map rows
  if draft_ids is not None:
    tensors["token_map"] = np.asarray(draft_vocab.check(draft_ids, c.vocab_size), np.int64)
  config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "num_heads": heads.config.num_heads, "num_hidden_layers": n,
            "medusa_fc_bias": True,
            "truncated_vocab_size": None if draft_ids is None else len(draft_ids),
            "base_model_name_or_path": base_model}
  with atomic_dir(path, force=force) as tmp:
    save_file(tensors, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)


def read(path: str, model: Llama) -> MedusaHeads:
  """Reads a vLLM Medusa directory for `model` (its full lm_heads; `token_map` is not needed)."""
  from safetensors.numpy import load_file

  try:
    with open(os.path.join(path, "config.json")) as f:
      cfg = json.load(f)
    tensors = load_file(os.path.join(path, WEIGHTS))
  except Exception as e:
    raise MedusaError(f"cannot read {path}: {e}") from None
  e, v = model.config.hidden_size, model.config.vocab_size
  if cfg.get("hidden_size", e) != e or cfg.get("vocab_size", v) != v:
    raise MedusaError(f"heads have hidden_size {cfg.get('hidden_size')} / vocab_size "
                      f"{cfg.get('vocab_size')} but the base model has {e} / {v}")
  if not isinstance(cfg.get("num_heads"), int) or not isinstance(cfg.get("num_hidden_layers", 1), int):
    raise MedusaError(f"{path}/config.json needs an integer num_heads (and num_hidden_layers)")
  num_heads, n = cfg["num_heads"], cfg.get("num_hidden_layers", 1)
  heads = MedusaHeads.for_model(model, HeadsConfig(num_heads, n, share_lm_head=False))

  def get(name, shape):
    if name not in tensors or tuple(tensors[name].shape) != shape:
      raise MedusaError(f"{path}: tensor {name!r} missing or not of shape {shape}")
    return jnp.asarray(tensors[name])

  for h in range(num_heads):
    for l in range(n):
      heads.blocks[h][l].linear.kernel[...] = get(f"blocks.{h}.layers.{l}.weight", (e, e)).T
      heads.blocks[h][l].linear.bias[...] = get(f"blocks.{h}.layers.{l}.bias", (e,))
    heads.lm_heads[h].kernel[...] = get(f"lm_heads.{h}.weight", (v, e)).T
  return heads
