"""Reading llama.cpp GGUF files: config, dequantised HF-named tensors, and the tokenizer."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medusa_jax.errors import MedusaError

# llama.cpp tensor name -> Hugging Face Llama name ("{i}" is the layer index).
_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _open(path: str):
  import gguf

  if not os.path.isfile(path):
    raise MedusaError(f"model file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad files
    raise MedusaError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> half-rotation RoPE layout)."""
  return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader, path: str) -> dict[str, Any]:
  """A Hugging Face-style config dict from GGUF metadata."""
  arch = _field(reader, "general.architecture")
  if arch not in ("llama", "qwen2", "mistral"):
    raise MedusaError(f"{path}: unsupported GGUF architecture {arch!r} (need a Llama-family model)")
  a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
  heads = a("attention.head_count")
  hidden = a("embedding_length")
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = a("vocab_size") or (len(tokens.data) if tokens is not None else None)
  names = {t.name for t in reader.tensors}
  eos = _field(reader, "tokenizer.ggml.eos_token_id", 2)
  rope = {"rope_type": "default"}
  if a("rope.scaling.type") == "llama3" or "rope_freqs.weight" in names:
    raise MedusaError(f"{path}: GGUF rope frequency tables are not supported; use a HF directory")
  return {
      "model_type": arch,
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": a("feed_forward_length"),
      "num_hidden_layers": a("block_count"),
      "num_attention_heads": heads,
      "num_key_value_heads": a("attention.head_count_kv", heads),
      "head_dim": a("rope.dimension_count", hidden // heads),
      "rope_theta": a("rope.freq_base", 10_000.0),
      "rope_parameters": rope,
      "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-5),
      "tie_word_embeddings": "output.weight" not in names,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "max_position_embeddings": a("context_length", 4096),
      "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
      "eos_token_id": eos,
      "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", eos),
  }


def tokenizer_from_metadata(reader, path: str):
  """A Hugging Face fast tokenizer built from GGUF metadata with the `tokenizers` library (no
  torch needed): byte-level BPE ("gpt2" GGUF tokenizers: SmolLM2, Llama 3, Qwen2)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  kind = _field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise MedusaError(f"{path}: GGUF tokenizer type {kind!r} is not supported (byte-level BPE "
                      "only); use a Hugging Face directory with tokenizer files")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
  types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind in (3, 4)])  # control, user-defined

  def name(key):
    i = _field(reader, f"tokenizer.ggml.{key}_token_id")
    return None if i is None else tokens[int(i)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=name("bos"), eos_token=name("eos"), unk_token=name("unknown"),
      pad_token=name("padding") or name("eos"),
      chat_template=_field(reader, "tokenizer.chat_template"),
  )


def read_gguf(path: str):
  """(HF-style config, HF-named float32 tensors, tokenizer) of a GGUF file (F32/F16/Q8_0/Q4_0/
  Q4_1/...)."""
  from gguf.quants import dequantize

  reader = _open(path)
  config = hf_config(reader, path)
  permuted = config["model_type"] == "llama"  # llama.cpp permutes q/k rows of Llama models only
  tensors = {}
  for t in reader.tensors:
    name = t.name
    layer = None
    if name.startswith("blk."):
      layer = name.split(".")[1]
      name = name.replace(f"blk.{layer}.", "blk.{i}.", 1)
    if name not in _NAMES:
      continue
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    except Exception as e:
      raise MedusaError(f"{path}: cannot dequantise {t.name} ({t.tensor_type.name}): {e}") from None
    w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF shapes are [in, out]; PyTorch [out, in]
    if permuted and name in ("blk.{i}.attn_q.weight", "blk.{i}.attn_q.bias"):
      w = _unpermute(w, config["num_attention_heads"])
    elif permuted and name in ("blk.{i}.attn_k.weight", "blk.{i}.attn_k.bias"):
      w = _unpermute(w, config["num_key_value_heads"])
    tensors[_NAMES[name].format(i=layer)] = w
  return config, tensors, tokenizer_from_metadata(reader, path)
