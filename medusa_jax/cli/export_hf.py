"""Convert heads (orbax training dir, Medusa/TGI, vLLM or EAGLE dir) and backbones to serving formats.

    python infer/export_hf.py --heads runs/smollm2-135m --model smollm2-135m-instruct --format medusa --out out/medusa
    python infer/export_hf.py --heads runs/eagle/heads --format speculators --out out/eagle
    python infer/export_hf.py --model smollm2-135m-instruct --format hf-llama --out out/llama

Formats: medusa (Medusa v0.1 / TGI), vllm (vLLM Medusa), eagle3 and speculators (an EAGLE drafter
in the EAGLE-3 reference's layout or the speculators package's, both loaded by vLLM and SGLang),
hf-llama (backbone as HF Llama).
The output appears complete or not at all; an existing --out is kept unless --force.
"""

from __future__ import annotations

import argparse

from medusa_jax.cli.common import add_model_flags, main_guard, quiet_logs
from medusa_jax.errors import MedusaError
from medusa_jax.formats import FORMATS


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, heads_default=None, tree=False, dtype=False,
                  heads_help="heads directory or 'default' (the shipped Medusa-type heads; not needed "
                             "for hf-llama)",
                  draft_vocab_help="the heads draft from the N most frequent ids of their "
                                   "draft_vocab.json: vllm's token_map; medusa: lm_head rows outside "
                                   "them are zero (and a draft_vocab.json beside them); 0: the whole "
                                   "vocabulary")
  p.add_argument("--format", required=True, choices=FORMATS)
  p.add_argument("--out", required=True)
  p.add_argument("--force", action="store_true")
  args = p.parse_args(argv)
  quiet_logs()
  from medusa_jax.formats.layout import export, read_draft_ids, read_heads
  from medusa_jax.medusa.eagle import EagleHead
  from medusa_jax.weights import specs

  loaded = specs.load(args.model)
  heads_path = specs.default_heads(args.model, medusa_type=True) if args.heads == "default" else args.heads
  if args.heads == "default" and heads_path is None:
    raise MedusaError(f"no shipped heads for {args.model}; give --heads DIR")
  heads = read_heads(heads_path, loaded.model) if heads_path else None
  size = None if isinstance(heads, EagleHead) else args.draft_vocab  # a drafter's lm_head has them all
  ids = read_draft_ids(heads_path, size) if heads_path else None
  export(args.format, args.out, model=loaded.model, heads=heads, base_name=loaded.name,
         tokenizer=loaded.tokenizer, force=args.force, draft_ids=ids)
  print(f"wrote {args.format} to {args.out}")


if __name__ == "__main__":
  main()
