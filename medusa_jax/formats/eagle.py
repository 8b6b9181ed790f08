"""An EAGLE-3-style drafter (`medusa/eagle.py`) on disk, in the two layouts vLLM and SGLang load:

- `eagle3` (the EAGLE-3 reference's, what training writes): `config.json` is a Llama config of the
  drafter's layer (`hidden_size`, heads, `intermediate_size`, `rms_norm_eps`, `rope_theta`, the
  target's `vocab_size`) with `"architectures": ["LlamaForCausalLMEagle3"]`, `draft_vocab_size`,
  the tapped target layers `eagle_aux_hidden_state_layer_ids` (also under `eagle_config`), and
  this project's `"head_type": "eagle"` and default tree (`medusa_jax.width/depth/budget`); the
  layer's tensors are `midlayer.*`.
- `speculators` (the `speculators` package's Eagle3 format): `speculators_model_type: eagle3`,
  the layer's config as `transformer_layer_config`, `norm_before_residual: false`, the verifier
  and proposal settings under `speculators_config`; the layer's tensors are `layers.0.*`.

`model.safetensors` holds PyTorch-layout (`[out, in]`) tensors: `fc.weight` `[hidden, 3 * hidden]`,
`{layer}.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`,
`{layer}.self_attn.{q,k,v,o}_proj.weight` (q/k/v read `[embed ; fused]`, `2 * hidden`),
`{layer}.mlp.{gate,up,down}_proj.weight`, `norm.weight`, `lm_head.weight` `[draft_vocab, hidden]`,
and the vocabulary maps `d2t` (int64: draft id i is target id `i + d2t[i]`, ids ascending) and
`t2d` (`[vocab]` bool: in the drafting vocabulary).
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
LAYOUTS = {"eagle3": "midlayer", "speculators": "layers.0"}  # layout -> the layer's tensor prefix


def _config(path: str) -> dict | None:
  try:
    with open(os.path.join(path, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def holds(path: str) -> bool:
  """Whether `path` holds an EAGLE drafter (either layout)."""
  config = _config(path) or {}
  return config.get("head_type") == "eagle" or config.get("speculators_model_type") == "eagle3"


def _tensors(head: EagleHead, layer: str) -> dict[str, np.ndarray]:
  """The drafter's weights by name, `[out, in]`, in its own column order."""
  a = head.attn

  def t(x):
    return np.asarray(x[...], np.float32)

  h, d, e = a.o.shape
  return {
      "fc.weight": t(head.fc.kernel).T,
      f"{layer}.input_layernorm.weight": t(head.input_norm.scale),
      f"{layer}.hidden_norm.weight": t(head.hidden_norm.scale),
      f"{layer}.post_attention_layernorm.weight": t(head.mlp_norm.scale),
      f"{layer}.self_attn.q_proj.weight": t(a.q).reshape(-1, h * d).T,
      f"{layer}.self_attn.k_proj.weight": t(a.k).reshape(t(a.k).shape[0], -1).T,
      f"{layer}.self_attn.v_proj.weight": t(a.v).reshape(t(a.v).shape[0], -1).T,
      f"{layer}.self_attn.o_proj.weight": t(a.o).reshape(h * d, e).T,
      f"{layer}.mlp.gate_proj.weight": t(head.mlp.gate.kernel).T,
      f"{layer}.mlp.up_proj.weight": t(head.mlp.up.kernel).T,
      f"{layer}.mlp.down_proj.weight": t(head.mlp.down.kernel).T,
      "norm.weight": t(head.norm.scale),
      "lm_head.weight": t(head.lm_head.kernel).T,
  }


