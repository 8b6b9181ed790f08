"""Runs `medusa_jax.cli.distill` (also installed as `medusa-distill`): `python train/distill.py --help`."""

from medusa_jax.cli.distill import main

if __name__ == "__main__":
  main()
