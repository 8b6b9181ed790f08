"""Runs `medusa_jax.cli.export_onnx` (also installed as `medusa-export-onnx`): `python infer/export_onnx.py --help`."""

from medusa_jax.cli.export_onnx import main

if __name__ == "__main__":
  main()
