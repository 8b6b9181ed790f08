"""Plain-decoding speed: our jitted baseline against transformers' PyTorch `generate`, same model,
same prompts, same process, greedy, after warm-up.

    python infer/bench_decode.py --max-new-tokens 64 --prompts 3
"""

from __future__ import annotations

import argparse
import os
import time

from medusa_jax.cli.common import main_guard, quiet_logs

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works, step by step.",
    "List ten tips for staying productive when working from home.",
    "Describe the water cycle to a ten-year-old.",
]


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2-135m-instruct")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--prompts", type=int, default=3, help="how many of the built-in prompts")
  p.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
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


if __name__ == "__main__":
  main()
