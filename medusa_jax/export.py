"""Conversions between our checkpoints and the formats serving tools load.

- `medusa`: Medusa v0.1 / TGI directory (see `heads_io`), per-head lm_head always written
  (copies of the base lm_head when training shared it).
- `vllm`: `config.json` with `model_type: medusa` + `model.safetensors` holding
  `blocks.{h}.layers.{l}.weight|bias` and `lm_heads.{h}.weight`; with a drafting vocabulary, also
  `token_map` (its ids) and `truncated_vocab_size`, from which vLLM's Medusa proposes only those ids.
- `hf-llama`: the backbone as a Hugging Face Llama directory (config.json, model.safetensors,
  tokenizer files where known).
`read_heads` reads any of these or an orbax training directory. Writes are atomic (a temporary
directory renamed at the end) and never replace an existing output without `force`.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from medusa_jax import draft_vocab
from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError
from medusa_jax.heads import HeadsConfig, MedusaHeads
from medusa_jax.heads_io import WEIGHTS, heads_to_tensors, load_heads
from medusa_jax.hf_weights import llama_to_hf
from medusa_jax.llama import Llama

FORMATS = ("medusa", "vllm", "hf-llama")


def _base_lm_head(model: Llama) -> np.ndarray:
  """`[vocab, embed]` (PyTorch layout) base lm_head."""
  w = model.embed.embedding[...] if model.lm_head is None else model.lm_head.kernel[...].T
  return np.asarray(w, np.float32)


def medusa_tensors(heads: MedusaHeads, model: Llama) -> dict[str, np.ndarray]:
  tensors = heads_to_tensors(heads, include_lm_heads=True)
  n = heads.config.num_layers
  for h in range(heads.config.num_heads):
    tensors.setdefault(f"{h}.{n}.weight", _base_lm_head(model))
  return tensors


def export(fmt: str, out: str, *, model: Llama, heads: MedusaHeads | None, base_name: str,
           tokenizer=None, force: bool = False, draft_ids: np.ndarray | None = None) -> None:
  """Writes `fmt` to `out`. `draft_ids`: the heads' drafting vocabulary (vllm's `token_map`; a
  `draft_vocab.json` in medusa format), None for the whole vocabulary."""
  from safetensors.numpy import save_file

  if fmt not in FORMATS:
    raise MedusaError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
  if fmt != "hf-llama" and heads is None:
    raise MedusaError(f"format {fmt} needs heads (--heads)")
  c = model.config
  if draft_ids is not None:
    draft_ids = draft_vocab.check(draft_ids, c.vocab_size)
  with atomic_dir(out, force=force) as tmp:
    if fmt == "medusa":
      save_file(medusa_tensors(heads, model), os.path.join(tmp, WEIGHTS))
      if draft_ids is not None:
        draft_vocab.save(tmp, draft_ids)
      config = {"base_model_name_or_path": base_name, "medusa_num_heads": heads.config.num_heads,
                "medusa_num_layers": heads.config.num_layers, "hidden_size": c.hidden_size,
                "vocab_size": c.vocab_size}
    elif fmt == "vllm":
      src = medusa_tensors(heads, model)
      n = heads.config.num_layers
      tensors = {}
      for h in range(heads.config.num_heads):
        for l in range(n):
          tensors[f"blocks.{h}.layers.{l}.weight"] = src[f"{h}.{l}.linear.weight"]
          tensors[f"blocks.{h}.layers.{l}.bias"] = src[f"{h}.{l}.linear.bias"]
        tensors[f"lm_heads.{h}.weight"] = src[f"{h}.{n}.weight"]  # vLLM keeps the token_map rows
      if draft_ids is not None:
        tensors["token_map"] = np.asarray(draft_ids, np.int64)
      save_file(tensors, os.path.join(tmp, "model.safetensors"))
      config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": c.hidden_size,
                "vocab_size": c.vocab_size, "num_heads": heads.config.num_heads,
                "num_hidden_layers": n, "medusa_fc_bias": True,
                "truncated_vocab_size": None if draft_ids is None else len(draft_ids),
                "base_model_name_or_path": base_name}
    else:
      save_file(llama_to_hf(model), os.path.join(tmp, "model.safetensors"))
      config = c.to_hf()
      if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)


def read_heads(path: str, model: Llama) -> MedusaHeads:
  """Heads from a Medusa/TGI directory, a vLLM Medusa directory, or an orbax training directory."""
  cfg_file = os.path.join(path, "config.json")
  if os.path.isfile(os.path.join(path, "train_config.json")):
    from medusa_jax.train_config import load_config
    from medusa_jax.trainer import trained_model

    overrides = [f"{k}={json.dumps(v)}" for k, v in _flatten(_read_json(os.path.join(path, "train_config.json"))).items()]
    return trained_model(load_config(None, overrides + [f"output_dir={path}"]), model)[1]
  if os.path.isfile(cfg_file) and os.path.isfile(os.path.join(path, "model.safetensors")):
    cfg = _read_json(cfg_file)
    if cfg.get("model_type") == "medusa":
      return _read_vllm(path, cfg, model)
  return load_heads(path, model)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise MedusaError(f"cannot read {path}: {e}") from None
  if not isinstance(out, dict):
    raise MedusaError(f"{path} must hold a JSON object")
  return out


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _read_vllm(path: str, cfg: dict, model: Llama) -> MedusaHeads:
  from safetensors.numpy import load_file

  try:
    tensors = load_file(os.path.join(path, "model.safetensors"))
  except Exception as e:
    raise MedusaError(f"cannot read {path}/model.safetensors: {e}") from None
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
