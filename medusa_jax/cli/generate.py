"""Answer a prompt with the embedded SmolLM2 model (or any model spec), baseline or Medusa.

    python infer/generate.py                       # embedded model + shipped heads, demo prompt
    python infer/generate.py --prompt "Hi" --json  # one JSON object per prompt
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from medusa_jax.cli.common import (
  add_draft_model_flag,
  add_generation_flags,
  add_mesh_flag,
  add_model_flags,
  generation_config,
  main_guard,
  quiet_logs,
)
from medusa_jax.decode.config import MODES

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p)
  p.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
  p.add_argument("--mode", default="auto", metavar="{" + ",".join(MODES) + "}",
                 help="auto = medusa when heads are loaded, else draft with --draft-model, else lookup with "
                      "--lookup K, else baseline; lookup = prompt lookup; draft = --draft-model")
  add_generation_flags(p)
  add_mesh_flag(p)
  add_draft_model_flag(p)
  p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
  p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  return p.parse_args(argv)


@main_guard
def main(argv=None):
  args = parse_args(argv)
  config = generation_config(args, mode=args.mode)  # bad settings: a one-line error before loading anything
  quiet_logs()
  import medusa_jax

  heads = None if args.heads == "none" else args.heads
  engine = medusa_jax.load(args.model, heads=heads, tree=args.tree, dtype=args.dtype,
                           draft_vocab=args.draft_vocab, mesh=args.mesh,
                           draft_model=args.draft_model)
  mode = engine.plan(config).mode
  prompts = args.prompt or [DEMO_PROMPT]
  results = engine.generate(prompts, config, chat=not args.no_chat)
  per_prompt = len(results) // len(prompts)  # beam search: --num-return-sequences each
  for i, r in enumerate(results):
    prompt = prompts[i // per_prompt]
    if args.json:
      print(json.dumps({"prompt": prompt, "mode": mode, **dataclasses.asdict(r)}))
    else:
      print(f">>> {prompt}\n{r.text}\n[{mode}: {r.new_tokens} tokens in {r.steps} steps, "
            f"{r.tokens_per_step:.2f} tokens/step, {r.tokens_per_second:.1f} tokens/s; compiled in {engine.compile_seconds:.1f} s]\n")


if __name__ == "__main__":
  main()
