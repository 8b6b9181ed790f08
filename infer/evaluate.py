"""Runs `medusa_jax.cli.evaluate` (also installed as `medusa-evaluate`): `python infer/evaluate.py --help`."""

from medusa_jax.cli.evaluate import main

if __name__ == "__main__":
  main()
