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
  generation_config,
  main_guard,
  quiet_logs,
)
from medusa_jax.decode.config import MODES
from medusa_jax.medusa.draft_vocab import DEFAULT_SIZE
from medusa_jax.weights.specs import EMBEDDED_MODEL

DEMO_PROMPT = "Explain in three sentences why the sky is blue."


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default=EMBEDDED_MODEL,
                 help="smollm2-135m-instruct, a .gguf file, a HF directory, or random:<preset>")
  p.add_argument("--prompt", action="append", help="a user message (repeat for a batch)")
  p.add_argument("--heads", default="default",
                 help="Medusa heads directory; 'default' = shipped heads of the embedded model; 'none'")
  p.add_argument("--mode", choices=MODES, default="auto",
                 help="auto = medusa when heads are loaded, else baseline; lookup = prompt lookup; draft = --draft-model")
  p.add_argument("--tree", default=None, help="tree name (mc_sim_7b_63, vicuna_7b_stage2, chain1..5), a JSON list of paths, or a .json file of them")
  p.add_argument("--draft-vocab", type=int, default=DEFAULT_SIZE,
                 help="the heads guess among the N most frequent answer tokens in their "
                      "draft_vocab.json (0: the whole vocabulary)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  add_generation_flags(p)
  add_mesh_flag(p)
  add_draft_model_flag(p)
  p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, no chat template")
  p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
  return p.parse_args(argv)


@main_guard
def main(argv=None):
  args = parse_args(argv)
  quiet_logs()
  import medusa_jax

  heads = None if args.heads == "none" else args.heads
  engine = medusa_jax.load(args.model, heads=heads, tree=args.tree, dtype=args.dtype,
                           draft_vocab=args.draft_vocab, mesh=args.mesh,
                           draft_model=args.draft_model)
  mode = engine.resolve_mode(args.mode)
  prompts = args.prompt or [DEMO_PROMPT]
  results = engine.generate(prompts, generation_config(args, mode=mode), chat=not args.no_chat)
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
