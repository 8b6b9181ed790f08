"""Export the decoder (and Medusa heads) to ONNX for onnxruntime, no torch involved.

    python infer/export_onnx.py --out out/onnx                    # embedded model + its Medusa heads
    python infer/export_onnx.py --model DIR --heads none --out out/plain --dtype float16

The directory holds `model.onnx` + `model.onnx.data` (onnxruntime-genai's input/output names, a
`tree_mask` input for tree steps, `medusa_logits` with heads), the tokenizer, `genai_config.json`
and `medusa.json` (the heads' tree); `infer/onnx_generate.py` decodes with it. Atomic; an
existing --out is kept unless --force.
"""

from __future__ import annotations

import argparse
import os
import time

from medusa_jax.cli.common import add_model_flags, main_guard, quiet_logs
from medusa_jax.errors import MedusaError
from medusa_jax.onnx.export import DTYPES


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, tree=False, dtype_choices=sorted(DTYPES), dtype_help="how the weights are stored",
                  heads_help="Medusa heads directory, 'default' (the embedded model's Medusa-type heads) "
                             "or 'none'")
  p.add_argument("--out", required=True)
  p.add_argument("--force", action="store_true")
  args = p.parse_args(argv)
  quiet_logs()
  from medusa_jax.formats.layout import read_heads
  from medusa_jax.medusa import draft_vocab
  from medusa_jax.medusa.draft_vocab import DraftVocab
  from medusa_jax.medusa.tree import default_tree, get_tree
  from medusa_jax.onnx.export import export_onnx
  from medusa_jax.weights import specs

  start = time.perf_counter()
  loaded = specs.load(args.model)
  heads_path = None if args.heads == "none" else (
      specs.default_heads(args.model, medusa_type=True) if args.heads == "default" else args.heads)
  if args.heads == "default" and heads_path is None:
    raise MedusaError(f"no shipped heads for {args.model}; give --heads DIR or --heads none")
  heads = tree = draft = None
  if heads_path:
    heads = read_heads(heads_path, loaded.model)
    tree = get_tree(default_tree(heads_path, heads.config.num_heads).paths, num_heads=heads.config.num_heads)
    ids = draft_vocab.read(heads_path, args.draft_vocab)
    draft = None if ids is None else DraftVocab.build(loaded.model, heads, ids, tree.topk)
  config = loaded.model.config
  export_onnx(args.out, loaded.model, loaded.tokenizer, heads=heads, draft=draft, tree=tree,
              eos_ids=config.eos_token_ids, pad_id=config.pad_token_id, dtype=args.dtype, force=args.force)
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(f"wrote {args.out} ({size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
