"""An OpenAI-compatible server for a model and its Medusa heads, with continuous batching.

    python infer/serve.py                                   # the embedded model + shipped heads on 127.0.0.1:8000
    python infer/serve.py --heads none --max-batch 16       # the plain model
    python infer/serve.py --heads none --lookup 4           # the plain model with prompt lookup
    python infer/serve.py --draft-model SPEC --draft-tokens 4   # a draft model (or self:L) drafts

Endpoints: GET /health (200 once plain decoding is compiled, with what is compiled so far: the
drafting programs keep compiling in the background and join as they are ready), GET /v1/models, POST /v1/chat/completions and
/v1/completions (`stream`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `ignore_eos`),
GET /metrics (Prometheus). Each chunk of decode steps runs the drafter, a cheaper one (a smaller
tree) or plain decoding, whichever this device's measured step times predict to be fastest for the
rows live then. SIGTERM
lets in-flight requests finish (up to 30 s) before it exits.
"""

from __future__ import annotations

import argparse
import sys

from medusa_jax.cli.common import (
  add_draft_model_flag,
  add_mesh_flag,
  add_model_flags,
  main_guard,
  quiet_logs,
  require_positive,
)
from medusa_jax.errors import MedusaError


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_model_flags(p, heads_default=None, heads_help="heads directory, 'default' or 'none' (default: "
                                                     "'default', or 'none' with --draft-model)")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=8, help="slots: requests decoded at once")
  p.add_argument("--max-context", type=int, default=2048, help="prompt + completion tokens per request")
  p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
  p.add_argument("--chunk-steps", type=int, default=4, help="decode steps per device call")
  p.add_argument("--served-model-name", default=None, help="the model id clients ask for")
  p.add_argument("--lookup", type=int, default=None,
                 help="a prompt-lookup chain of K tokens: grafted onto the heads' tree (default: the heads' "
                      "tree.json), or with --heads none prompt lookup alone (default: plain decoding)")
  p.add_argument("--min-ngram", type=int, default=None,
                 help="graft the chain only on steps where the last N or more tokens occurred before "
                      "(0: every step; default as infer/generate.py)")
  add_draft_model_flag(p)
  p.add_argument("--draft-tokens", type=int, default=None, help="with --draft-model: tokens drafted per step")
  p.add_argument("--draft-tree", default=None, help="with --draft-model: a tree of its top-k tokens instead")
  add_mesh_flag(p)
  args = p.parse_args(argv)
  require_positive(args, "max_batch", "max_context", "max_queue", "chunk_steps", "port", "draft_tokens")
  if args.draft_model and args.heads not in (None, "none"):
    raise MedusaError("--draft-model drafts instead of heads: leave out --heads (or pass --heads none)")
  heads = args.heads or ("none" if args.draft_model else "default")
  quiet_logs()
  import uvicorn

  import medusa_jax
  from medusa_jax.decode.config import GenerationConfig
  from medusa_jax.serve.api import create_app
  from medusa_jax.serve.scheduler import Scheduler

  engine = medusa_jax.load(args.model, heads=None if heads == "none" else heads, tree=args.tree,
                           dtype=args.dtype, draft_vocab=args.draft_vocab, mesh=args.mesh,
                           draft_model=args.draft_model)
  given = dict(lookup=args.lookup, min_ngram=args.min_ngram, draft_tokens=args.draft_tokens,
               draft_tree=args.draft_tree)
  config = GenerationConfig(**{k: v for k, v in given.items() if v is not None})
  scheduler = Scheduler(engine.loaded, config, max_batch=args.max_batch, max_context=args.max_context,
                        chunk_steps=args.chunk_steps, max_queue=args.max_queue,
                        log=lambda line: print(f"medusa-serve: {line}", file=sys.stderr, flush=True))
  app = create_app(scheduler, args.served_model_name or engine.name)
  print(f"medusa-serve: listening on http://{args.host}:{args.port} (/health says when it serves)", file=sys.stderr,
        flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)


if __name__ == "__main__":
  main()
