"""Writes an ONNX model directory: `model.onnx` (`graph.py`) with its weights as external data
(`model.onnx.data`), the tokenizer files, onnxruntime-genai's `genai_config.json`, and `medusa.json`
(the heads' count, their tree and drafting vocabulary size) when heads are exported. Atomic: the
directory appears complete or not at all."""

from __future__ import annotations

import json
import os

import numpy as np

from medusa_jax.atomic import atomic_dir
from medusa_jax.errors import MedusaError

MODEL_FILE = "model.onnx"
MEDUSA_FILE = "medusa.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


def genai_config(config, eos_ids, pad_id: int, context: int) -> dict:
  """onnxruntime-genai's description of the plain decoder (greedy search by default)."""
  return {
      "model": {
          "type": "llama", "vocab_size": config.vocab_size, "context_length": context,
          "bos_token_id": config.bos_token_id, "eos_token_id": list(eos_ids), "pad_token_id": pad_id,
          "decoder": {
              "filename": MODEL_FILE, "session_options": {"provider_options": []},
              "hidden_size": config.hidden_size, "head_size": config.head_dim,
              "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
              "num_hidden_layers": config.num_layers,
              "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                         "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                         "past_value_names": "past_key_values.%d.value"},
              "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                          "present_value_names": "present.%d.value"},
          },
      },
      "search": {"max_length": context, "do_sample": False, "num_beams": 1, "top_k": 1, "top_p": 1.0,
                 "temperature": 1.0, "repetition_penalty": 1.0, "past_present_share_buffer": False,
                 "min_length": 0, "num_return_sequences": 1, "early_stopping": True,
                 "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
  }


def export_onnx(out: str, model, tokenizer, *, heads=None, draft=None, tree=None, eos_ids=(), pad_id: int = 0,
                dtype: str = "float32", force: bool = False) -> None:
  """`model` (a `Llama`) with Medusa `heads` (their `tree`, a `Tree`, and drafting vocabulary
  `draft`, a `DraftVocab` or None) to the directory `out`."""
  import onnx

  from medusa_jax.medusa.heads import HydraHeads
  from medusa_jax.onnx.graph import build

  if dtype not in DTYPES:
    raise MedusaError(f"unknown --dtype {dtype!r}; use float32 or float16")
  if isinstance(heads, HydraHeads):
    raise MedusaError("Hydra heads draft from the tokens of the path so far, which one ONNX forward does not "
                      "have; export Medusa heads (the embedded model's: --heads default)")
  if heads is not None and heads.blocks[0][0].linear.kernel.shape[0] != model.config.hidden_size:
    raise MedusaError(f"the heads do not match the model: they read {heads.blocks[0][0].linear.kernel.shape[0]}-wide "
                      f"hidden states, the model's are {model.config.hidden_size}")
  proto = build(model, heads, draft, weight_dtype=DTYPES[dtype])
  with atomic_dir(out, force=force) as tmp:
    onnx.save_model(proto, os.path.join(tmp, MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=MODEL_FILE + ".data", size_threshold=1024)
    if hasattr(tokenizer, "save_pretrained"):
      tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "genai_config.json"), "w") as f:
      json.dump(genai_config(model.config, eos_ids, pad_id, model.config.max_position_embeddings), f, indent=2)
    if heads is not None:
      with open(os.path.join(tmp, MEDUSA_FILE), "w") as f:
        json.dump({"num_heads": heads.config.num_heads, "paths": [list(p) for p in tree.paths],
                   "draft_vocab": 0 if draft is None else int(len(draft.ids))}, f, indent=1)
