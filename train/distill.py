"""Self-distillation: the base model answers prompts; its answers become Medusa training data.

    python train/distill.py --prompts ../shared/data/prompts/gsm8k_train.json --out runs/distill.json

Writes chat JSON (`[{"messages": [...], "category": ...}]`) atomically after every batch and
resumes: prompts already answered in `--out` are skipped. A held-out split of the prompts
(`--eval-fraction`) is never answered; it is written to `<out>.heldout.jsonl` (MT-bench format)
for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medusa_jax.atomic import write_text  # noqa: E402
from medusa_jax.cli import main_guard, quiet_logs  # noqa: E402


def interleave(groups):
  """Round-robin over lists, so a partial run covers every source."""
  out, i = [], 0
  while any(i < len(g) for g in groups):
    out.extend(g[i] for g in groups if i < len(g))
    i += 1
  return out


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--prompts", nargs="+", required=True, help="prompt files (any format of medusa_jax.data)")
  p.add_argument("--out", required=True)
  p.add_argument("--max-prompts", type=int, default=None, help="per prompt file")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--eval-fraction", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dtype", default="float32")
  args = p.parse_args(argv)
  quiet_logs()
  from tqdm import tqdm

  import medusa_jax
  from medusa_jax.data import load_conversations, split

  groups, heldout = [], []
  for path in args.prompts:
    convs = load_conversations(path)
    train, held = split(convs, args.eval_fraction, args.seed)
    train = train[: args.max_prompts] if args.max_prompts else train
    groups.append([(f"{os.path.basename(path)}:{i}", c) for i, c in enumerate(train)])
    heldout.extend(held)
  todo = interleave(groups)

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_text(f"{args.out}.heldout.jsonl", "".join(
      json.dumps({"category": c.category, "turns": c.user_turns[:1]}, ensure_ascii=False) + "\n"
      for c in heldout))

  done = []
  if os.path.exists(args.out):
    with open(args.out, encoding="utf-8") as f:
      done = json.load(f)
  finished = {d["id"] for d in done}
  todo = [(key, c) for key, c in todo if key not in finished]
  engine = medusa_jax.load(args.model, heads=None, dtype=args.dtype)
  bar = tqdm(total=len(todo) + len(finished), initial=len(finished), desc="distill", unit="prompt")
  for start in range(0, len(todo), args.batch_size):
    chunk = todo[start: start + args.batch_size]
    prompts = [[m for m in c.messages if m["role"] != "assistant"][:1] for _, c in chunk]
    ids = [engine.encode(msgs) for msgs in prompts]
    ids += [ids[-1]] * (args.batch_size - len(ids))  # one shape: pad the last batch
    tokens, counts, _, _ = engine.generate_ids(ids, max_new_tokens=args.max_new_tokens,
                                               seed=args.seed + start)
    for (key, c), msgs, row, n in zip(chunk, prompts, tokens, counts):
      answer = engine.tokenizer.decode([int(t) for t in row[: int(n)]], skip_special_tokens=True)
      done.append({"id": key, "category": c.category,
                   "messages": msgs + [{"role": "assistant", "content": answer.strip()}]})
    write_text(args.out, json.dumps(done, ensure_ascii=False, indent=0))
    bar.update(len(chunk))
  bar.close()
  print(f"{len(done)} answered conversations in {args.out}; held-out prompts in {args.out}.heldout.jsonl")


if __name__ == "__main__":
  main()
