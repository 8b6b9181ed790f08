"""An EAGLE-3-style drafter (`medusa/eagle.py`) on disk, in the EAGLE-3 reference's layout.

`config.json`: a Llama config of the drafter's layer (`hidden_size`, heads, `intermediate_size`,
`rms_norm_eps`, `rope_theta`, the target's `vocab_size`), `draft_vocab_size`, the tapped target
layers `eagle_config.eagle_aux_hidden_state_layer_ids`, `"head_type": "eagle"` and the default
tree (`medusa_jax.width/depth/budget`). `model.safetensors` holds PyTorch-layout (`[out, in]`)
tensors: `fc.weight`, `midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
`midlayer.self_attn.{q,k,v,o}_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`,
`norm.weight`, `lm_head.weight` `[draft_vocab, hidden]`, and the vocabulary maps `d2t` (draft id
i is target id `i + d2t[i]`, ids ascending) and `t2d` (`[vocab]` bool: in the drafting vocabulary).
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.eagle import EagleConfig, EagleHead
from medusa_jax.model.llama import Llama

WEIGHTS = "model.safetensors"


def holds(path: str) -> bool:
  """Whether `path` holds an EAGLE drafter."""
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f).get("head_type") == "eagle"
  except (OSError, ValueError, AttributeError):
    return False


def _tensors(head: EagleHead) -> dict[str, np.ndarray]:
  """The drafter's weights by reference name, `[out, in]`, in its own column order."""
  a = head.attn

  def t(x):
    return np.asarray(x[...], np.float32)

  h, d, e = a.o.shape
  return {
      "fc.weight": t(head.fc.kernel).T,
      "midlayer.input_layernorm.weight": t(head.input_norm.scale),
      "midlayer.hidden_norm.weight": t(head.hidden_norm.scale),
      "midlayer.post_attention_layernorm.weight": t(head.mlp_norm.scale),
      "midlayer.self_attn.q_proj.weight": t(a.q).reshape(-1, h * d).T,
      "midlayer.self_attn.k_proj.weight": t(a.k).reshape(t(a.k).shape[0], -1).T,
      "midlayer.self_attn.v_proj.weight": t(a.v).reshape(t(a.v).shape[0], -1).T,
      "midlayer.self_attn.o_proj.weight": t(a.o).reshape(h * d, e).T,
      "midlayer.mlp.gate_proj.weight": t(head.mlp.gate.kernel).T,
      "midlayer.mlp.up_proj.weight": t(head.mlp.up.kernel).T,
      "midlayer.mlp.down_proj.weight": t(head.mlp.down.kernel).T,
      "norm.weight": t(head.norm.scale),
      "lm_head.weight": t(head.lm_head.kernel).T,
  }


def write(path: str, head: EagleHead, ids: np.ndarray, model: Llama, *, base_model: str,
          force: bool = False) -> None:
  """Writes the drafter `head` (its `lm_head` columns are the token ids `ids`) for `model`,
  atomically."""
  from safetensors.numpy import save_file

  m, c = model.config, head.config
  ids = np.asarray(ids, np.int64)
  order = np.argsort(ids, kind="stable")  # the reference lists draft ids ascending
  tensors = _tensors(head)
  tensors["lm_head.weight"] = tensors["lm_head.weight"][order]
  tensors["d2t"] = ids[order] - np.arange(len(ids))
  t2d = np.zeros(m.vocab_size, bool)
  t2d[ids] = True
  tensors["t2d"] = t2d
  config = {
      "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "head_type": "eagle",
      "base_model_name_or_path": base_model, "hidden_size": m.hidden_size,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
      "intermediate_size": m.intermediate_size, "rms_norm_eps": m.rms_norm_eps, "rope_theta": m.rope_theta,
      "vocab_size": m.vocab_size, "draft_vocab_size": len(ids), "num_hidden_layers": 1,
      "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(c.taps)},
      "medusa_jax": {"width": c.width, "depth": c.depth, "budget": c.budget},
  }
  with atomic_dir(path, force=force) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)


def read(path: str, model: Llama) -> tuple[EagleHead, np.ndarray]:
  """(the drafter, its drafting vocabulary's token ids) from `path`, checked against `model`."""
  from safetensors.numpy import load_file

  cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, WEIGHTS)
  if not os.path.isfile(cfg_file) or not os.path.isfile(weights):
    raise MedusaError(f"{path} is not an EAGLE drafter directory (needs config.json and {WEIGHTS})")
  try:
    with open(cfg_file) as f:
      cfg = json.load(f)
    taps = tuple(int(i) for i in cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
    tree = cfg.get("medusa_jax", {})
    config = EagleConfig(taps, int(cfg["draft_vocab_size"]), **{k: int(v) for k, v in tree.items()})
  except MedusaError as e:
    raise MedusaError(f"{cfg_file}: {e}") from None
  except (ValueError, KeyError, TypeError) as e:
    raise MedusaError(f"{cfg_file} is not a valid EAGLE config ({type(e).__name__}: {e})") from None
  m = model.config
  for key, expected in (("hidden_size", m.hidden_size), ("vocab_size", m.vocab_size)):
    if key in cfg and int(cfg[key]) != expected:
      raise MedusaError(f"the EAGLE drafter has {key} {cfg[key]} but the base model has {expected}")
  try:
    tensors = load_file(weights)
  except Exception as e:
    raise MedusaError(f"cannot read {weights}: {e}") from None
  ids = np.arange(config.draft_vocab_size) + tensors.get("d2t", np.zeros(0, np.int64))
  if "d2t" not in tensors or ids.min() < 0 or ids.max() >= m.vocab_size:
    raise MedusaError(f"{weights}: d2t is missing or maps outside the target's vocabulary")
  head = EagleHead.for_model(model, config, ids.astype(np.int32), param_dtype=model.dtype)
  want = _tensors(head)
  for name, expected in want.items():
    if name not in tensors:
      raise MedusaError(f"{weights} is missing the tensor {name!r}")
    if tensors[name].shape != expected.shape:
      raise MedusaError(f"tensor {name!r} has shape {tensors[name].shape}, expected {expected.shape} "
                        "for this base model")
  a, dtype = head.attn, model.dtype

  def put(var, value):
    var[...] = jnp.asarray(value.reshape(var[...].shape), dtype)

  put(head.fc.kernel, tensors["fc.weight"].T)
  put(head.input_norm.scale, tensors["midlayer.input_layernorm.weight"])
  put(head.hidden_norm.scale, tensors["midlayer.hidden_norm.weight"])
  put(head.mlp_norm.scale, tensors["midlayer.post_attention_layernorm.weight"])
  for name, var in (("q", a.q), ("k", a.k), ("v", a.v)):
    put(var, tensors[f"midlayer.self_attn.{name}_proj.weight"].T)
  put(a.o, tensors["midlayer.self_attn.o_proj.weight"].T)
  for name in ("gate", "up", "down"):
    put(getattr(head.mlp, name).kernel, tensors[f"midlayer.mlp.{name}_proj.weight"].T)
  put(head.norm.scale, tensors["norm.weight"])
  put(head.lm_head.kernel, tensors["lm_head.weight"].T)
  return head, ids.astype(np.int32)
