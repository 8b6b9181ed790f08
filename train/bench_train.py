"""Runs `medusa_jax.cli.bench_train` (also installed as `medusa-bench-train`): `python train/bench_train.py --help`."""

from medusa_jax.cli.bench_train import main

if __name__ == "__main__":
  main()
