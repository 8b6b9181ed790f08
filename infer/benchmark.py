"""Runs `medusa_jax.cli.benchmark` (also installed as `medusa-benchmark`): `python infer/benchmark.py --help`."""

from medusa_jax.cli.benchmark import main

if __name__ == "__main__":
  main()
