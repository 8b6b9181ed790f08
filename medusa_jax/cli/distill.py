"""Self-distillation: the base model answers prompts; its answers become Medusa training data.
Multi-turn prompts (MT-bench `turns`) are answered turn by turn, each follow-up after the model's
own earlier answers.

    python train/distill.py --prompts ../shared/data/prompts/gsm8k_train.json --out runs/distill.json

Writes chat JSON (`[{"messages": [...], "category": ...}]`) atomically after every batch and
resumes: prompts already answered in `--out` are skipped. Prompts in the `--exclude` files (tuning
or benchmark prompts) and a held-out split of the prompts (`--eval-fraction`) are never answered;
the split is written to `<out>.heldout.jsonl` (MT-bench format) for benchmarks. Batches are formed
from prompts of similar lengths; prompts over `--max-prompt-tokens` are skipped.
"""

from __future__ import annotations

import argparse
import json
import os

from medusa_jax.atomic import write_text
from medusa_jax.cli.common import (
  add_model_flags,
  main_guard,
  quiet_logs,
  require_positive,
)
from medusa_jax.errors import MedusaError


def interleave(groups):
  """Round-robin over lists, so a partial run covers every source."""
  out, i = [], 0
  while any(i < len(g) for g in groups):
    out.extend(g[i] for g in groups if i < len(g))
    i += 1
  return out


def _prompt(conv):
  """The messages the model answers: up to and including the first user turn (any system prompt kept)."""
  first_user = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
  return conv.messages[: first_user + 1]


def _answer(engine, chunk, args, seed: int) -> list[list[dict]]:
  """The conversations of `chunk` ([(key, conv, first prompt ids)]) answered turn by turn: each
  user turn after the first follows the model's own earlier answers. A conversation stops before a
  turn whose prompt would exceed `--max-prompt-tokens`. Returns each one's messages."""
  histories = [_prompt(c) for _, c, _ in chunk]
  turns = [c.user_turns for _, c, _ in chunk]
  for t in range(max(len(u) for u in turns)):
    active = [i for i, u in enumerate(turns) if t < len(u)]
    if t:
      ids = {i: engine.encode(histories[i] + [{"role": "user", "content": turns[i][t]}]) for i in active}
      active = [i for i in active if len(ids[i]) <= args.max_prompt_tokens]
      for i in active:
        histories[i].append({"role": "user", "content": turns[i][t]})
    else:
      ids = {i: x for i, (_, _, x) in enumerate(chunk)}
    for i in [i for i in range(len(turns)) if i not in active]:
      turns[i] = turns[i][:t]  # finished (or too long to go on)
    if not active:
      break
    batch = [ids[i] for i in active]
    batch += [batch[-1]] * (args.batch_size - len(batch))  # one shape: pad the batch
    out = engine.generate_ids(batch, max_new_tokens=args.max_new_tokens, seed=seed + t)
    for i, row, n in zip(active, out.tokens, out.num_tokens):
      answer = engine.tokenizer.decode([int(x) for x in row[: int(n)]], skip_special_tokens=True)
      histories[i].append({"role": "assistant", "content": answer.strip()})
  return histories


def _encode(engine, todo, max_tokens):
  """[(key, conv)] -> ([(key, conv, prompt ids)] of prompts up to `max_tokens`, how many were longer)."""
  out = [(key, c, engine.encode(_prompt(c))) for key, c in todo]
  kept = [x for x in out if len(x[2]) <= max_tokens]
  return kept, len(out) - len(kept)


def _by_length(todo, batch_size, window_batches=16):
  """Sorts each window of `window_batches` batches by prompt length: batches of similar lengths pad
  to smaller shape buckets, while a partial run still covers the sources in round-robin order."""
  w = batch_size * window_batches
  return [x for s in range(0, len(todo), w) for x in sorted(todo[s: s + w], key=lambda x: len(x[2]))]


def _read_done(path):
  """The conversations an earlier run wrote to `path` (none if it does not exist yet)."""
  from medusa_jax.training.data import read_objects

  if not os.path.exists(path):
    return []
  return read_objects(path, "id", f"cannot resume from {path}")


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, heads=False, tree=False, draft_vocab=False)
  p.add_argument("--prompts", nargs="+", required=True, help="prompt files (any format of medusa_jax.training.data)")
  p.add_argument("--out", required=True)
  p.add_argument("--max-prompts", type=int, default=None, help="per prompt file")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--eval-fraction", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--max-prompt-tokens", type=int, default=512,
                 help="skip longer prompts (a training sequence of seq_len tokens would cut their answer)")
  p.add_argument("--exclude", nargs="*", default=[],
                 help="prompt files whose prompts are never answered (e.g. tuning or benchmark prompts)")
  args = p.parse_args(argv)
  quiet_logs()
  from tqdm import tqdm

  import medusa_jax
  from medusa_jax.training.data import load_conversations, split

  require_positive(args, "max_prompts", "max_new_tokens", "batch_size", "max_prompt_tokens")
  if not 0 <= args.eval_fraction < 1:
    raise MedusaError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
  done = _read_done(args.out)

  excluded = {c.user_turns[0] for path in args.exclude for c in load_conversations(path) if c.user_turns}
  groups, heldout = [], []
  for path in args.prompts:
    convs = load_conversations(path)
    train, held = split(convs, args.eval_fraction, args.seed)
    train = train[: args.max_prompts] if args.max_prompts else train
    groups.append([(f"{os.path.basename(path)}:{i}", c) for i, c in enumerate(train)
                   if c.user_turns[:1] and c.user_turns[0] not in excluded])
    heldout.extend(held)
  todo = interleave(groups)

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_text(f"{args.out}.heldout.jsonl", "".join(
      json.dumps({"category": c.category, "turns": c.user_turns}, ensure_ascii=False) + "\n"
      for c in heldout))

  finished = {d["id"] for d in done}
  if not os.path.exists(args.out):
    write_text(args.out, "[]")  # the output exists (empty) even when no prompt is left to answer
  engine = medusa_jax.load(args.model, heads=None, dtype=args.dtype)
  todo, too_long = _encode(engine, [(key, c) for key, c in todo if key not in finished],
                           args.max_prompt_tokens)
  if too_long:
    print(f"skipped {too_long} prompts longer than --max-prompt-tokens {args.max_prompt_tokens}")
  todo = _by_length(todo, args.batch_size)
  bar = tqdm(total=len(todo) + len(finished), initial=len(finished), desc="distill", unit="prompt")
  for start in range(0, len(todo), args.batch_size):
    chunk = todo[start: start + args.batch_size]
    for (key, c, _), messages in zip(chunk, _answer(engine, chunk, args, seed=args.seed + start)):
      done.append({"id": key, "category": c.category, "messages": messages})
    write_text(args.out, json.dumps(done, ensure_ascii=False, indent=0))
    bar.update(len(chunk))
  bar.close()
  print(f"{len(done)} answered conversations in {args.out}; held-out prompts in {args.out}.heldout.jsonl")


if __name__ == "__main__":
  main()
