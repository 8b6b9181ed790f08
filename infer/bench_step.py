"""Runs `medusa_jax.cli.bench_step` (also installed as `medusa-bench-step`): `python infer/bench_step.py --help`."""

from medusa_jax.cli.bench_step import main

if __name__ == "__main__":
  main()
