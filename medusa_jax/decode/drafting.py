"""How a generation drafts and accepts: the one place where a `GenerationConfig` and a
`LoadedModel` become what a decode loop runs (`Plan`). `Engine.generate_ids` and the server's
`Scheduler` both call `resolve`; a new drafter is added here (and in `drafters.py`).

Modes: "medusa" (the heads' tree, with the lookup chain `lookup` names: None takes the heads
directory's, grafted on steps whose last `min_ngram` tokens occurred before), "lookup" (prompt
lookup alone: a chain of `lookup` tokens, else `draft_tokens`), "draft" (the loaded draft model: a
chain of `draft_tokens`, or the `draft_tree` of its top-k tokens), "beam" (beam search; with
`beam_heads` every beam drafts the heads' tree), "baseline", and "auto": Medusa when heads are
loaded, else the draft model when one is, else prompt lookup when `lookup` > 0 asks for it, else
plain decoding. `draft_beams` > 0 builds the heads' tree each step (`BeamTreeDrafter`). Heads that
are an EAGLE drafter always grow their tree each step (`EagleDrafter`; `draft_beams`,
`draft_depth` and `tree_budget` override its defaults).

Sampling settings come out as host arrays, one value per row (`SamplingParams`, `TypicalParams`):
jit arguments, so a new temperature reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from medusa_jax.decode.acceptance import Rule, TypicalParams
from medusa_jax.decode.beam import BeamParams
from medusa_jax.decode.config import MODES, GenerationConfig
from medusa_jax.decode.drafters import (
  BeamTreeDrafter,
  Drafter,
  EagleDrafter,
  EagleParams,
  LookupDrafter,
  ModelDrafter,
  ModelParams,
  heads_drafter,
)
from medusa_jax.decode.loaded import LoadedModel
from medusa_jax.decode.sampling import SamplingParams
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.tree import get_tree

SERVED = ("medusa", "lookup", "draft", "baseline")  # the modes continuous batching runs


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a decode loop needs for one generation."""

  mode: str                         # baseline, medusa, lookup, draft or beam ("auto" resolved)
  drafter: Drafter | None           # None: plain decoding (or plain beam search)
  params: Any                       # the drafter's arrays (`drafters.py`)
  rule: Rule                        # speculative acceptance: None (greedy), lossless or typical
  sampling: SamplingParams | None   # plain decoding's: None (greedy) or temperature + top-p
  beam: BeamParams | None = None    # beam search's settings (a static jit argument)

  @property
  def tree_size(self) -> int:
    """Positions a step may write past a row's length: the drafter's tree (0 without one)."""
    return 0 if self.drafter is None else self.drafter.tree.size


def _mode(config: GenerationConfig, loaded: LoadedModel, modes: tuple[str, ...]) -> str:
  """`config.mode` with "auto" resolved, or a one-line error when what it needs is not loaded."""
  mode = config.mode
  if mode == "auto":
    mode = ("medusa" if loaded.heads_graphdef is not None else "draft" if loaded.draft_model is not None
            else "lookup" if config.lookup else "baseline")
  if mode not in modes:
    raise MedusaError(f"mode {mode!r} is not available here; use one of {', '.join(modes)}")
  if (mode == "medusa" or (mode == "beam" and config.beam_heads)) and loaded.heads_graphdef is None:
    raise MedusaError(f"mode {mode}{' with beam_heads' if mode == 'beam' else ''} needs Medusa heads "
                      "(load some with heads=...)")
  if mode == "beam" and config.beam_heads and loaded.eagle is not None:
    raise MedusaError("beam_heads drafts with Medusa or Hydra heads; an EAGLE drafter keeps one KV "
                      "cache per row, not per beam")
  if mode == "draft" and loaded.draft_model is None:
    raise MedusaError("mode draft needs a draft model (draft_model='self:L' or a model spec)")
  return mode


