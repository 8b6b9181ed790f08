"""Greedy decoding of an exported ONNX directory on onnxruntime, plain or Medusa (the heads' tree).

    python infer/onnx_generate.py --model out/onnx --prompt "Hi" --json
    python infer/onnx_generate.py --model out/onnx --mode baseline

`--json` prints the fields `infer/generate.py --json` prints.
"""

from __future__ import annotations

import argparse
import json

from medusa_jax.cli.common import main_guard, quiet_logs, require_positive
from medusa_jax.cli.generate import DEMO_PROMPT
from medusa_jax.errors import MedusaError


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="a directory written by infer/export_onnx.py")
  p.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--mode", choices=["auto", "baseline", "medusa"], default="auto",
                 help="auto = medusa when the model was exported with heads")
  p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
  p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  args = p.parse_args(argv)
  require_positive(args, "max_new_tokens")
  quiet_logs()
  from medusa_jax.model.tokenizer import encode_chat
  from medusa_jax.onnx.runner import OnnxDecoder

  decoder = OnnxDecoder(args.model)
  if decoder.tokenizer is None:
    raise MedusaError(f"{args.model} holds no tokenizer files")
  mode = args.mode if args.mode != "auto" else ("medusa" if decoder.tree is not None else "baseline")
  prompts = args.prompt or [DEMO_PROMPT]
  ids = [encode_chat(decoder.tokenizer, prompt, not args.no_chat) for prompt in prompts]
  tokens, counts, steps, seconds = decoder.generate_ids(ids, args.max_new_tokens, mode)
  for prompt, row, n, s in zip(prompts, tokens, counts, steps):
    token_ids = [int(t) for t in row[:n]]
    text = decoder.tokenizer.decode(token_ids, skip_special_tokens=True)
    result = {"prompt": prompt, "mode": mode, "text": text, "token_ids": token_ids, "new_tokens": int(n),
              "steps": int(s), "tokens_per_step": n / s, "seconds": seconds,
              "tokens_per_second": n / seconds}
    if args.json:
      print(json.dumps(result))
    else:
      print(f">>> {prompt}\n{text}\n[{mode}: {n} tokens in {s} steps, {n / s:.2f} tokens/step, "
            f"{result['tokens_per_second']:.1f} tokens/s]\n")


if __name__ == "__main__":
  main()
