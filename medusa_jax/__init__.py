"""medusa-jax: Medusa speculative decoding in JAX / Flax NNX.

    import medusa_jax
    engine = medusa_jax.load("smollm2-135m-instruct")
    print(engine.generate("Name three primes.").text)
"""

from medusa_jax.config import ModelConfig, preset
from medusa_jax.draft_vocab import DEFAULT_SIZE as _DRAFT_VOCAB_SIZE
from medusa_jax.engine import Engine, Generation
from medusa_jax.errors import MedusaError
from medusa_jax.loading import EMBEDDED_MODEL


def load(spec: str = EMBEDDED_MODEL, *, heads: str | None = "default", tree=None,
         dtype: str = "float32", max_cache_len: int | None = None, seed: int = 0,
         draft_vocab: int = _DRAFT_VOCAB_SIZE) -> Engine:
  """Loads a model spec (see `medusa_jax.loading`) and Medusa heads into an `Engine`.

  `heads`: "default" (the project's shipped heads for the embedded model, none otherwise), a
  Medusa/TGI, vLLM or orbax training directory, or None for the base model alone. `tree`: a tree name or list of paths
  (default: the tree shipped with the heads, else `mc_sim_7b_63`). `draft_vocab`: the heads guess
  among the N most frequent answer tokens listed in the heads directory's `draft_vocab.json` (0, or
  no such file: the whole vocabulary; see `medusa_jax.draft_vocab`).
  """
  from medusa_jax import draft_vocab as draft_file
  from medusa_jax import loading
  from medusa_jax.export import read_heads

  loaded = loading.load(spec, dtype=dtype, seed=seed)
  heads_path = loading.default_heads(spec) if heads == "default" else heads
  medusa_heads = read_heads(heads_path, loaded.model) if heads_path else None
  num_heads = medusa_heads.config.num_heads if medusa_heads is not None else 4
  return Engine(loaded.model, loaded.tokenizer, heads=medusa_heads,
                tree=tree or loading.default_tree(heads_path, num_heads), name=loaded.name,
                max_cache_len=max_cache_len,
                draft_vocab=draft_file.read(heads_path, draft_vocab) if medusa_heads is not None else None)


__all__ = ["Engine", "Generation", "MedusaError", "ModelConfig", "load", "preset", "EMBEDDED_MODEL"]
