"""Runs `medusa_jax.cli.build_prompts` (also installed as `medusa-build-prompts`): `python train/build_prompts.py --help`."""

from medusa_jax.cli.build_prompts import main

if __name__ == "__main__":
  main()
