"""Shared fixtures: tiny random models, the embedded SmolLM2 model and its PyTorch reference."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
  """The embedded model as a `medusa_jax.Engine` (float32)."""
  import medusa_jax

  return medusa_jax.load("smollm2-135m-instruct", max_cache_len=2048)


@pytest.fixture(scope="session")
def smollm2_torch():
  """transformers' own PyTorch `LlamaForCausalLM`, loaded by transformers from the same GGUF."""
  import torch
  from transformers import LlamaForCausalLM

  from medusa_jax.weights.specs import embedded_gguf_path

  path = embedded_gguf_path()
  model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                           dtype=torch.float32)
  return model.eval()
