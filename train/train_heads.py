"""Runs `medusa_jax.cli.train_heads` (also installed as `medusa-train`): `python train/train_heads.py --help`."""

from medusa_jax.cli.train_heads import main

if __name__ == "__main__":
  main()
