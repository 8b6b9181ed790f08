"""Baseline vs Medusa (or another drafter) on every prompt of a file, same settings, after warm-up.

    python infer/benchmark.py --prompts prompts.jsonl --heads DIR --out results.json --plot speed.png
    python infer/benchmark.py --prompts prompts.jsonl --modes medusa lookup hybrid --lookup 4

`--modes`: the speculative variants timed against the same baseline runs, each prompt in turn:
`medusa` (as `generate` decodes by default: the heads' tree, with the lookup chain their
`tree.json` names), `heads` (the heads' tree alone), `lookup` (prompt lookup, `--draft-tokens`,
`--ngram`), `hybrid` (the heads' tree plus a lookup chain of `--lookup` tokens, default the
heads' own or `--draft-tokens`), `draft` (the `--draft-model`'s chain of `--draft-tokens`); any of
them with generation settings of its own after a colon (`medusa:min_ngram=2,lookup=6`), and with
`heads=DIR` its own heads over the same backbone (`medusa:heads=runs/eagle/heads,tree_budget=24`:
an EAGLE drafter beside the `--heads` ones, in one run). The `medusa_*`
fields of the results are the variant's; the top-level tables are the first variant's, and
`modes` holds each one's.

Multi-turn prompts (MT-bench `turns`): each next turn follows the model's own previous answer.
Prints a table per category and overall: mean accepted tokens (tokens per Medusa step), tokens/s
of each mode, speedup, and the fraction of outputs identical to the baseline.

`--heads-accuracy` first measures each head's top-k accuracy against the base model's greedy
answers to the prompts, and how often each tree path is right (which predicts the tokens per step
of any tree); with `--tree-nodes N` the benchmark then runs the N paths right most often (`--tree-nodes auto`:
the size whose predicted tokens/s is best, with step times measured on this device), and
`--save-tree FILE` keeps that tree (a heads directory's `tree.json` is its default).
`--accuracy-only` stops after the measurement.
"""

from __future__ import annotations

import argparse
import re

from medusa_jax.atomic import write_json
from medusa_jax.cli.common import (
  add_draft_model_flag,
  add_generation_flags,
  add_mesh_flag,
  add_model_flags,
  check_output_paths,
  generation_config,
  main_guard,
  plot_figure,
  quiet_logs,
  require_positive,
  save_figure,
)
from medusa_jax.errors import MedusaError

VARIANTS = ("medusa", "heads", "lookup", "hybrid", "draft")
KEYS = ("mean_accepted_tokens", "baseline_tokens_per_second", "medusa_tokens_per_second", "speedup",
        "identical_fraction", "step_cost_ratio")