def _layer_config(model: Llama) -> dict:
  m = model.config
  return {"model_type": "llama", "hidden_size": m.hidden_size, "num_attention_heads": m.num_heads,
          "num_key_value_heads": m.num_kv_heads, "head_dim": m.head_dim,
          "intermediate_size": m.intermediate_size, "rms_norm_eps": m.rms_norm_eps, "rope_theta": m.rope_theta,
          "rope_scaling": m.rope_scaling, "max_position_embeddings": m.max_position_embeddings,
          "vocab_size": m.vocab_size, "num_hidden_layers": 1, "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False}


def write(path: str, head: EagleHead, ids: np.ndarray, model: Llama, *, base_model: str,
          layout: str = "eagle3", dtype: str = "float32", force: bool = False) -> None:
  """Writes the drafter `head` (its `lm_head` columns are the token ids `ids`) for `model` in
  `layout` ("eagle3" or "speculators"), its weights in `dtype` (float32, float16), atomically."""
  from safetensors.numpy import save_file

  if layout not in LAYOUTS:
    raise MedusaError(f"unknown EAGLE layout {layout!r}; use one of {', '.join(LAYOUTS)}")
  c = head.config
  ids = np.asarray(ids, np.int64)
  order = np.argsort(ids, kind="stable")  # both layouts list draft ids ascending
  tensors = {k: v.astype(dtype) for k, v in _tensors(head, LAYOUTS[layout]).items()}
  tensors["lm_head.weight"] = tensors["lm_head.weight"][order]
  tensors["d2t"] = ids[order] - np.arange(len(ids))
  t2d = np.zeros(model.config.vocab_size, bool)
  t2d[ids] = True
  tensors["t2d"] = t2d
  taps = list(c.taps)
  tree = {"width": c.width, "depth": c.depth, "budget": c.budget}
  if layout == "eagle3":
    config = {"architectures": ["LlamaForCausalLMEagle3"], **_layer_config(model), "head_type": "eagle",
              "base_model_name_or_path": base_model, "draft_vocab_size": len(ids),
              "target_hidden_size": model.config.hidden_size, "eagle_aux_hidden_state_layer_ids": taps,
              "eagle_config": {"eagle_aux_hidden_state_layer_ids": taps, "use_aux_hidden_state": True},
              "torch_dtype": dtype, "medusa_jax": tree}
  else:
    config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
              "transformer_layer_config": {**_layer_config(model), "torch_dtype": dtype}, "draft_vocab_size": len(ids),
              "norm_before_residual": False, "target_hidden_size": model.config.hidden_size,
              "eagle_aux_hidden_state_layer_ids": taps,
              "speculators_config": {
                  "algorithm": "eagle3", "default_proposal_method": "greedy",
                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.depth,
                                        "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                  "verifier": {"name_or_path": base_model, "architectures": ["LlamaForCausalLM"]}},
              "medusa_jax": tree}
  with atomic_dir(path, force=force) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config, f, indent=2)


def read(path: str, model: Llama) -> tuple[EagleHead, np.ndarray]:
  """(the drafter, its drafting vocabulary's token ids) from `path` (either layout), checked
  against `model`."""
  from safetensors.numpy import load_file

  cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, WEIGHTS)
  cfg = _config(path)
  if cfg is None or not os.path.isfile(weights):
    raise MedusaError(f"{path} is not an EAGLE drafter directory (needs config.json and {WEIGHTS})")
  speculators = cfg.get("speculators_model_type") == "eagle3"
  layer_cfg = cfg.get("transformer_layer_config", {}) if speculators else cfg
  try:
    if speculators and cfg.get("norm_before_residual", True):
      raise MedusaError("norm_before_residual true (the residual after hidden_norm) is not this "
                        "project's EAGLE layer")
    taps = cfg.get("eagle_aux_hidden_state_layer_ids") or cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    config = EagleConfig(tuple(int(i) for i in taps), int(cfg["draft_vocab_size"]),
                         **{k: int(v) for k, v in cfg.get("medusa_jax", {}).items()})
  except MedusaError as e:
    raise MedusaError(f"{cfg_file}: {e}") from None
  except (ValueError, KeyError, TypeError) as e:
    raise MedusaError(f"{cfg_file} is not a valid EAGLE config ({type(e).__name__}: {e})") from None
  m = model.config
  for key, expected in (("hidden_size", m.hidden_size), ("vocab_size", m.vocab_size)):
    if key in layer_cfg and int(layer_cfg[key]) != expected:
      raise MedusaError(f"the EAGLE drafter has {key} {layer_cfg[key]} but the base model has {expected}")
  try:
    tensors = load_file(weights)
  except Exception as e:
    raise MedusaError(f"cannot read {weights}: {e}") from None
  if "d2t" not in tensors:
    raise MedusaError(f"{weights} has no d2t (the drafting vocabulary's token ids)")
  ids = np.arange(config.draft_vocab_size) + tensors["d2t"]
  if ids.min() < 0 or ids.max() >= m.vocab_size:
    raise MedusaError(f"{weights}: d2t maps outside the target's vocabulary")
  head = EagleHead.for_model(model, config, ids.astype(np.int32), param_dtype=model.dtype)
  layer = LAYOUTS["speculators" if speculators else "eagle3"]
  for name, expected in _tensors(head, layer).items():
    if name not in tensors:
      raise MedusaError(f"{weights} is missing the tensor {name!r}")
    if tensors[name].shape != expected.shape:
      raise MedusaError(f"tensor {name!r} has shape {tensors[name].shape}, expected {expected.shape} "
                        "for this base model")
  a, dtype = head.attn, model.dtype

  def put(var, name):
    var[...] = jnp.asarray(tensors[name].T.reshape(var[...].shape), dtype)

  put(head.fc.kernel, "fc.weight")
  put(head.input_norm.scale, f"{layer}.input_layernorm.weight")
  put(head.hidden_norm.scale, f"{layer}.hidden_norm.weight")
  put(head.mlp_norm.scale, f"{layer}.post_attention_layernorm.weight")
  for name, var in (("q", a.q), ("k", a.k), ("v", a.v), ("o", a.o)):
    put(var, f"{layer}.self_attn.{name}_proj.weight")
  for name in ("gate", "up", "down"):
    put(getattr(head.mlp, name).kernel, f"{layer}.mlp.{name}_proj.weight")
  put(head.norm.scale, "norm.weight")
  put(head.lm_head.kernel, "lm_head.weight")
  return head, ids.astype(np.int32)
