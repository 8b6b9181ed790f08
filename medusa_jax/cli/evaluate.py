"""Quality and speed of decoding strategies on prompts with reference answers.

    python infer/evaluate.py --data ../shared/data/references/dialogsum_test.jsonl \\
        --strategies greedy medusa beam:4 medusa-beam:4x3 --max-prompts 20 --out r.json --plot r.png

`--data`: JSONL rows `{"prompt": ..., "reference": ...}` (or `"references": [...]`; optionally
`"answer"`, a final answer for exact match), or a shared
set (DialogSum, GSM8K, Alpaca seed tasks, GPTeacher codegen: `medusa_jax/eval/references.py`).
`--strategies`: `greedy` (plain decoding), `medusa` (the heads' tree, with the lookup chain their
`tree.json` names), `heads` (the heads' tree alone), `lookup` (prompt lookup), `beam:W` (beam
search of width W), `spec-beam:W` (the same beam search, each beam drafting the heads' tree:
speculative, same outputs), `medusa-beam:WxH` (Medusa with a tree built each step from a beam search of
width W, depth H over the heads; `medusa-beam:WxH@N` in N nodes). Each prompt runs under each
strategy in turn, after a warm-up run of that shape. Per strategy: BLEU, chrF, ROUGE-1/2/L,
exact match (where the set has final answers: GSM8K, rows with "answer"), tokens per step, tokens/s, and RTF =
generation seconds / greedy's on the same prompts (greedy runs even when not listed). Greedy,
medusa, heads, lookup and medusa-beam decode greedily, so their outputs and scores are equal; so
are beam:W's and spec-beam:W's.
"""

from __future__ import annotations

import argparse
import re

from medusa_jax.atomic import write_json
from medusa_jax.cli.common import (
  add_mesh_flag,
  add_model_flags,
  check_output_paths,
  main_guard,
  plot_figure,
  quiet_logs,
  require_positive,
  save_figure,
)
from medusa_jax.errors import MedusaError

_STRATEGY = re.compile(r"^(greedy|medusa|heads|lookup)$|^(spec-)?beam:(\d+)$|^medusa-beam:(\d+)x(\d+)(?:@(\d+))?$")


