"""Runs `medusa_jax.cli.generate` (also installed as `medusa-generate`): `python infer/generate.py --help`."""

from medusa_jax.cli.generate import main

if __name__ == "__main__":
  main()
