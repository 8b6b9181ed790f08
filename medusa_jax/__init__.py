"""medusa-jax: Medusa speculative decoding in JAX / Flax NNX.

    import medusa_jax
    engine = medusa_jax.load("smollm2-135m-instruct")
    print(engine.generate("Name three primes.").text)

Layout (each package's docstring says more): `model/` the backbone, `medusa/` heads, trees and
the drafting vocabulary, `decode/` sampling, acceptance, the decode loops and the `Engine`,
`weights/` GGUF / HF / model specs, `formats/` heads formats on disk, `training/` head training,
`tuning/` tree tuning, `cli/` the command-line tools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medusa_jax.medusa import DRAFT_VOCAB_SIZE as _DRAFT_VOCAB_SIZE
from medusa_jax.weights import EMBEDDED_MODEL

if TYPE_CHECKING:  # for type checkers and readers; at run time `__getattr__` imports these on first use
  from medusa_jax.decode.config import GenerationConfig
  from medusa_jax.decode.engine import Engine, Generation, GenerationResult
  from medusa_jax.errors import MedusaError
  from medusa_jax.model.config import ModelConfig, preset

# Public name -> the module that defines it. `import medusa_jax` stays light (no JAX, Flax or
# transformers): a name's module is imported the first time the name is used.
_LAZY = {
    "Engine": "medusa_jax.decode.engine",
    "Generation": "medusa_jax.decode.engine",
    "GenerationResult": "medusa_jax.decode.engine",
    "GenerationConfig": "medusa_jax.decode.config",
    "MedusaError": "medusa_jax.errors",
    "ModelConfig": "medusa_jax.model.config",
    "preset": "medusa_jax.model.config",
}


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


def load(spec: str = EMBEDDED_MODEL, *, heads: str | None = "default", tree=None,
         dtype: str = "float32", max_cache_len: int | None = None, seed: int = 0,
         draft_vocab: int = _DRAFT_VOCAB_SIZE, mesh=None, draft_model: str | None = None) -> Engine:
  """Loads a model spec (see `medusa_jax.weights.specs`) and Medusa heads into an `Engine`.

  `heads`: "default" (the project's shipped heads for the embedded model, none otherwise), a
  Medusa/TGI, vLLM or orbax training directory, or None for the base model alone. `tree`: a tree
  name or list of paths (default: the tree shipped with the heads, else `mc_sim_7b_63` cut to the
  heads' depth; with its tree, Medusa also grafts on the prompt-lookup chain `tree.json` names).
  `draft_vocab`: the heads guess among the N most frequent answer tokens listed in
  the heads directory's `draft_vocab.json` (0, or no such file: the whole vocabulary; see
  `medusa_jax.medusa.draft_vocab`). `mesh`: run sharded over a `jax.sharding.Mesh` with axes
  (data, fsdp, tensor) or one given as text, `"data=2,tensor=4"` (tensor-parallel weights and KV
  cache, data-parallel rows; `Engine`). `draft_model`: what `mode="draft"` drafts with, "self:L"
  (this model's first L layers) or a model spec with the same tokenizer.
  """
  from medusa_jax.cache import enable_compilation_cache
  from medusa_jax.decode.engine import Engine
  from medusa_jax.formats.layout import read_heads
  from medusa_jax.medusa import draft_vocab as draft_file
  from medusa_jax.medusa.tree import default_tree
  from medusa_jax.model.sharding import parse_mesh
  from medusa_jax.weights import specs

  enable_compilation_cache()
  loaded = specs.load(spec, dtype=dtype, seed=seed)
  heads_path = specs.default_heads(spec) if heads == "default" else heads
  medusa_heads = read_heads(heads_path, loaded.model) if heads_path else None
  engine_tree, ids, lookup = None, None, 0
  if medusa_heads is not None:
    shipped = default_tree(heads_path, medusa_heads.config.num_heads)
    engine_tree, lookup = (shipped.paths, shipped.lookup) if tree is None else (tree, 0)
    ids = draft_file.read(heads_path, draft_vocab)
  engine = Engine(loaded.model, loaded.tokenizer, heads=medusa_heads, tree=engine_tree,
                  name=loaded.name, max_cache_len=max_cache_len, draft_vocab=ids,
                  mesh=parse_mesh(mesh) if isinstance(mesh, str) else mesh, lookup=lookup)
  if draft_model and not draft_model.startswith("self:"):
    drafter = specs.load(draft_model, dtype=dtype, seed=seed)
    engine.set_draft_model(drafter.model, drafter.tokenizer)
  else:
    engine.set_draft_model(draft_model)
  return engine


__all__ = ["Engine", "Generation", "GenerationConfig", "GenerationResult", "MedusaError",
           "ModelConfig", "load", "preset", "EMBEDDED_MODEL"]
