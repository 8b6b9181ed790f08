"""Decode step time against the memory-bandwidth floor: a plain step and Medusa tree steps of
several sizes, at several batch sizes, with `--context` tokens already cached.

    python infer/bench_step.py --model random:llama3-8b --dtype bfloat16 --trees 0 4 16 63 --batch 1 4 16

A decode step must read every weight it uses once (the embedding table only for the rows it looks
up, unless the lm_head shares it) and the cached keys and values of the context, so it can take no
less than those bytes / the device's memory bandwidth: the floor (`--peak-gbps`, or the device's
figure when known). `--trees`: 0 is the plain one-token step; N > 0 a Medusa step over the first N
paths of the reference's `mc_sim_7b_63` tree (a tree name or JSON file also works). The heads are
random (4 heads, one ResBlock, sharing the lm_head) unless `--heads` names a directory: their
values do not change the time. Step times are the fastest of `--repeats` after a warm-up
(`medusa_jax.tuning.step_timing`).
"""

from __future__ import annotations

import argparse
import json

from medusa_jax.cli.common import (
  add_mesh_flag,
  add_model_flags,
  main_guard,
  quiet_logs,
  require_positive,
)

# Peak memory bandwidth in GB/s per device, by a substring of `jax.Device.device_kind` (first match).
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0,
             "A100": 1555.0, "L4": 300.0, "TPU v6": 1640.0, "TPU v5p": 2765.0, "TPU v5": 819.0,
             "TPU v4": 1200.0}


def _tree(spec: str, num_heads: int, vocab_size: int):
  from medusa_jax.medusa.tree import MC_SIM_7B_63, get_tree

  if spec.isdigit():
    return None if int(spec) == 0 else get_tree(MC_SIM_7B_63[: int(spec)], num_heads=num_heads)
  return get_tree(spec, num_heads=num_heads, vocab_size=vocab_size)


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, model_default="random:llama3-8b", heads_default="random",
                  heads_help="'random' or a heads directory", tree=False, draft_vocab=False,
                  dtype_default="bfloat16")
  p.add_argument("--trees", nargs="+", default=["0", "4", "16", "63"],
                 help="0: plain step; N: the first N paths of mc_sim_7b_63; or a tree name / JSON file")
  p.add_argument("--batch", nargs="+", type=int, default=[1])
  p.add_argument("--context", type=int, default=256, help="tokens already cached per row")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth for the floor")
  p.add_argument("--json", action="store_true", help="one JSON object per row")
  add_mesh_flag(p)
  args = p.parse_args(argv)
  quiet_logs()
  import jax

  from medusa_jax import MedusaError
  from medusa_jax.decode.engine import Engine
  from medusa_jax.formats.layout import read_heads
  from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
  from medusa_jax.medusa.tree import MC_SIM_7B_63
  from medusa_jax.model.sharding import parse_mesh
  from medusa_jax.tuning.step_timing import bytes_per_step, step_seconds
  from medusa_jax.weights.specs import load

  require_positive(args, "context", "repeats")
  if min(args.batch) < 1:
    raise MedusaError(f"--batch sizes must be at least 1, got {min(args.batch)}")
  if any(t.isdigit() and int(t) > len(MC_SIM_7B_63) for t in args.trees):
    raise MedusaError(f"--trees N takes at most the {len(MC_SIM_7B_63)} paths of mc_sim_7b_63")
  loaded = load(args.model, dtype=args.dtype)
  model = loaded.model
  heads = (MedusaHeads.for_model(model, HeadsConfig(4, 1, share_lm_head=True)) if args.heads == "random"
           else read_heads(args.heads, model))
  engine = Engine(model, loaded.tokenizer, heads=heads, tree=MC_SIM_7B_63[:1], name=loaded.name,
                  mesh=parse_mesh(args.mesh) if args.mesh else None)
  trees = [_tree(t, heads.config.num_heads, model.config.vocab_size) for t in args.trees]
  device = jax.devices()[0].device_kind
  peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in device), None)
  itemsize = jax.numpy.dtype(engine.dtype).itemsize
  rows = []
  for batch in args.batch:
    plain = None
    for spec, tree in zip(args.trees, trees):
      seconds = step_seconds(engine, tree, batch=batch, context=args.context, repeats=args.repeats)
      plain = seconds if tree is None else plain
      moved = bytes_per_step(engine.state, None if tree is None else engine.heads_state, engine.config,
                             batch=batch, context=args.context, cache_itemsize=itemsize)
      floor = None if peak is None else moved / (peak * 1e9)
      rows.append({"model": loaded.name, "device": device, "dtype": args.dtype, "batch": batch,
                   "context": args.context, "tree": spec, "tokens_per_row": 1 if tree is None else tree.size,
                   "ms_per_step": round(seconds * 1e3, 4), "gb_read": round(moved / 1e9, 6),
                   "gb_per_second": round(moved / seconds / 1e9, 1),
                   "floor_ms": None if floor is None else round(floor * 1e3, 4),
                   "percent_of_floor": None if floor is None else round(100 * floor / seconds, 1),
                   "cost_vs_plain": None if plain is None else round(seconds / plain, 3)})
  if args.json:
    for r in rows:
      print(json.dumps(r))
    return
  print(f"{loaded.name} ({args.dtype}) on {device}, {args.context} tokens cached; floor at "
        f"{'unknown bandwidth (give --peak-gbps)' if peak is None else f'{peak:.0f} GB/s'}")
  print(f"{'batch':>5} {'tree':>14} {'tokens':>6} {'ms/step':>9} {'GB read':>8} {'GB/s':>7} "
        f"{'floor ms':>9} {'% floor':>8} {'x plain':>8}")
  for r in rows:
    cells = [r["floor_ms"], r["percent_of_floor"], r["cost_vs_plain"]]
    print(f"{r['batch']:>5} {r['tree']:>14} {r['tokens_per_row']:>6} {r['ms_per_step']:>9.3f} "
          f"{r['gb_read']:>8.3f} {r['gb_per_second']:>7.1f} "
          + " ".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, (9, 8, 8))))


if __name__ == "__main__":
  main()
