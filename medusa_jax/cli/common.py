"""Shared command-line plumbing: one-line errors instead of tracebacks, quiet logs, the flags of
`GenerationConfig` (one definition for every tool that generates)."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from medusa_jax.atomic import atomic_file
from medusa_jax.decode.config import ACCEPTANCES, GenerationConfig
from medusa_jax.errors import MedusaError

_DEFAULTS = GenerationConfig()


def quiet_logs() -> None:
  """Silences TensorFlow/XLA C++ log spam and transformers' advisory warnings for CLI use."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")


def require_positive(args, *names: str) -> None:
  """A one-line error for the first of these argparse flags (None: not given) below 1."""
  for name in names:
    value = getattr(args, name)
    if value is not None and value < 1:
      raise MedusaError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def check_output_paths(args, *names: str) -> None:
  """Before any work: a one-line error for the first of these argparse flags (paths; None: not
  given) whose directory does not exist, or a `plot` that is not .png, .pdf or .svg."""
  for name in names:
    path = getattr(args, name)
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise MedusaError(f"--{name.replace('_', '-')} {path}: no such directory")
  plot = getattr(args, "plot", None)
  if plot and os.path.splitext(plot)[1].lower() not in (".png", ".pdf", ".svg"):
    raise MedusaError(f"--plot {plot}: write a .png, .pdf or .svg file")


def plot_figure(width: float, panels: int = 2):
  """A matplotlib figure of `panels` side by side (no display needed): (figure, axes)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt.subplots(1, panels, figsize=(width, 4))


def save_figure(fig, path: str) -> None:
  """Writes a figure atomically, its x labels turned to fit."""
  for ax in fig.axes:
    ax.tick_params(axis="x", rotation=45)
  fig.tight_layout()
  with atomic_file(path) as tmp:
    fig.savefig(tmp, dpi=100)


def add_generation_flags(p: argparse.ArgumentParser, *, max_new_tokens: int | None = None) -> None:
  """`GenerationConfig`'s settings as flags, with its defaults: `--max-new-tokens`, `--temperature`,
  `--top-p`, `--acceptance`, `--posterior-threshold`, `--posterior-alpha`, `--seed`,
  `--draft-tokens`, `--draft-tree`, `--ngram`, `--min-ngram`, `--lookup`, `--num-beams`,
  `--length-penalty`, `--early-stopping`, `--num-return-sequences`, `--beam-heads`, `--draft-beams`,
  `--draft-depth`, `--tree-budget`."""
  p.add_argument("--max-new-tokens", type=int, default=max_new_tokens or _DEFAULTS.max_new_tokens)
  p.add_argument("--temperature", type=float, default=_DEFAULTS.temperature, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=_DEFAULTS.top_p)
  p.add_argument("--acceptance", choices=ACCEPTANCES, default=_DEFAULTS.acceptance,
                 help="Medusa at temperature > 0: lossless (the baseline's distribution) or "
                      "typical (Medusa's typical acceptance: more tokens per step, not lossless)")
  p.add_argument("--posterior-threshold", type=float, default=_DEFAULTS.posterior_threshold,
                 help="typical acceptance epsilon")
  p.add_argument("--posterior-alpha", type=float, default=_DEFAULTS.posterior_alpha,
                 help="typical acceptance delta")
  p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
  p.add_argument("--draft-tokens", type=int, default=_DEFAULTS.draft_tokens,
                 help="--mode lookup and draft: tokens proposed per step")
  p.add_argument("--draft-tree", default=None,
                 help="--mode draft: a tree of the draft model's top-k tokens instead of a chain (a "
                      "tree name or a JSON list of paths, whose ranks are the draft's)")
  p.add_argument("--ngram", type=int, default=_DEFAULTS.ngram,
                 help="prompt lookup matches the last N..1 tokens")
  p.add_argument("--min-ngram", type=int, default=_DEFAULTS.min_ngram,
                 help="graft the lookup chain only on steps where the last N or more tokens occurred "
                      "before (0: on every step)")
  p.add_argument("--lookup", type=int, default=_DEFAULTS.lookup,
                 help="--mode medusa: graft a prompt-lookup chain of this many tokens onto the tree "
                      "(0: the heads alone; default: the heads' tree.json, else 0)")
  p.add_argument("--num-beams", type=int, default=_DEFAULTS.num_beams, help="--mode beam: beam width")
  p.add_argument("--length-penalty", type=float, default=_DEFAULTS.length_penalty,
                 help="--mode beam: hypotheses score log-probability / length ** this")
  p.add_argument("--early-stopping", choices=["false", "true", "never"], default="false",
                 help="--mode beam: stop once num_beams hypotheses finished (true), when the running "
                      "beams cannot beat them at their current length (false) or ever (never)")
  p.add_argument("--num-return-sequences", type=int, default=_DEFAULTS.num_return_sequences,
                 help="--mode beam: answers per prompt, best first")
  p.add_argument("--beam-heads", action="store_true",
                 help="--mode beam: every beam drafts the heads' tree, one forward verifies them all "
                      "(speculative beam search: the same answers in fewer forwards)")
  p.add_argument("--draft-beams", type=int, default=_DEFAULTS.draft_beams,
                 help="--mode medusa: build the tree each step from a beam search of this width over "
                      "the heads (0: the static tree)")
  p.add_argument("--draft-depth", type=int, default=_DEFAULTS.draft_depth,
                 help="with --draft-beams: its depth (default: every head)")
  p.add_argument("--tree-budget", type=int, default=_DEFAULTS.tree_budget,
                 help="with --draft-beams: the tree's nodes, the root included (default: width x depth + 1)")


def add_mesh_flag(p: argparse.ArgumentParser) -> None:
  """`--mesh data=D,fsdp=F,tensor=T` (the training config's mesh keys): run sharded over the
  devices."""
  p.add_argument("--mesh", default=None,
                 help="shard over the devices: data=D,fsdp=F,tensor=T (product = device count; "
                      "tensor splits attention heads, MLP and vocabulary, data the prompts)")


def add_draft_model_flag(p: argparse.ArgumentParser) -> None:
  """`--draft-model SPEC|self:L`: what `--mode draft` drafts with."""
  p.add_argument("--draft-model", default=None,
                 help="--mode draft: a model spec with the target's tokenizer, or self:L (the target's "
                      "first L layers, no extra weights)")


def generation_config(args, **changes) -> GenerationConfig:
  """The `GenerationConfig` of parsed `add_generation_flags` flags (plus `changes`)."""
  return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, acceptance=args.acceptance,
                          posterior_threshold=args.posterior_threshold,
                          posterior_alpha=args.posterior_alpha, seed=args.seed,
                          draft_tokens=args.draft_tokens, draft_tree=args.draft_tree, ngram=args.ngram,
                          min_ngram=args.min_ngram, lookup=args.lookup, num_beams=args.num_beams,
                          length_penalty=args.length_penalty,
                          early_stopping={"false": False, "true": True}.get(args.early_stopping, "never"),
                          num_return_sequences=args.num_return_sequences, beam_heads=args.beam_heads,
                          draft_beams=args.draft_beams, draft_depth=args.draft_depth,
                          tree_budget=args.tree_budget).replace(**changes)


def main_guard(fn):
  """Runs `fn`; a MedusaError (bad input) or a missing file prints `error: ...` and exits 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except (MedusaError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      print(f"error: {msg}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  return wrapper