def summarize(rows: list[dict]) -> dict:
  """Aggregates per-turn rows: token-weighted rates (total tokens / total seconds), and the time of
  a Medusa step over that of a baseline step (so speedup = mean accepted tokens / step cost ratio)."""
  tok_b = sum(r["baseline_tokens"] for r in rows)
  tok_m = sum(r["medusa_tokens"] for r in rows)
  steps_m = sum(r["medusa_steps"] for r in rows)
  sec_b = sum(r["baseline_seconds"] for r in rows)
  sec_m = sum(r["medusa_seconds"] for r in rows)
  base_tps, med_tps = tok_b / max(sec_b, 1e-9), tok_m / max(sec_m, 1e-9)
  return {
      "mean_accepted_tokens": tok_m / max(steps_m, 1),
      "baseline_tokens_per_second": base_tps,
      "medusa_tokens_per_second": med_tps,
      "speedup": med_tps / max(base_tps, 1e-9),
      "identical_fraction": sum(r["identical"] for r in rows) / len(rows),
      "step_cost_ratio": (sec_m / max(steps_m, 1)) / max(sec_b / max(tok_b, 1), 1e-9),
  }


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prompts", required=True)
  add_model_flags(p, heads_help="Medusa heads directory; 'default' = shipped heads of the embedded model")
  p.add_argument("--max-prompts", type=int, default=None)
  p.add_argument("--categories", nargs="+", default=None,
                 help="only the prompts of these categories (e.g. extract rewrite summarize)")
  p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (first turns)")
  p.add_argument("--modes", nargs="+", default=["medusa"],
                 help=f"speculative variants to time against the baseline: {', '.join(VARIANTS)}, each "
                      "optionally with settings of its own, e.g. medusa:min_ngram=2 (module docstring)")
  add_generation_flags(p)
  add_mesh_flag(p)
  add_draft_model_flag(p)
  p.add_argument("--out", default=None, help="JSON results")
  p.add_argument("--plot", default=None, help="PNG: tokens per step and speedup per category")
  p.add_argument("--heads-accuracy", action="store_true",
                 help="measure per-head top-k accuracy against the base model's greedy answers")
  p.add_argument("--topk", type=int, default=10, help="ranks measured by --heads-accuracy")
  p.add_argument("--tree-nodes", default=None,
                 help="with --heads-accuracy: benchmark the best tree of this many nodes; 'auto': the "
                      "size with the most predicted tokens/s here (step times measured on this device)")
  p.add_argument("--save-tree", default=None, help="with --tree-nodes: write that tree (JSON) here")
  p.add_argument("--accuracy-only", action="store_true", help="stop after --heads-accuracy")
  args = p.parse_args(argv)
  if args.tree_nodes not in (None, "auto"):
    if not args.tree_nodes.isdigit():
      raise MedusaError(f"--tree-nodes takes a number of nodes or 'auto', got {args.tree_nodes!r}")
    args.tree_nodes = int(args.tree_nodes)
  require_positive(args, "max_prompts", "max_new_tokens", "batch_size")
  check_output_paths(args, "out", "plot", "save_tree")
  if args.topk < 1 or args.tree_nodes == 0:
    raise MedusaError("--topk and --tree-nodes must be at least 1")
  if (args.tree_nodes or args.accuracy_only) and not args.heads_accuracy:
    raise MedusaError("--tree-nodes and --accuracy-only need --heads-accuracy")
  if args.save_tree and not args.tree_nodes:
    raise MedusaError("--save-tree needs --tree-nodes")
  quiet_logs()
  from tqdm import tqdm

  import medusa_jax
  from medusa_jax.training.data import load_conversations

  convs = load_conversations(args.prompts)
  if args.categories:
    missing = sorted(set(args.categories) - {c.category for c in convs})
    if missing:
      raise MedusaError(f"{args.prompts} has no prompts of categor{'y' if len(missing) == 1 else 'ies'} "
                        f"{', '.join(missing)}")
    convs = [c for c in convs if c.category in args.categories]
  convs = convs[: args.max_prompts]
  engine = medusa_jax.load(args.model, heads=args.heads, tree=args.tree, dtype=args.dtype,
                           draft_vocab=args.draft_vocab, mesh=args.mesh,
                           draft_model=args.draft_model)
  config = generation_config(args)  # acceptance: Medusa's rule (the baseline has none)
  engines, variants = {}, {}
  for m in args.modes:
    heads = _variant_heads(m)
    engines[m] = engine if heads is None else medusa_jax.load_heads(engine, heads, draft_vocab=args.draft_vocab)
    variants[m] = _variant(config, m, engines[m].lookup)
  for m, c in variants.items():
    engines[m].plan(c)  # a clear error when the heads or the draft model are missing
  if args.heads_accuracy:
    engine.plan(config.replace(mode="medusa"))
    if engine.eagle is not None:
      raise MedusaError("--heads-accuracy measures Medusa or Hydra heads; an EAGLE drafter's top-1 per "
                        "drafting depth is in its training run's metrics.jsonl (split eval)")
  accuracy = _heads_accuracy(engine, convs, args) if args.heads_accuracy else None
  if args.accuracy_only:
    if args.out:
      write_json(args.out, {"heads_accuracy": accuracy}, indent=2)
    return
  # At temperature > 0 the two modes draw different samples, so identical_fraction says nothing.
  warm = engine.encode(convs[0].user_turns[0])
  engine.generate_ids([warm] * args.batch_size, config.replace(mode="baseline"))  # warm-up: compile first
  for m, c in variants.items():
    engines[m].generate_ids([warm] * args.batch_size, c)

  rows = {m: [] for m in variants}
  histories = [[] for _ in convs]
  turns = max(len(c.user_turns) for c in convs)
  bar = tqdm(total=sum(len(c.user_turns) for c in convs), desc="benchmark", unit="turn")
  for t in range(turns):
    active = [i for i, c in enumerate(convs) if t < len(c.user_turns)]
    for start in range(0, len(active), args.batch_size):
      idx = active[start: start + args.batch_size]
      msgs = [histories[i] + [{"role": "user", "content": convs[i].user_turns[t]}] for i in idx]
      ids = [engine.encode(m) for m in msgs]
      pad = args.batch_size - len(ids)
      ids_padded = ids + [ids[-1]] * pad
      base = engine.generate_ids(ids_padded, config, mode="baseline")
      outs = {m: engines[m].generate_ids(ids_padded, c) for m, c in variants.items()}
      share = len(ids) / len(ids_padded)
      for j, i in enumerate(idx):
        for m, med in outs.items():
          b_n, m_n = int(base.num_tokens[j]), int(med.num_tokens[j])
          rows[m].append({
              "prompt": convs[i].user_turns[t], "category": convs[i].category, "turn": t,
              "baseline_tokens": b_n, "medusa_tokens": m_n, "medusa_steps": int(med.steps[j]),
              "baseline_seconds": base.seconds * share / len(idx),
              "medusa_seconds": med.seconds * share / len(idx),
              "identical": bool(b_n == m_n and (base.tokens[j][:b_n] == med.tokens[j][:m_n]).all()),
          })
        first = outs[args.modes[0]]
        answer = engine.tokenizer.decode([int(x) for x in first.tokens[j][:int(first.num_tokens[j])]],
                                         skip_special_tokens=True)
        histories[i] = msgs[j] + [{"role": "assistant", "content": answer}]
      bar.update(len(idx))
  bar.close()

  tables = {m: _tables(r) for m, r in rows.items()}
  result = {**tables[args.modes[0]],
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
            "tree_size": engine.tree.size if engine.tree else None,
            "tree": [list(p) for p in engine.tree.paths] if engine.tree else None,
            "modes": tables, "prompts": rows[args.modes[0]]}
  if accuracy:
    result["heads_accuracy"] = accuracy
  for m, table in tables.items():
    if len(tables) > 1:
      print(f"[{m}]")
    print(f"{'category':<24}" + "".join(f"{k:>28}" for k in KEYS))
    for name, s in [*table["categories"].items(), ("overall", table["overall"])]:
      print(f"{name:<24}" + "".join(f"{s[k]:>28.3f}" for k in KEYS))
  if args.out:
    write_json(args.out, result, indent=2)
  if args.plot:
    _plot(result, args.plot)


