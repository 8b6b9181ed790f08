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
  Medusa/TGI, vLLM, EAGLE drafter or orbax training directory, or None for the base model alone
  (`load_heads`). `tree`: a tree
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
  from medusa_jax.model.sharding import parse_mesh
  from medusa_jax.weights import specs

  enable_compilation_cache()
  loaded = specs.load(spec, dtype=dtype, seed=seed)
  engine = Engine(loaded.model, loaded.tokenizer, name=loaded.name, max_cache_len=max_cache_len,
                  mesh=parse_mesh(mesh) if isinstance(mesh, str) else mesh)
  heads_path = specs.default_heads(spec) if heads == "default" else heads
  if heads_path:
    engine = load_heads(engine, heads_path, tree=tree, draft_vocab=draft_vocab)
  if draft_model and not draft_model.startswith("self:"):
    drafter = specs.load(draft_model, dtype=dtype, seed=seed)
    engine.set_draft_model(drafter.model, drafter.tokenizer)
  else:
    engine.set_draft_model(draft_model)
  return engine


def load_heads(engine: Engine, path: str, *, tree=None, draft_vocab: int = _DRAFT_VOCAB_SIZE) -> Engine:
  """`engine`'s backbone with the heads in `path` (any heads directory: Medusa or Hydra heads, an
  EAGLE drafter, a training run; `medusa_jax.formats.layout`): their shipped tree and lookup chain
  unless `tree` names one, and the `draft_vocab` most frequent ids of their drafting vocabulary (an
  EAGLE drafter always drafts over all of its own)."""
  from medusa_jax.formats.layout import read_draft_ids, read_heads
  from medusa_jax.medusa.eagle import EagleHead
  from medusa_jax.medusa.tree import default_tree

  heads = read_heads(path, engine.model)
  if isinstance(heads, EagleHead):  # a training run over the whole vocabulary lists no ids
    ids = read_draft_ids(path, None)
    return engine.with_heads(heads, tree=tree, draft_vocab=list(range(heads.config.draft_vocab_size))
                             if ids is None else ids)
  lookup = 0
  if tree is None:
    shipped = default_tree(path, heads.config.num_heads)
    tree, lookup = shipped.paths, shipped.lookup
  return engine.with_heads(heads, tree=tree, draft_vocab=read_draft_ids(path, draft_vocab), lookup=lookup)


__all__ = ["Engine", "Generation", "GenerationConfig", "GenerationResult", "MedusaError",
           "ModelConfig", "load", "load_heads", "preset", "EMBEDDED_MODEL"]
