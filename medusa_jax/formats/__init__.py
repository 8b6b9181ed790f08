"""On-disk heads and model formats, each a read + write pair (Medusa/TGI, vLLM, EAGLE, HF Llama, orbax runs), and the one place that tells which layout a directory holds."""

FORMATS = ("medusa", "vllm", "eagle3", "speculators", "hf-llama")  # what `layout.export` writes
