"""Runs `medusa_jax.cli.serve` (also installed as `medusa-serve`): `python infer/serve.py --help`."""

from medusa_jax.cli.serve import main

if __name__ == "__main__":
  main()