def _settings(spec: str) -> dict[str, str]:
  """The `key=value` settings of a `--modes` variant `NAME[:key=value,...]`, as text."""
  mode, _, overrides = spec.partition(":")
  if mode not in VARIANTS:
    raise MedusaError(f"unknown --modes variant {mode!r}; use one of {', '.join(VARIANTS)}")
  settings = {}
  for item in filter(None, re.split(r",(?=\w+=)", overrides)):  # a value may hold commas: a tree
    key, eq, value = item.partition("=")
    if not eq:
      raise MedusaError(f"--modes {spec}: settings are key=value, got {item!r}")
    settings[key] = value
  return settings


def _variant_heads(spec: str) -> str | None:
  """The heads directory a `--modes` variant names (`heads=DIR`), if any."""
  return _settings(spec).get("heads")


def _variant(config, spec: str, heads_lookup: int):
  """The `GenerationConfig` of a `--modes` variant, `NAME[:key=value,...]` (`heads_lookup`: the
  heads' own lookup chain; `heads=DIR` is `_variant_heads`')."""
  mode = spec.partition(":")[0]
  changes = {}
  for key, value in _settings(spec).items():
    if key == "heads":
      continue
    for kind in (int, float, str):
      try:
        changes[key] = kind(value)
        break
      except ValueError:
        pass
  if mode in ("lookup", "draft", "medusa"):
    return config.replace(mode=mode, **changes)
  if mode == "heads":
    return config.replace(mode="medusa", lookup=0, **changes)
  return config.replace(mode="medusa", lookup=config.lookup or heads_lookup or config.draft_tokens, **changes)


def _tables(rows: list[dict]) -> dict:
  """{"overall": ..., "categories": {name: ...}} of one variant's rows (`summarize`)."""
  categories = sorted({r["category"] for r in rows})
  return {"overall": summarize(rows),
          "categories": {c: summarize([r for r in rows if r["category"] == c]) for c in categories}}


