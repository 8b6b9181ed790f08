"""Medusa heads in the Medusa v0.1 / TGI layout, read and written.

`config.json` holds `medusa_num_heads`, `medusa_num_layers`, `hidden_size`, `vocab_size`,
`base_model_name_or_path`, `share_lm_head`; `medusa_lm_head.safetensors` holds
`{h}.{l}.linear.weight` `[out, in]`, `{h}.{l}.linear.bias` and, for per-head vocab projections,
`{h}.{num_layers}.weight` `[vocab, embed]`. Hydra heads (`"head_type": "hydra"`, which only this
project reads: they draft depth by depth from the path's tokens) add `{h}.input.weight`
`[embed, 3 * embed]`. Heads that share the base lm_head are written with
copies of it (`lm_head_copies=True`, what Medusa and TGI load) or without (a compact directory only
this project reads, as training writes it; TGI's legacy "V2" layout also has none). An optional
`draft_vocab.json` beside them is the heads' drafting vocabulary (Medusa and TGI ignore it). For
those tools, whose heads take the top-k of the whole vocabulary, `zero_outside_draft` writes the
vocab projection's rows outside the drafting vocabulary as zeros: a trained head's best drafting
logit is positive, so their top-k is the drafting vocabulary's, which the heads were trained on.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
from medusa_jax.model.llama import Llama

WEIGHTS = "medusa_lm_head.safetensors"


def to_tensors(heads: MedusaHeads, model: Llama | None = None,
               keep_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Medusa-layout float32 tensors of `heads`; heads sharing the base lm_head get copies of
  `model`'s (none when `model` is None). `keep_rows`: token ids whose vocab projection rows are
  kept; the others are written as zeros (None: all kept)."""
  n = heads.config.num_layers
  out = {}
  for h, blocks in enumerate(heads.blocks):
    for l, block in enumerate(blocks):
      out[f"{h}.{l}.linear.weight"] = np.asarray(block.linear.kernel[...], np.float32).T.copy()
      out[f"{h}.{l}.linear.bias"] = np.asarray(block.linear.bias[...], np.float32)
    if heads.config.head_type == "hydra":
      out[f"{h}.input.weight"] = np.asarray(heads.inputs[h].kernel[...], np.float32).T.copy()
    if heads.lm_heads is not None:
      out[f"{h}.{n}.weight"] = np.asarray(heads.lm_heads[h].kernel[...], np.float32).T.copy()
    elif model is not None:
      out[f"{h}.{n}.weight"] = np.asarray(model.lm_head_kernel(), np.float32).T.copy()
    if keep_rows is not None and f"{h}.{n}.weight" in out:
      rows = out[f"{h}.{n}.weight"]
      dropped = np.ones(len(rows), bool)
      dropped[keep_rows] = False
      rows[dropped] = 0.0
  return out


def write(path: str, heads: MedusaHeads, model: Llama, *, base_model: str,
          lm_head_copies: bool = True, draft_ids: np.ndarray | None = None,
          draft_tokens_counted: int | None = None, zero_outside_draft: bool = False,
          force: bool = False) -> None:
  """Writes `heads` (for `model`) as a Medusa directory, atomically; `draft_ids`: their drafting
  vocabulary (and how many answer tokens ranked it), kept as `draft_vocab.json`, and with
  `zero_outside_draft` the only rows of the written vocab projections that are not zero."""
  from safetensors.numpy import save_file

  c, m = heads.config, model.config
  keep = draft_ids if zero_outside_draft and draft_ids is not None else None
  config = {"base_model_name_or_path": base_model, "medusa_num_heads": c.num_heads,
            "medusa_num_layers": c.num_layers, "hidden_size": m.hidden_size, "vocab_size": m.vocab_size,
            "share_lm_head": c.share_lm_head and keep is None}  # zeroed rows: no longer the base's
  if c.head_type != "medusa":
    config["head_type"] = c.head_type
  if draft_ids is not None:
    draft_ids = draft_vocab.check(draft_ids, m.vocab_size)
  with atomic_dir(path, force=force) as tmp:
    save_file(to_tensors(heads, model if lm_head_copies else None, keep), os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    if draft_ids is not None:
      draft_vocab.save(tmp, draft_ids, draft_tokens_counted)


def read(path: str, model: Llama) -> MedusaHeads:
  """Reads a Medusa directory for `model`, checking head sizes against the base model."""
  from safetensors.numpy import load_file

  cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, WEIGHTS)
  if not os.path.isdir(path):
    raise MedusaError(f"heads directory not found: {path}")
  if not os.path.isfile(cfg_file) or not os.path.isfile(weights):
    raise MedusaError(f"{path} is not a Medusa heads directory (needs config.json and {WEIGHTS})")
  try:
    with open(cfg_file) as f:
      cfg = json.load(f)
    num_heads, num_layers = int(cfg["medusa_num_heads"]), int(cfg.get("medusa_num_layers", 1))
    head_type = str(cfg.get("head_type", "medusa"))
    HeadsConfig(head_type=head_type)
  except MedusaError as e:
    raise MedusaError(f"{cfg_file}: {e}") from None
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise MedusaError(f"{cfg_file} is not a valid Medusa config ({type(e).__name__}: {e})") from None
  try:
    tensors = load_file(weights)
  except Exception as e:
    raise MedusaError(f"cannot read {weights}: {e}") from None
  e, v = model.config.hidden_size, model.config.vocab_size
  for key, expected in (("hidden_size", e), ("vocab_size", v)):
    if key in cfg and int(cfg[key]) != expected:
      raise MedusaError(f"heads have {key} {cfg[key]} but the base model has {expected}")
  own_lm = all(f"{h}.{num_layers}.weight" in tensors for h in range(num_heads))
  share = bool(cfg.get("share_lm_head", not own_lm))
  heads = MedusaHeads.for_model(model, HeadsConfig(num_heads, num_layers, share, head_type))

  def get(name, shape):
    if name not in tensors:
      raise MedusaError(f"{weights} is missing the tensor {name!r}")
    if tuple(tensors[name].shape) != shape:
      raise MedusaError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                        "for this base model")
    return jnp.asarray(tensors[name], heads.blocks[0][0].linear.kernel[...].dtype)

  for h, blocks in enumerate(heads.blocks):
    for l, block in enumerate(blocks):
      block.linear.kernel[...] = get(f"{h}.{l}.linear.weight", (e, e)).T
      block.linear.bias[...] = get(f"{h}.{l}.linear.bias", (e,))
    if not share:
      heads.lm_heads[h].kernel[...] = get(f"{h}.{num_layers}.weight", (v, e)).T
    if head_type == "hydra":
      heads.inputs[h].kernel[...] = get(f"{h}.input.weight", (e, 3 * e)).T
  return heads
