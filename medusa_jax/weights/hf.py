"""The Hugging Face Llama layout, read and written: tensor names <-> the NNX backbone, and
directories (config.json, safetensors, tokenizer files).

One table (`_backbone_table`) maps every HF tensor to a parameter path of `Llama` with the
reshape each way; import (`llama_from_hf`, `read_dir`) and export (`llama_to_hf`, `write_dir`)
both read it.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError
from medusa_jax.model.config import ModelConfig
from medusa_jax.model.llama import Llama

Convert = Callable[[np.ndarray], np.ndarray]


def _backbone_table(c: ModelConfig) -> Iterator[tuple[str, tuple, Convert, Convert]]:
  """(hf_name, state path, hf->jax, jax->hf) for every backbone tensor."""
  e, h, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  t = np.transpose

  def heads_in(n):  # HF [n*d, e] -> [e, n, d]
    return (lambda w: t(w).reshape(e, n, d)), (lambda w: t(w.reshape(e, n * d)))

  yield "model.embed_tokens.weight", ("embed", "embedding"), np.asarray, np.asarray
  yield "model.norm.weight", ("norm", "scale"), np.asarray, np.asarray
  if not c.tie_embeddings:
    yield "lm_head.weight", ("lm_head", "kernel"), t, t
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    yield p + "input_layernorm.weight", ("layers", i, "attn_norm", "scale"), np.asarray, np.asarray
    yield p + "post_attention_layernorm.weight", ("layers", i, "mlp_norm", "scale"), np.asarray, np.asarray
    for name, n in (("q", h), ("k", kv), ("v", kv)):
      yield (p + f"self_attn.{name}_proj.weight", ("layers", i, "attn", name), *heads_in(n))
      if c.attention_bias:
        yield (p + f"self_attn.{name}_proj.bias", ("layers", i, "attn", f"{name}_bias"),
               lambda b, n=n: b.reshape(n, d), lambda b, n=n: b.reshape(n * d))
    yield (p + "self_attn.o_proj.weight", ("layers", i, "attn", "o"),
           lambda w: t(w).reshape(h, d, e), lambda w: t(w.reshape(h * d, e)))
    for name, mod in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      yield p + f"mlp.{name}.weight", ("layers", i, "mlp", mod, "kernel"), t, t


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def llama_from_hf(config: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                  param_dtype=jnp.float32) -> Llama:
  """Builds a `Llama` from HF-named tensors (PyTorch Linear layout `[out, in]`)."""
  abstract = nnx.eval_shape(
      lambda: Llama(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  )
  graphdef, state = nnx.split(abstract)
  pure: dict = {}
  for name, path, to_jax, _ in _backbone_table(config):
    if name not in tensors:
      raise MedusaError(f"checkpoint is missing the tensor {name!r}")
    value = to_jax(np.asarray(tensors[name]))
    expected = _get(state, path).get_value().shape
    if value.shape != expected:
      raise MedusaError(f"tensor {name!r} has shape {tensors[name].shape}, expected {expected} after conversion")
    _set(pure, path, jnp.asarray(value, dtype=param_dtype))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def llama_to_hf(model: Llama) -> dict[str, np.ndarray]:
  """HF-named float32 tensors of a `Llama` (the inverse of `llama_from_hf`)."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {
      name: np.ascontiguousarray(to_hf(np.asarray(_get(pure, path), np.float32)))
      for name, path, _, to_hf in _backbone_table(model.config)
  }


def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF directory: `model.safetensors` or a sharded `model.safetensors.index.json`."""
  from safetensors.numpy import load_file

  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise MedusaError(f"no .safetensors weights in {path}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise MedusaError(f"{file} is listed in the index but missing")
    try:
      tensors.update(_load_safetensors(file, load_file))
    except MedusaError:
      raise
    except Exception as e:  # safetensors raises several types for corrupt files
      raise MedusaError(f"cannot read {file}: {e}") from None
  return tensors


def _load_safetensors(file, load_file):
  """Loads a file; bfloat16 tensors (which NumPy cannot hold) go through ml_dtypes."""
  try:
    return load_file(file)
  except TypeError:
    from safetensors import safe_open
    out = {}
    with safe_open(file, framework="flax") as f:
      for k in f.keys():
        out[k] = np.asarray(jax.device_get(f.get_tensor(k))).astype(np.float32)
    return out


def read_dir(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32) -> tuple[Llama, object]:
  """Backbone and tokenizer of a HF Llama-family directory (config.json + safetensors, sharded
  index too; tokenizer files where present)."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise MedusaError(f"{path} has no config.json (not a Hugging Face model directory)")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise MedusaError(f"{cfg_file} is not valid JSON: {e}") from None
  config = ModelConfig.from_hf(hf)
  model = llama_from_hf(config, read_safetensors_dir(path), dtype=dtype, param_dtype=param_dtype)
  tokenizer = None
  if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
  return model, tokenizer


def write_dir(path: str, model: Llama, *, tokenizer=None, force: bool = False) -> None:
  """Writes `model` (float32) as a HF Llama directory, atomically; tokenizer files when given."""
  from safetensors.numpy import save_file

  with atomic_dir(path, force=force) as tmp:
    save_file(llama_to_hf(model), os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(model.config.to_hf(), f, indent=2)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
      tokenizer.save_pretrained(tmp)