def strategy_settings(name: str) -> dict:
  """A `--strategies` name -> `GenerationConfig` settings."""
  m = _STRATEGY.match(name)
  if not m:
    raise MedusaError(f"unknown strategy {name!r}; use greedy, medusa, heads, lookup, beam:W, spec-beam:W, "
                      "medusa-beam:WxH[@N]")
  plain, spec, beams, width, depth, budget = m.groups()
  if plain:
    return {"greedy": dict(mode="baseline"), "medusa": dict(mode="medusa"),
            "heads": dict(mode="medusa", lookup=0), "lookup": dict(mode="lookup")}[plain]
  if beams:
    return dict(mode="beam", num_beams=int(beams), beam_heads=bool(spec))
  return dict(mode="medusa", draft_beams=int(width), draft_depth=int(depth),
              tree_budget=int(budget) if budget else None)


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", required=True, help="JSONL of prompt + reference(s), or a shared reference set")
  p.add_argument("--strategies", nargs="+", default=["greedy", "medusa"])
  add_model_flags(p)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--max-prompts", type=int, default=None)
  add_mesh_flag(p)
  p.add_argument("--out", required=True, help="JSON: metrics per strategy and every output")
  p.add_argument("--plot", default=None, help="PNG/PDF/SVG: quality and RTF per strategy")
  args = p.parse_args(argv)
  require_positive(args, "max_prompts", "max_new_tokens")
  strategies = list(dict.fromkeys(["greedy"] + args.strategies))  # greedy first: RTF's reference
  settings = {s: strategy_settings(s) for s in strategies}
  check_output_paths(args, "out", "plot")
  quiet_logs()
  import medusa_jax
  from medusa_jax.decode.engine import bucket
  from medusa_jax.eval import metrics, references

  examples = references.load(args.data, args.max_prompts)
  engine = medusa_jax.load(args.model, heads=None if args.heads == "none" else args.heads, tree=args.tree,
                           dtype=args.dtype, draft_vocab=args.draft_vocab, mesh=args.mesh)
  for s in settings.values():
    engine.plan(**s)  # a clear error before any work (e.g. medusa without heads)
  totals = {s: dict(seconds=0.0, tokens=0, steps=0) for s in strategies}
  outputs = {s: [] for s in strategies}
  warm = set()
  for ex in examples:
    ids = [engine.encode(ex.prompt)]
    for s in strategies:
      if (s, bucket(len(ids[0]))) not in warm:  # a warm-up run per compiled shape
        engine.generate_ids(ids, max_new_tokens=args.max_new_tokens, **settings[s])
        warm.add((s, bucket(len(ids[0]))))
      out = engine.generate_ids(ids, max_new_tokens=args.max_new_tokens, **settings[s])
      n = int(out.num_tokens[0])
      outputs[s].append(engine.tokenizer.decode([int(t) for t in out.tokens[0, :n]], skip_special_tokens=True))
      totals[s]["seconds"] += out.seconds
      totals[s]["tokens"] += n
      totals[s]["steps"] += int(out.steps[0])
  refs, answers = [ex.references for ex in examples], [ex.answer for ex in examples]
  greedy_seconds = totals["greedy"]["seconds"]
  table = {}
  for s in strategies:
    t = totals[s]
    table[s] = metrics.score(outputs[s], refs, answers) | {
        "tokens_per_step": t["tokens"] / max(t["steps"], 1),
        "tokens_per_second": t["tokens"] / t["seconds"] if t["seconds"] else 0.0,
        "rtf": t["seconds"] / greedy_seconds if greedy_seconds else None,
        "seconds": t["seconds"], "new_tokens": t["tokens"]}
  result = {"model": engine.name, "data": args.data, "prompts_evaluated": len(examples),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
            "strategies": table,
            "prompts": [{"prompt": ex.prompt, "references": list(ex.references), "answer": ex.answer,
                         "outputs": {s: outputs[s][i] for s in strategies}} for i, ex in enumerate(examples)]}
  write_json(args.out, result, indent=1)
  print(_table(table))
  if args.plot:
    _plot(table, args.plot)


def _table(table: dict) -> str:
  head = f"{'strategy':<22}{'BLEU':>7}{'chrF':>7}{'R-1':>7}{'R-2':>7}{'R-L':>7}{'EM':>7}{'tok/step':>9}{'tok/s':>8}{'RTF':>7}"
  lines = [head, "-" * len(head)]
  for name, r in table.items():
    em = "-" if r["exact_match"] is None else f"{r['exact_match']:.1f}"
    lines.append(f"{name:<22}{r['bleu']:>7.2f}{r['chrf']:>7.2f}{r['rouge1']:>7.2f}{r['rouge2']:>7.2f}"
                 f"{r['rougeL']:>7.2f}{em:>7}{r['tokens_per_step']:>9.2f}{r['tokens_per_second']:>8.1f}"
                 f"{r['rtf']:>7.3f}")
  return "\n".join(lines)


def _plot(table: dict, path: str) -> None:
  names = list(table)
  fig, axes = plot_figure(max(7, 1.4 * len(names)))
  for key in ("bleu", "rougeL"):
    axes[0].plot(names, [table[n][key] for n in names], marker="o", label=key)
  axes[0].set_title("quality (0-100)")
  axes[0].legend()
  axes[1].bar(names, [table[n]["rtf"] for n in names])
  axes[1].axhline(1.0, color="gray", linestyle="--")
  axes[1].set_title("RTF (greedy = 1, lower is faster)")
  save_figure(fig, path)


if __name__ == "__main__":
  main()