def _heads_accuracy(engine, convs, args) -> dict:
  """Measures the heads' accuracy on the prompts' first turns, prints it with the tokens per step
  the best trees of several sizes would reach, and (with --tree-nodes) switches the engine to the
  best tree of that size."""
  from medusa_jax.tuning.head_accuracy import head_accuracy
  from medusa_jax.tuning.tree_builder import tree_from_path_counts

  prompts = [engine.encode(c.user_turns[0]) for c in convs]
  acc = head_accuracy(engine, prompts, max_new_tokens=args.max_new_tokens, topk=args.topk)
  top1, top5 = acc.per_rank[:, 0], acc.per_rank[:, :5].sum(axis=1)
  print(f"head accuracy over {acc.positions} positions (head k guesses the token k + 2 ahead)")
  for k in range(len(top1)):
    print(f"  head {k}: top-1 {top1[k]:.3f}  top-5 {top5[k]:.3f}")
  def best_tree(n):
    return tree_from_path_counts(acc.path_counts, n, num_heads=len(top1), topk=args.topk)

  most = sum(args.topk ** d for d in range(1, len(top1) + 1))  # paths of ranks below topk
  sizes = sorted({2 ** i for i in range(11) if 2 ** i < most} | {min(most, 1024)}
                 | ({args.tree_nodes} if isinstance(args.tree_nodes, int) else set()))
  expected = {n: round(acc.expected_tokens_per_step(best_tree(n)), 4) for n in sizes}
  print("tokens per step the best tree of N nodes would reach on these answers: "
        + ", ".join(f"N={n}: {v:.2f}" for n, v in expected.items()))
  out = {"positions": acc.positions, "top1": top1.round(4).tolist(), "top5": top5.round(4).tolist(),
         "per_rank": acc.per_rank.round(5).tolist(), "expected_tokens_per_step": expected}
  nodes = args.tree_nodes
  if nodes == "auto":
    out["tree_tuning"] = _tune_tree_size(engine, best_tree, expected)
    nodes = max(out["tree_tuning"], key=lambda n: out["tree_tuning"][n]["predicted_speedup"])
  if nodes:
    paths = best_tree(nodes)
    engine.set_tree(paths)
    print(f"tree of {len(paths)} nodes (the paths right most often): {[list(p) for p in paths]}")
    if args.save_tree:
      write_json(args.save_tree, {"paths": [list(p) for p in paths], "heads_accuracy": out,
                                  "prompts": args.prompts, "max_new_tokens": args.max_new_tokens},
                 indent=1)
  return out


def _tune_tree_size(engine, best_tree, expected: dict) -> dict:
  """Times a plain step and a step over the best tree of each size, smallest first, on this
  device; predicted speedup = expected tokens per step / step time ratio. Stops at the first size
  whose step costs so much that even the most tokens per step could not beat the best speedup so
  far (a bigger tree never steps faster), so a CPU never times the GPU-sized trees."""
  from medusa_jax.medusa.tree import Tree
  from medusa_jax.tuning.step_timing import step_seconds

  plain = step_seconds(engine, None)
  print(f"plain decode step: {plain * 1e3:.1f} ms")
  tuning, most = {}, max(expected.values())
  for n, tokens in expected.items():
    ratio = step_seconds(engine, Tree(best_tree(n))) / plain
    tuning[n] = {"step_cost_ratio": round(ratio, 4), "predicted_speedup": round(tokens / ratio, 4)}
    print(f"  N={n}: step {ratio:.2f}x a plain step, predicted speedup {tokens / ratio:.2f}")
    if most / ratio < max(t["predicted_speedup"] for t in tuning.values()):
      print("  larger trees cannot beat that on this device: not timed")
      break
  return tuning


def _plot(result: dict, path: str) -> None:
  names = list(result["categories"]) + ["overall"]
  stats = [result["categories"].get(n, result["overall"]) for n in names]
  fig, axes = plot_figure(max(6, 1.2 * len(names)))
  for ax, key, label in zip(axes, ("mean_accepted_tokens", "speedup"), ("tokens per step", "speedup")):
    ax.bar(names, [s[key] for s in stats])
    ax.set_title(label)
  save_figure(fig, path)


if __name__ == "__main__":
  main()
