"""Runs `medusa_jax.cli.onnx_generate` (also installed as `medusa-onnx-generate`): `python infer/onnx_generate.py --help`."""

from medusa_jax.cli.onnx_generate import main

if __name__ == "__main__":
  main()
