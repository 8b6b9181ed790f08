"""Runs `medusa_jax.cli.bench_decode` (also installed as `medusa-bench-decode`): `python infer/bench_decode.py --help`."""

from medusa_jax.cli.bench_decode import main

if __name__ == "__main__":
  main()
