"""The one place that tells which layout a directory holds and reads or writes each by name.

Heads directories: a training run (orbax, `orbax_run.py`), an EAGLE-3-style drafter (`eagle.py`),
vLLM Medusa (`vllm.py`), or Medusa v0.1 / TGI (`medusa.py`). Export formats: `medusa`, `vllm`, and
`hf-llama` (the backbone as a Hugging Face Llama directory, `weights/hf.py`). Writes are atomic and never replace an existing output
without `force`.
"""

from __future__ import annotations

import os

import numpy as np

from medusa_jax.errors import MedusaError
from medusa_jax.formats import FORMATS, eagle, medusa, orbax_run, vllm
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.eagle import EagleHead
from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.model.llama import Llama
from medusa_jax.weights import hf


def detect(path: str) -> str:
  """"eagle", "orbax", "vllm" or "medusa" (the last also for a directory that is none of them:
  its reader names what is missing)."""
  if eagle.holds(path):  # its config.json says so (beside it may lie its run's train_config.json)
    return "eagle"
  if orbax_run.holds(path):
    return "orbax"
  return "vllm" if vllm.holds(path) else "medusa"


def read_heads(path: str, model: Llama) -> MedusaHeads | EagleHead:
  """Heads (or an EAGLE drafter) from a training run, an EAGLE, a vLLM Medusa or a Medusa/TGI
  directory, for `model`."""
  layout = detect(path)
  if layout == "eagle":
    return eagle.read(path, model)[0]
  return {"orbax": orbax_run.read, "vllm": vllm.read, "medusa": medusa.read}[layout](path, model)


def read_draft_ids(path: str, size: int | None) -> np.ndarray | None:
  """The drafting vocabulary of the heads in `path`: an EAGLE drafter directory's own (all of it:
  its `lm_head` has a column per id), else the `size` most frequent of `draft_vocab.json`'s
  (`draft_vocab.read`; an EAGLE drafter's training run needs `size` None)."""
  if detect(path) == "eagle":
    from safetensors import safe_open

    with safe_open(os.path.join(path, eagle.WEIGHTS), "np") as f:
      d2t = f.get_tensor("d2t")
    return (np.arange(len(d2t)) + d2t).astype(np.int32)
  return draft_vocab.read(path, size)


def export(fmt: str, out: str, *, model: Llama, heads: MedusaHeads | EagleHead | None, base_name: str,
           tokenizer=None, force: bool = False, draft_ids: np.ndarray | None = None) -> None:
  """Writes `fmt` to `out`: heads for Medusa/TGI (per-head lm_heads always written, as those tools
  need them) or vLLM, an EAGLE drafter in the EAGLE-3 reference (`eagle3`) or `speculators`
  layout (`formats/eagle.py`), or the backbone as HF Llama. `draft_ids`: the heads' drafting
  vocabulary (vLLM's `token_map`; in the Medusa layout a `draft_vocab.json` and lm_head rows that
  are zero outside it, so TGI drafts from it too; an EAGLE drafter's `lm_head` columns), None for
  the whole vocabulary."""
  if fmt not in FORMATS:
    raise MedusaError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
  if fmt != "hf-llama" and heads is None:
    raise MedusaError(f"format {fmt} needs heads (--heads)")
  if fmt in eagle.LAYOUTS or (fmt != "hf-llama" and isinstance(heads, EagleHead)):
    if not isinstance(heads, EagleHead) or fmt not in eagle.LAYOUTS:
      raise MedusaError(f"format {fmt} cannot hold {heads.config.head_type} heads: an EAGLE drafter "
                        f"exports as {' or '.join(eagle.LAYOUTS)}, Medusa heads as medusa or vllm")
    ids = np.arange(model.config.vocab_size) if draft_ids is None else draft_ids
    eagle.write(out, heads, ids, model, base_model=base_name, layout=fmt, force=force)
    return
  if fmt != "hf-llama" and heads.config.head_type != "medusa":
    raise MedusaError(f"{heads.config.head_type} heads cannot be exported as {fmt}: Medusa, TGI and "
                      "vLLM do not feed heads the drafted tokens; decode them with medusa-jax")
  if fmt == "medusa":
    medusa.write(out, heads, model, base_model=base_name, lm_head_copies=True, draft_ids=draft_ids,
                 zero_outside_draft=True, force=force)
  elif fmt == "vllm":
    vllm.write(out, heads, model, base_model=base_name, draft_ids=draft_ids, force=force)
  else:
    hf.write_dir(out, model, tokenizer=tokenizer, force=force)
