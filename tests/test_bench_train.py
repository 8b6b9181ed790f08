"""train/bench_train.py: its FLOP count against XLA's own count of the compiled step, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from medusa_jax.cli.bench_train import flops_per_token
from medusa_jax.training.batches import SequenceBatch
from medusa_jax.training.config import load_config
from medusa_jax.training.loop import setup

TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.mark.parametrize("overrides, tolerance", [
    (["share_lm_head=false"], 0.05),
    (["share_lm_head=true"], 0.05),
    (["method=medusa2", "lm_loss=kl"], 0.12),  # XLA also counts the rematerialised logits
])
def test_flops_per_token_matches_xla_cost_analysis(overrides, tolerance):
  """One vocab chunk (XLA counts a loop body once), so XLA's count of the compiled step covers
  every matmul; ours must agree up to elementwise work (and Medusa-2's recomputed logits)."""
  cfg = load_config(TINY, overrides + ["batch_size=2", "seq_len=128", "vocab_chunk=256"])
  run = setup(cfg)
  batch = SequenceBatch(np.zeros((2, 128), np.int32), np.ones((2, 128), bool))
  cost = run.step.lower(run.params, run.opt_state, run.base_state, batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla = cost["flops"] / (2 * 128)
  ours = flops_per_token(run.loaded.model.config, cfg)
  assert ours <= xla <= ours * (1 + tolerance), (ours, xla)


def test_bench_train_cli(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "bench_train.py"), TINY,
                         "method=medusa2", "--steps", "2", "--peak-tflops", "1", "--json"],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["method"] == "medusa2" and result["tokens_per_second"] > 0
  assert result["mfu"] == pytest.approx(result["tflops_per_second"] / result["devices"], abs=1e-3)
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "train", "bench_train.py"), TINY,
                        "cache_hidden=true"], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and bad.stderr.strip() == "error: bench_train times the full step: give cache.hidden=false"
