"""Build a prompt file that covers what users ask (`medusa_jax.training.prompt_mix`) from the
public prompt sets, for self-distillation or as a diverse held-out benchmark.

    python train/build_prompts.py --sets ../shared/data/prompts --out data/distill/mix_train.jsonl --counts translation=400 code=450
    python train/build_prompts.py --sets ../shared/data/prompts --out data/distill/mix_heldout.jsonl --heldout --per-category 4

Writes MT-bench-style JSONL (`{"category", "turns"}`; multi-turn rows hold a follow-up turn).
Training prompts come from the sets' training rows only, held-out ones from their held-out rows.
"""

from __future__ import annotations

import argparse
import json

from medusa_jax.atomic import write_text
from medusa_jax.cli.common import main_guard, require_positive
from medusa_jax.errors import MedusaError
from medusa_jax.training.prompt_mix import CATEGORIES, build


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sets", required=True, help="folder of the public prompt sets (../shared/data/prompts)")
  p.add_argument("--out", required=True, help="JSONL file to write")
  p.add_argument("--heldout", action="store_true", help="from the sets' held-out rows (a benchmark)")
  p.add_argument("--per-category", type=int, default=None, help="this many prompts of every category")
  p.add_argument("--counts", nargs="*", default=[], metavar="CATEGORY=N",
                 help=f"prompts per category (categories: {', '.join(CATEGORIES)})")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  require_positive(args, "per_category")
  counts = dict.fromkeys(CATEGORIES, args.per_category or 0)
  for item in args.counts:
    name, _, n = item.partition("=")
    if name not in CATEGORIES or not n.isdigit():
      raise MedusaError(f"--counts takes CATEGORY=N with a category of {', '.join(CATEGORIES)}; got {item!r}")
    counts[name] = int(n)
  if not any(counts.values()):
    raise MedusaError("no prompts asked for: give --per-category N or --counts CATEGORY=N")
  rows = build(args.sets, counts, heldout=args.heldout, seed=args.seed)
  write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
  main()
