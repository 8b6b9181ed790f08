"""The command-line tools (`infer/*.py`, `train/*.py` and the `medusa-*` console commands run these)."""