def resolve(config: GenerationConfig, loaded: LoadedModel, *, batch: int = 1,
            modes: tuple[str, ...] = MODES) -> Plan:
  """The `Plan` of `config` on `loaded` for `batch` rows, or a one-line error (`modes`: those
  the caller runs)."""
  mode = _mode(config, loaded, modes)
  sampling = None if config.temperature <= 0 else SamplingParams.create(config.temperature, config.top_p, batch)
  rule: Rule = sampling
  if sampling is not None and config.acceptance == "typical":
    rule = TypicalParams(*(np.full((batch,), v, np.float32) for v in
                           (config.temperature, config.posterior_threshold, config.posterior_alpha)))
  drafter, params = None, None
  if mode == "lookup":
    drafter = LookupDrafter(config.lookup or config.draft_tokens, config.ngram)
  elif mode == "draft":
    model = loaded.draft_model
    shape = get_tree(config.draft_tree, vocab_size=loaded.config.vocab_size) if config.draft_tree else None
    drafter = ModelDrafter(model.graphdef, config.draft_tokens, model.num_layers, shape)
    params = ModelParams(model.weights, rule if isinstance(rule, SamplingParams) else None)
  elif mode == "medusa" or (mode == "beam" and config.beam_heads):
    drafter, params = _heads(config if mode == "medusa" else config.replace(lookup=0), loaded)
  beam = BeamParams(config.num_beams, config.length_penalty, config.early_stopping) if mode == "beam" else None
  return Plan(mode, drafter, params, rule, sampling, beam)


def _heads(config: GenerationConfig, loaded: LoadedModel):
  """The heads' drafter and params: their static tree (with a lookup chain grafted on), or a
  tree built each step from a beam search over them; an EAGLE drafter's tree grown each step."""
  if loaded.eagle is not None:
    return _eagle(config, loaded)
  params = (loaded.heads_state, loaded.draft_vocab)
  if not config.draft_beams:
    chain = loaded.lookup if config.lookup is None else config.lookup
    return heads_drafter(loaded.heads_graphdef, loaded.tree, chain, config.ngram, config.min_ngram), params
  depth = config.draft_depth or loaded.num_heads
  if depth > loaded.num_heads:
    raise MedusaError(f"draft_depth {depth} exceeds the {loaded.num_heads} heads")
  vocab = len(loaded.draft_vocab.ids) if loaded.draft_vocab is not None else loaded.config.vocab_size
  if config.draft_beams > vocab:
    raise MedusaError(f"draft_beams {config.draft_beams} exceeds the {vocab}-token drafting vocabulary")
  budget = config.tree_budget or config.draft_beams * depth + 1
  return BeamTreeDrafter(loaded.heads_graphdef, config.draft_beams, depth, budget), params


def _eagle(config: GenerationConfig, loaded: LoadedModel):
  """An EAGLE drafter with the config's `draft_beams` (k), `draft_depth` (D) and `tree_budget` (N),
  each defaulting to the drafter's own (its directory's `config.json`)."""
  eagle = loaded.eagle
  width, depth = config.draft_beams or eagle.width, config.draft_depth or eagle.depth
  budget = config.tree_budget or eagle.budget
  candidates = width + (depth - 1) * width * width
  if width > eagle.draft_vocab_size:
    raise MedusaError(f"draft_beams {width} exceeds the {eagle.draft_vocab_size}-token drafting vocabulary")
  if not 2 <= budget <= candidates + 1:
    raise MedusaError(f"tree_budget {budget} must be in 2..{candidates + 1}: the root and the "
                      f"{candidates} candidates of draft_beams {width} x draft_depth {depth}")
  drafter = EagleDrafter(loaded.heads_graphdef, eagle.taps, width, depth, budget)
  return drafter, EagleParams(loaded.heads_state, loaded.draft_vocab.ids)


def for_slots(drafter: Drafter | None, chunk_steps: int) -> Drafter | None:
  """`drafter` as a server's slots run it, with chunks of `chunk_steps` steps that may all be plain:
  an EAGLE drafter keeps that many plain steps' features waiting beside a tree step's."""
  if isinstance(drafter, EagleDrafter):
    return dataclasses.replace(drafter, backlog=chunk_steps)
  return drafter
