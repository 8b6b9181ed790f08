"""Plain-decoding speed: our jitted baseline against transformers' PyTorch `generate`, same model,
same prompts, same process, greedy, after warm-up; with `--onnx DIR` (from `infer/export_onnx.py
--heads default`) also onnxruntime plain and Medusa, and the JAX engine with the same Medusa-type
heads.

    python infer/bench_decode.py --max-new-tokens 64 --prompts 3
    python infer/bench_decode.py --max-new-tokens 64 --prompts 4 --onnx out/onnx
"""

from __future__ import annotations

import argparse
import os
import time

from medusa_jax.cli.common import add_model_flags, main_guard, quiet_logs

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works, step by step.",
    "List ten tips for staying productive when working from home.",
    "Describe the water cycle to a ten-year-old.",
]


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, heads=False, tree=False, draft_vocab=False, dtype=False)
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--prompts", type=int, default=3, help="how many of the built-in prompts")
  p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
  p.add_argument("--onnx", default=None, help="an exported ONNX directory to time on onnxruntime too")
  args = p.parse_args(argv)
  quiet_logs()
  import numpy as np

  import medusa_jax

  engine = medusa_jax.load(args.model, heads=None)
  ids = [engine.encode(q) for q in PROMPTS[: args.prompts]]
  n = args.max_new_tokens
  engine.eos_ids = engine.eos_ids[:0] - 1  # no early stop: every run decodes exactly n tokens
  engine.generate_ids(ids[:1], max_new_tokens=n)  # warm-up (compiles)
  jax_s = [engine.generate_ids([x], max_new_tokens=n).seconds for x in ids]
  print(f"jax baseline: {n / np.median(jax_s):.1f} tokens/s (median of {len(ids)}; "
        f"compile {engine.compile_seconds:.1f} s)")
  if args.onnx:
    _onnx(args.onnx, args.model, ids, n)
  if args.no_torch or engine.name != medusa_jax.EMBEDDED_MODEL:
    return
  import torch
  from transformers import LlamaForCausalLM

  from medusa_jax.weights.specs import embedded_gguf_path

  path = embedded_gguf_path()
  ref = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         dtype=torch.float32).eval()
  kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2)
  with torch.no_grad():
    ref.generate(torch.tensor([ids[0]]), **kw)
    torch_s = []
    for x in ids:
      start = time.perf_counter()
      ref.generate(torch.tensor([x]), **kw)
      torch_s.append(time.perf_counter() - start)
  print(f"transformers generate: {n / np.median(torch_s):.1f} tokens/s; "
        f"jax speedup {np.median(torch_s) / np.median(jax_s):.2f}x")


def _onnx(directory: str, model: str, ids: list[list[int]], n: int) -> None:
  """onnxruntime plain and Medusa against the JAX engine's Medusa with the same heads."""
  import numpy as np

  import medusa_jax
  from medusa_jax.onnx.runner import OnnxDecoder
  from medusa_jax.weights.specs import default_heads

  decoder = OnnxDecoder(directory)
  decoder.eos_ids = np.asarray([-1])
  modes = ["baseline"] + (["medusa"] if decoder.tree is not None else [])
  for mode in modes:
    decoder.generate_ids(ids[:1], n, mode)  # warm-up
    runs = [decoder.generate_ids([x], n, mode) for x in ids]
    print(f"onnxruntime {mode}: {n / np.median([r[3] for r in runs]):.1f} tokens/s, "
          f"{np.sum([r[1] for r in runs]) / np.sum([r[2] for r in runs]):.2f} tokens/step")
  heads = default_heads(model, medusa_type=True)
  if decoder.tree is None or heads is None:
    return
  engine = medusa_jax.load(model, heads=heads, tree=[list(p) for p in decoder.tree.paths])
  engine.eos_ids = engine.eos_ids[:0] - 1
  engine.generate_ids(ids[:1], max_new_tokens=n)
  runs = [engine.generate_ids([x], max_new_tokens=n) for x in ids]
  print(f"jax medusa (the same heads and tree): {n / np.median([r.seconds for r in runs]):.1f} tokens/s, "
        f"{np.sum([r.num_tokens for r in runs]) / np.sum([r.steps for r in runs]):.2f} tokens/step")


if __name__ == "__main__":
  main()
