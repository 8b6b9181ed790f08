"""Shared command-line plumbing: one-line errors instead of tracebacks, quiet logs, the model flags
and the flags of `GenerationConfig` (one definition for every tool).

Light on purpose, like each tool's module: nothing here imports JAX, so `--help` and argument errors
come back at once; the tools import JAX and the model code inside `main`, after parsing."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

from medusa_jax.atomic import atomic_file
from medusa_jax.decode.config import ACCEPTANCES, GenerationConfig
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import DRAFT_VOCAB_SIZE
from medusa_jax.weights import DTYPES, EMBEDDED_MODEL

MODEL_HELP = f"{EMBEDDED_MODEL}, a .gguf file, a HF directory, or random:<preset>"
HEADS_HELP = "Medusa heads directory; 'default' = shipped heads of the embedded model; 'none'"
TREE_HELP = ("tree name (mc_sim_7b_63, vicuna_7b_stage2, chain1..5), a JSON list of paths, or a .json "
             "file of them (default: the heads' tree.json)")
DRAFT_VOCAB_HELP = ("the heads guess among the N most frequent answer tokens in their "
                    "draft_vocab.json (0: the whole vocabulary)")


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


def add_model_flags(p: argparse.ArgumentParser, *, model_default: str = EMBEDDED_MODEL,
                    heads: bool = True, heads_default: str | None = "default", heads_help: str = HEADS_HELP,
                    tree: bool = True, draft_vocab: bool = True, draft_vocab_help: str = DRAFT_VOCAB_HELP,
                    dtype: bool = True, dtype_default: str = "float32", dtype_choices=DTYPES,
                    dtype_help: str | None = None) -> None:
  """What to load: `--model` (a model spec), and unless turned off `--heads`, `--tree`,
  `--draft-vocab` and `--dtype` (`medusa_jax.load`'s arguments of those names), with this tool's
  defaults."""
  p.add_argument("--model", default=model_default, help=MODEL_HELP)
  if heads:
    p.add_argument("--heads", default=heads_default, help=heads_help)
  if tree:
    p.add_argument("--tree", default=None, help=TREE_HELP)
  if draft_vocab:
    p.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB_SIZE, help=draft_vocab_help)
  if dtype:
    p.add_argument("--dtype", default=dtype_default, choices=list(dtype_choices), help=dtype_help)


# The help of each `GenerationConfig` setting's flag (`max_new_tokens`: `--max-new-tokens`).
GENERATION_HELP = {
    "temperature": "0 = greedy",
    "acceptance": "Medusa at temperature > 0: lossless (the baseline's distribution) or typical "
                  "(Medusa's typical acceptance: more tokens per step, not lossless)",
    "posterior_threshold": "typical acceptance epsilon",
    "posterior_alpha": "typical acceptance delta",
    "draft_tokens": "--mode lookup and draft: tokens proposed per step",
    "draft_tree": "--mode draft: a tree of the draft model's top-k tokens instead of a chain (a tree "
                  "name or a JSON list of paths, whose ranks are the draft's)",
    "ngram": "prompt lookup matches the last N..1 tokens",
    "min_ngram": "graft the lookup chain only on steps where the last N or more tokens occurred "
                 "before (0: on every step)",
    "lookup": "--mode medusa: graft a prompt-lookup chain of this many tokens onto the tree (0: the "
              "heads alone; default: the heads' tree.json, else 0)",
    "num_beams": "--mode beam: beam width",
    "length_penalty": "--mode beam: hypotheses score log-probability / length ** this",
    "early_stopping": "--mode beam: stop once num_beams hypotheses finished (true), when the running "
                      "beams cannot beat them at their current length (false) or ever (never)",
    "num_return_sequences": "--mode beam: answers per prompt, best first",
    "beam_heads": "--mode beam: every beam drafts the heads' tree, one forward verifies them all "
                  "(speculative beam search: the same answers in fewer forwards)",
    "draft_beams": "--mode medusa: build the tree each step from a beam search of this width over the "
                   "heads (0: the static tree)",
    "draft_depth": "with --draft-beams: its depth (default: every head)",
    "tree_budget": "with --draft-beams: the tree's nodes, the root included (default: width x depth + 1)",
}
# Settings whose flag is not `type=` its annotation (a bool: `store_true`): argparse keywords, and
# the flag's text -> the setting's value.
_EARLY_STOPPING = {"false": False, "true": True, "never": "never"}
_FLAG_KEYWORDS = {
    "acceptance": dict(choices=ACCEPTANCES),
    "early_stopping": dict(choices=list(_EARLY_STOPPING),
                           default=str(GenerationConfig.early_stopping).lower()),
}
_FROM_FLAG = {"early_stopping": _EARLY_STOPPING.__getitem__}
_NOT_FLAGS = ("mode",)  # each tool declares `--mode`, with the modes it runs
_TYPES = {"int": int, "float": float, "str": str}


def _generation_fields() -> list[dataclasses.Field]:
  """The `GenerationConfig` fields that are flags of `add_generation_flags`."""
  return [f for f in dataclasses.fields(GenerationConfig) if f.name not in _NOT_FLAGS]


def _flag_keywords(f: dataclasses.Field) -> dict:
  """How argparse reads the flag of field `f`: `type=` its annotation's first type (`int | None`:
  int), `store_true` for a bool that defaults to False, or its `_FLAG_KEYWORDS`."""
  if f.name in _FLAG_KEYWORDS:
    return _FLAG_KEYWORDS[f.name]
  kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
  kind = kind.split(" | ")[0]
  if kind == "bool" and f.default is False:
    return dict(action="store_true")
  if kind not in _TYPES:
    raise TypeError(f"GenerationConfig.{f.name}: no flag for {f.type!r}; add it to _FLAG_KEYWORDS")
  return dict(type=_TYPES[kind])


def add_generation_flags(p: argparse.ArgumentParser, *, max_new_tokens: int | None = None) -> None:
  """`GenerationConfig`'s settings (all but `mode`) as flags, with its defaults: `max_new_tokens` is
  `--max-new-tokens` (default `max_new_tokens` when given), help from `GENERATION_HELP`."""
  for f in _generation_fields():
    kw = dict(default=f.default, help=GENERATION_HELP.get(f.name)) | _flag_keywords(f)
    if f.name == "max_new_tokens" and max_new_tokens:
      kw["default"] = max_new_tokens
    p.add_argument("--" + f.name.replace("_", "-"), **kw)


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
  values = {f.name: getattr(args, f.name) for f in _generation_fields()}
  for name, convert in _FROM_FLAG.items():
    values[name] = convert(values[name])
  return GenerationConfig(**values).replace(**changes)


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
