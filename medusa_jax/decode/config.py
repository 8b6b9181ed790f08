"""`GenerationConfig`: every setting of one generation, shared by `Engine.generate`,
`Engine.generate_ids`, the command-line tools and the server. Its defaults are the project's
defaults, in this one place; `drafting.resolve` turns it into what a decode loop runs. Plain
Python (no JAX), so command-line tools can parse their flags before importing JAX."""

from __future__ import annotations

import dataclasses

from medusa_jax.errors import MedusaError

MODES = ("auto", "medusa", "baseline", "lookup", "draft", "beam")
ACCEPTANCES = ("lossless", "typical")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How to generate. `mode`: "medusa", "baseline", "lookup" (prompt lookup: `draft_tokens`
  tokens after the latest earlier match of the last `ngram`..1 tokens), "beam" (beam search of
  the base model, `num_beams` wide, as transformers' `generate(num_beams=...)`: `length_penalty`,
  `early_stopping` True/False/"never", the `num_return_sequences` best per prompt; with
  `beam_heads`, every beam drafts the heads' tree (static, or per step with `draft_beams`) and
  one forward verifies them all: the same result in fewer forwards), "draft" (the engine's
  draft model proposes `draft_tokens` tokens, or with `draft_tree` (a tree spec, `tree.get_tree`)
  a tree of its top-k tokens: a path's ranks are the draft's), or "auto" (Medusa when heads are loaded). `lookup` > 0 adds a lookup chain of that many tokens to Medusa's tree
  (0: the heads alone; None: the heads directory's default, `tree.json`'s "lookup"), only on steps
  where the text's last `min_ngram` or more tokens occurred before (else the heads' tree runs
  alone, a smaller forward; 0: on every step). `draft_beams` W > 0: Medusa's tree is built each
  step instead from the W best paths of a beam search `draft_depth` deep (default: every head)
  over the heads, in `tree_budget` nodes (default W * depth + 1, the root included), with no
  lookup chain.
  At temperature 0 decoding is greedy (Medusa's output then equals the baseline's); above it,
  `acceptance="lossless"` samples exactly as the baseline does (temperature, then top-p) and
  `"typical"` uses Medusa's typical acceptance (`posterior_threshold` epsilon, `posterior_alpha`
  delta; faster, not the same distribution, ignores top-p)."""

  max_new_tokens: int = 128
  temperature: float = 0.0
  top_p: float = 1.0
  mode: str = "auto"
  acceptance: str = "lossless"
  posterior_threshold: float = 0.09
  posterior_alpha: float = 0.3
  seed: int = 0
  draft_tokens: int = 4
  ngram: int = 3
  min_ngram: int = 2
  lookup: int | None = None
  draft_tree: str | None = None
  draft_beams: int = 0
  draft_depth: int | None = None
  tree_budget: int | None = None
  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  num_return_sequences: int = 1
  beam_heads: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise MedusaError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
    for name, least in (("draft_tokens", 1), ("ngram", 1), ("lookup", 0), ("min_ngram", 0), ("num_beams", 1),
                        ("num_return_sequences", 1), ("draft_beams", 0), ("draft_depth", 1), ("tree_budget", 2)):
      value = getattr(self, name)
      if value is not None and value < least:
        raise MedusaError(f"{name} must be >= {least}, got {value}")
    if self.num_return_sequences > self.num_beams and self.mode == "beam":
      raise MedusaError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                        f"({self.num_beams})")
    if self.early_stopping not in (True, False, "never"):
      raise MedusaError(f"early_stopping must be true, false or never, got {self.early_stopping!r}")
    if self.acceptance not in ACCEPTANCES:
      raise MedusaError(f"unknown acceptance {self.acceptance!r}; use lossless or typical")
    if self.max_new_tokens < 1:
      raise MedusaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.temperature >= 0:
      raise MedusaError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise MedusaError(f"top_p must be in (0, 1], got {self.top_p}")
    if not (self.posterior_threshold >= 0 and self.posterior_alpha >= 0):
      raise MedusaError(f"posterior_threshold and posterior_alpha must be >= 0, got "
                        f"{self.posterior_threshold}, {self.posterior_alpha}")

  def replace(self, **changes) -> GenerationConfig:
    """A copy with `changes` (checked like a new config); an unknown setting is a one-line error."""
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise MedusaError(f"unknown generation setting {unknown[0]!r}")
    return dataclasses.replace(self, **changes)
