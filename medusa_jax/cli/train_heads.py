"""Train Medusa heads from a YAML config with key=value overrides.

    python train/train_heads.py configs/tiny.yaml output_dir=runs/tiny max_steps=50 mesh.data=2
    python train/train_heads.py configs/tiny.yaml method=medusa2 medusa2.heads_weight=0.2   # joint training

Writes `metrics.jsonl` and orbax checkpoints under `output_dir`, resumes from the latest one there,
and exports the final heads as a Medusa directory `output_dir/heads` (with `draft_vocab.json`: the
training answers' tokens by frequency, the heads' drafting vocabulary; `heads.head_type=eagle`: an
EAGLE drafter directory, `medusa_jax/formats/eagle.py`); a Medusa-2 run also exports
its trained backbone as a Hugging Face Llama directory `output_dir/model` (use both together:
`--model output_dir/model --heads output_dir/heads`). `heads.init=DIR` starts from trained heads
(any heads directory, e.g. Medusa-1's for the two-stage Medusa-2 recipe).

Several hosts: every process runs the same command with `--coordinator HOST:PORT` (process 0's
address), `--num-processes N` and `--process-id I` (auto-detected on TPU pods and under SLURM when
omitted); the mesh spans every process's devices, each reads only its rows of each batch, and
process 0 writes the metrics and exported heads (`medusa_jax/training/distributed.py`).
"""

from __future__ import annotations

import os
import sys

from medusa_jax.cli.common import main_guard, quiet_logs
from medusa_jax.errors import MedusaError


@main_guard
def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return
  quiet_logs()
  argv, processes = _process_flags(argv)
  import numpy as np

  from medusa_jax.formats import eagle as eagle_format
  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.formats.layout import read_heads
  from medusa_jax.medusa import draft_vocab
  from medusa_jax.training import distributed
  from medusa_jax.training.checkpoints import trained_model
  from medusa_jax.training.config import load_config
  from medusa_jax.training.loop import prepare_data, train
  from medusa_jax.weights import hf, specs

  distributed.initialize(**processes)
  path, overrides = (argv[0], argv[1:]) if argv and not argv[0].count("=") else (None, argv)
  cfg = load_config(path, overrides)
  loaded = specs.load(cfg.model.spec)
  init = read_heads(cfg.heads.init, loaded.model) if cfg.heads.init else None
  last = train(cfg, init_heads=init)
  base, heads = trained_model(cfg, loaded.model)  # every process restores; process 0 writes
  if not distributed.is_main():
    return
  heads_dir, model_dir = os.path.join(cfg.output_dir, "heads"), os.path.join(cfg.output_dir, "model")
  if cfg.method == "medusa2":
    hf.write_dir(model_dir, base, tokenizer=loaded.tokenizer, force=True)
  train_rows, _ = prepare_data(cfg, loaded.tokenizer, base.config.pad_token_id)
  ids, counted = draft_vocab.rank_by_frequency([train_rows.tokens[train_rows.mask]])
  if cfg.heads.head_type == "eagle":
    eagle_format.write(heads_dir, heads, ids[: heads.config.draft_vocab_size] if cfg.heads.draft_vocab
                       else np.arange(base.config.vocab_size), base, base_model=cfg.model.spec, force=True)
    print(f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}; wrote {heads_dir}")
    return
  medusa_format.write(heads_dir, heads, base,
                      base_model=model_dir if cfg.method == "medusa2" else cfg.model.spec,
                      lm_head_copies=False, draft_ids=ids, draft_tokens_counted=counted, force=True)
  written = " and ".join([heads_dir] + ([model_dir] if cfg.method == "medusa2" else []))
  print(f"step {last.get('step')}: loss {last.get('loss', float('nan')):.4f}; wrote {written}")


def _process_flags(argv: list[str]) -> tuple[list[str], dict]:
  """`argv` without the multi-process flags, and their values (`distributed.initialize`'s
  keywords)."""
  names = {"--coordinator": ("coordinator", str), "--num-processes": ("num_processes", int),
           "--process-id": ("process_id", int)}
  rest, values = [], {}
  it = iter(argv)
  for arg in it:
    flag, eq, value = arg.partition("=")
    if flag not in names:
      rest.append(arg)
      continue
    value = value if eq else next(it, None)
    key, kind = names[flag]
    try:
      values[key] = kind(value)
    except (TypeError, ValueError):
      raise MedusaError(f"{flag} needs a value ({'HOST:PORT' if kind is str else 'a whole number'})") from None
  return rest, values


if __name__ == "__main__":
  main()
