"""The backbone against transformers' PyTorch Llama/Qwen2 on random weights, and the KV cache
against a full forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medusa_jax.model.config import preset
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.weights.hf import read_dir
from medusa_jax.weights.specs import random_model


def _hf_model(tmp_path, kind, **overrides):
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

  base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
              max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
  base.update(overrides)
  torch.manual_seed(0)
  if kind == "qwen2":
    model = Qwen2ForCausalLM(Qwen2Config(**base))
    with torch.no_grad():  # random biases so the bias path is exercised
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  else:
    model = LlamaForCausalLM(LlamaConfig(**base))
  model.save_pretrained(tmp_path, safe_serialization=True)
  return model.eval()


CASES = {
    "gqa_untied": ("llama", {}),
    "mha_tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3_rope_scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2_bias": ("qwen2", {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
  kind, overrides = CASES[case]
  ref = _hf_model(tmp_path, kind, **overrides)
  model, _ = read_dir(str(tmp_path))
  tokens = np.random.default_rng(0).integers(0, 300, size=(2, 200))
  with torch.no_grad():
    expected = ref(torch.tensor(tokens)).logits.numpy()
  positions = np.broadcast_to(np.arange(200), tokens.shape)
  logits, _, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
  err = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
  assert err < 1e-4, err


def test_cached_decoding_equals_full_forward():
  model = random_model(preset("tiny"), seed=1)
  tokens = np.random.default_rng(1).integers(3, 500, size=(2, 24))
  positions = np.broadcast_to(np.arange(24), tokens.shape)
  full, _, _ = model(jnp.asarray(tokens), jnp.asarray(positions))

  cache = KVCache.init(model.config, 2, 64)
  first, _, cache = model(jnp.asarray(tokens[:, :10]), jnp.asarray(positions[:, :10]), cache)
  cache = cache.advance(jnp.full((2,), 10))
  steps = [first]
  for i in range(10, 24):
    logits, _, cache = model(jnp.asarray(tokens[:, i:i + 1]), jnp.asarray(positions[:, i:i + 1]), cache)
    cache = cache.advance(jnp.ones((2,), jnp.int32))
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), np.asarray(full),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_is_close_to_float32():
  config = preset("tiny")
  f32 = random_model(config, seed=2)
  bf16 = random_model(config, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 500, size=(1, 16)))
  positions = jnp.arange(16)[None]
  a, _, _ = f32(tokens, positions)
  b, _, _ = bf16(tokens, positions)
  assert b.dtype == jnp.float32  # logits are always float32
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 0.05 * np.abs(np.asarray(a)).max()
