"""`LoadedModel`: what a generation runs with, as the `Engine` holds it and the server reads it:
the backbone as graphdef + state, and whatever can draft (Medusa heads with their tree, drafting
vocabulary and default lookup chain, an EAGLE drafter, or a draft model)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.eagle import EagleConfig
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.config import ModelConfig
from medusa_jax.model.llama import Llama


@dataclasses.dataclass(frozen=True)
class DraftModel:
  """A model that drafts for the target: its own weights (`graphdef`, `weights`), or the target's
  first `num_layers` layers (`graphdef` and `weights` None: self-drafting, no extra weights)."""

  graphdef: nnx.GraphDef | None = None
  weights: nnx.State | None = None
  num_layers: int | None = None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A backbone and what drafts for it; arrays already placed on the device(s) (`mesh`)."""

  graphdef: nnx.GraphDef
  state: nnx.State
  config: ModelConfig
  tokenizer: Any
  eos_ids: jax.Array            # `[n]` int32: every token that ends a generation
  pad_id: int
  dtype: Any                    # the weights' and KV cache's dtype
  mesh: Mesh | None = None
  heads_graphdef: nnx.GraphDef | None = None
  heads_state: nnx.State | None = None
  num_heads: int = 0
  tree: Tree | None = None      # the heads' candidate tree
  draft_vocab: DraftVocab | None = None
  lookup: int = 0               # the lookup chain the heads graft on unless a config says otherwise
  draft_model: DraftModel | None = None
  eagle: EagleConfig | None = None  # set when the heads are an EAGLE drafter (`draft_vocab`: its ids)

  @property
  def model(self) -> Llama:
    return nnx.merge(self.graphdef, self.state)
