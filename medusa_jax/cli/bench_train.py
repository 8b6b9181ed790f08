"""Training speed: tokens/s and model FLOPs utilisation (MFU) of the jitted train step, after
warm-up, on synthetic full-length rows (every position labelled). Same config and `key=value`
overrides as train/train_heads.py:

    python train/bench_train.py configs/llama3-8b.yaml mesh.data=1 mesh.fsdp=1 mesh.tensor=1 batch_size=4 --steps 5
    python train/bench_train.py configs/tiny.yaml method=medusa2 --steps 10

FLOPs per token: a matmul costs 2 x its weights forward and 4 x backward (input and weight
gradients; 2 x for a frozen weight whose input needs a gradient); attention 4 x layers x seq x
q_dim forward. Medusa-1: backbone forward + heads forward and backward. Medusa-2: backbone (with
its LM head) forward and backward + heads + the frozen model's forward for lm_loss=kl.
Rematerialised recomputation is not counted. MFU = FLOP/s / (devices x peak), the peak being
--peak-tflops or the device's dense bf16 figure when known.
"""

from __future__ import annotations

import argparse
import json
import time

from medusa_jax.cli.common import main_guard, quiet_logs

# Dense bf16 peak TFLOP/s per device, by a substring of `jax.Device.device_kind`.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v6": 918.0,
               "TPU v5p": 459.0, "TPU v5": 197.0, "TPU v4": 275.0}


def flops_per_token(model_config, cfg) -> float:
  """Training FLOPs per token of one step (see the module docstring)."""
  c = model_config
  q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layers = c.num_layers * (2 * c.hidden_size * (q_dim + kv_dim) + 3 * c.hidden_size * c.intermediate_size)
  attention = 4 * c.num_layers * cfg.data.seq_len * q_dim
  vocab = c.hidden_size * c.vocab_size
  blocks = cfg.heads.num_heads * cfg.heads.num_layers * c.hidden_size ** 2
  heads_vocab = cfg.heads.num_heads * vocab
  if cfg.method == "medusa1":
    vocab_backward = 4 if not cfg.heads.share_lm_head else 2  # a shared lm_head is the frozen base one
    return (2 * layers + attention) + 6 * blocks + (2 + vocab_backward) * heads_vocab
  backbone = 3 * (2 * layers + attention + 2 * vocab)
  teacher = (2 * layers + attention + 2 * vocab) if cfg.medusa2.lm_loss == "kl" else 0
  return backbone + teacher + 6 * blocks + 6 * heads_vocab


@main_guard
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="a training YAML file")
  p.add_argument("overrides", nargs="*", help="key=value config overrides")
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  quiet_logs()
  import jax
  import numpy as np

  from medusa_jax import MedusaError
  from medusa_jax.model.sharding import batch_sharding
  from medusa_jax.training.batches import SequenceBatch
  from medusa_jax.training.config import load_config
  from medusa_jax.training.loop import setup

  if args.steps < 1:
    raise MedusaError("--steps must be at least 1")
  cfg = load_config(args.config, args.overrides)
  if cfg.cache.hidden:
    raise MedusaError("bench_train times the full step: give cache.hidden=false")
  run = setup(cfg)
  c = run.loaded.model.config
  rng = np.random.default_rng(cfg.seed)
  sharding = batch_sharding(run.mesh, 2)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = SequenceBatch(jax.device_put(rng.integers(0, c.vocab_size, shape, dtype=np.int32), sharding),
                        jax.device_put(np.ones(shape, bool), sharding))
  params, opt_state = run.params, run.opt_state
  start = time.perf_counter()
  params, opt_state, metrics = run.step(params, opt_state, run.base_state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.steps):
    params, opt_state, metrics = run.step(params, opt_state, run.base_state, batch)
  jax.block_until_ready((params, metrics))
  step_s = (time.perf_counter() - start) / args.steps
  tokens_per_s = cfg.data.batch_size * cfg.data.seq_len / step_s
  tflops = flops_per_token(c, cfg) * tokens_per_s / 1e12
  devices = jax.devices()
  peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in devices[0].device_kind),
                                  None)
  result = {"model": cfg.model.spec, "method": cfg.method, "device": devices[0].device_kind,
            "devices": len(devices), "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
            "compute_dtype": cfg.model.compute_dtype, "step_seconds": round(step_s, 4),
            "compile_seconds": round(compile_s, 1), "tokens_per_second": round(tokens_per_s, 1),
            "tflops_per_second": round(tflops, 3),
            "mfu": None if peak is None else round(tflops / (peak * len(devices)), 4)}
  if args.json:
    print(json.dumps(result))
    return
  mfu = "n/a (give --peak-tflops)" if result["mfu"] is None else f"{100 * result['mfu']:.1f}%"
  print(f"{cfg.model.spec} {cfg.method} on {len(devices)} x {result['device']}: {step_s * 1e3:.1f} ms/step, "
        f"{tokens_per_s:,.0f} tokens/s, {tflops:.2f} TFLOP/s, MFU {mfu} (compile {compile_s:.1f} s)")


if __name__ == "__main__":
  main()
