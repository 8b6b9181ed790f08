"""Runs `medusa_jax.cli.export_hf` (also installed as `medusa-export`): `python infer/export_hf.py --help`."""

from medusa_jax.cli.export_hf import main

if __name__ == "__main__":
  main()
