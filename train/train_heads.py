"""Train Medusa heads from a YAML config with key=value overrides.

    python train/train_heads.py configs/tiny.yaml output_dir=runs/tiny max_steps=50 mesh.data=2
    python train/train_heads.py configs/tiny.yaml method=medusa2 heads_weight=0.2   # joint training

Writes `metrics.jsonl` and orbax checkpoints under `output_dir`, resumes from the latest one there,
and exports the final heads as a Medusa directory `output_dir/heads` (with `draft_vocab.json`: the
training answers' tokens by frequency, the heads' drafting vocabulary); a Medusa-2 run also exports
its trained backbone as a Hugging Face Llama directory `output_dir/model` (use both together:
`--model output_dir/model --heads output_dir/heads`).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from medusa_jax.cli import main_guard, quiet_logs  # noqa: E402


@main_guard
def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return
  quiet_logs()
  from medusa_jax import draft_vocab, loading
  from medusa_jax.export import export
  from medusa_jax.heads_io import save_heads
  from medusa_jax.train_config import load_config
  from medusa_jax.trainer import prepare_data, train, trained_model

  path, overrides = (argv[0], argv[1:]) if not argv[0].count("=") else (None, argv)
  cfg = load_config(path, overrides)
  last = train(cfg)
  loaded = loading.load(cfg.model)
  base, heads = trained_model(cfg, loaded.model)
  written = [os.path.join(cfg.output_dir, "heads")]
  if cfg.method == "medusa2":
    written.append(os.path.join(cfg.output_dir, "model"))
    export("hf-llama", written[1], model=base, heads=None, base_name=cfg.model,
           tokenizer=loaded.tokenizer, force=True)
  save_heads(heads, written[0], base_model=written[1] if len(written) > 1 else cfg.model,
             hidden_size=base.config.hidden_size, vocab_size=base.config.vocab_size, force=True)
  tokens, mask, _, _ = prepare_data(cfg, loaded.tokenizer, base.config.pad_token_id)
  draft_vocab.save(written[0], *draft_vocab.rank_by_frequency([tokens[mask]]))
  print(f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}; wrote "
        f"{' and '.join(written)}")


if __name__ == "__main__":
  main()
