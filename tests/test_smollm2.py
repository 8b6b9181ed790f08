"""Integration: the embedded SmolLM2-135M-Instruct against transformers' PyTorch Llama loaded by
transformers itself from the same GGUF (slow: runs in CI, on the real weights)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import CHAT_PROMPTS

pytestmark = pytest.mark.slow


def test_logits_match_transformers(smollm2, smollm2_torch):
  prompts = CHAT_PROMPTS + ["The quick brown fox jumps over the lazy dog. " * 8]
  model = smollm2.model
  for p in prompts:
    ids = np.asarray([smollm2.encode(p)])
    with torch.no_grad():
      expected = smollm2_torch(torch.tensor(ids)).logits.numpy()
    logits, _, _ = model(jnp.asarray(ids), jnp.arange(ids.shape[1])[None])
    rel = np.linalg.norm(np.asarray(logits) - expected) / np.linalg.norm(expected)
    assert rel < 1e-4, (p, rel)


def test_greedy_64_tokens_identical_to_transformers(smollm2, smollm2_torch):
  ids = [smollm2.encode(p) for p in CHAT_PROMPTS]
  tokens, counts, _, _ = smollm2.generate_ids(ids, max_new_tokens=64, mode="baseline")
  for prompt, row, n in zip(ids, tokens, counts):
    with torch.no_grad():
      ref = smollm2_torch.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                   eos_token_id=list(np.asarray(smollm2.eos_ids)), pad_token_id=2)
    ref = ref[0, len(prompt):].tolist()
    assert list(row[:n]) == ref[: int(n)]
    assert int(n) == len(ref)


def test_medusa_greedy_identical_on_real_model(smollm2):
  """Greedy Medusa on SmolLM2 with random non-zero heads over the 63-node tree equals greedy
  baseline, a batch of 4 (batch 1 and other trees: the tiny models' tests)."""
  from helpers import random_heads

  from medusa_jax.decode.engine import Engine
  from medusa_jax.medusa.heads import HeadsConfig

  model = smollm2.model
  engine = Engine(model, smollm2.tokenizer, heads=random_heads(model, HeadsConfig(4, 1, True), scale=0.02),
                  tree="mc_sim_7b_63", max_cache_len=2048)
  prompts = [smollm2.encode(p) for p in CHAT_PROMPTS + ["Count from one to twenty in words."]]
  base, base_n, _, _ = engine.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  med, med_n, _, _ = engine.generate_ids(prompts, max_new_tokens=48, mode="medusa")
  np.testing.assert_array_equal(med_n, base_n)
  np.testing.assert_array_equal(med, base)


def test_shipped_heads_are_lossless_and_accept_several_tokens(smollm2):
  """The default heads, tree and lookup chain of the embedded model: greedy Medusa equals greedy
  baseline (batch of 4) and the heads do accept tokens (a trained head, not the identity it starts
  as)."""
  from medusa_jax.weights.specs import default_heads

  assert default_heads("smollm2-135m-instruct") and smollm2.plan().mode == "medusa"
  prompts = [smollm2.encode(p) for p in CHAT_PROMPTS + ["What is 12 times 7? Answer step by step."]]
  base, base_n, _, _ = smollm2.generate_ids(prompts, max_new_tokens=64, mode="baseline")
  med, med_n, steps, _ = smollm2.generate_ids(prompts, max_new_tokens=64, mode="medusa")
  np.testing.assert_array_equal(med_n, base_n)
  np.testing.assert_array_equal(med, base)
  assert med_n.sum() / steps.sum() > 1.3, (med_n, steps)


def test_every_drafter_is_lossless_on_the_embedded_model(smollm2):
  """Prompt lookup, self-drafting with the first 8 layers and the shipped heads' trees built per
  step by beam search: greedy output equals greedy baseline (a batch of 3, one that copies its
  context). The shipped heads with their lookup chain are the default, tested above."""
  prompts = [smollm2.encode(p) for p in CHAT_PROMPTS[:2] + [
      "Repeat this sentence twice: the cat sat on the mat and looked at the door."]]
  base, base_n, _, _ = smollm2.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  smollm2.set_draft_model("self:8")
  for settings in (dict(mode="lookup", draft_tokens=4), dict(mode="draft", draft_tokens=3),
                   dict(mode="medusa", draft_beams=4, draft_depth=3, tree_budget=9)):
    out, n, steps, _ = smollm2.generate_ids(prompts, max_new_tokens=48, **settings)
    np.testing.assert_array_equal(n, base_n, err_msg=str(settings))
    np.testing.assert_array_equal(out, base, err_msg=str(settings))
    if settings["mode"] != "draft":  # 8 of 30 layers seldom guess right; they must stay lossless
      assert n.sum() / steps.sum() > 1.05, (settings, n, steps)
  smollm2.set_draft_model(None)


def test_beam_search_equals_transformers_and_the_heads_speed_it_up(smollm2, smollm2_torch):
  """Beam search (2 beams) gives transformers' best sequence; speculative beam search (each beam
  drafts the shipped heads' tree) gives the same hypotheses in fewer forwards."""
  prompts = [smollm2.encode(p) for p in CHAT_PROMPTS]
  beam = smollm2.generate_ids(prompts, mode="beam", num_beams=2, num_return_sequences=2, max_new_tokens=40)
  with torch.no_grad():
    ref = smollm2_torch.generate(torch.tensor([prompts[0]]), num_beams=2, do_sample=False, max_new_tokens=40,
                                 eos_token_id=list(np.asarray(smollm2.eos_ids)), pad_token_id=2)
  n = int(beam.num_tokens[0])
  assert list(beam.tokens[0, :n]) == ref[0, len(prompts[0]):len(prompts[0]) + n].tolist()
  spec = smollm2.generate_ids(prompts, mode="beam", num_beams=2, num_return_sequences=2, max_new_tokens=40,
                              beam_heads=True)
  np.testing.assert_array_equal(spec.num_tokens, beam.num_tokens)
  np.testing.assert_array_equal(spec.tokens, beam.tokens)
  assert spec.steps[0] < beam.steps[0], (spec.steps, beam.steps)


def test_shipped_medusa_type_heads_export_for_tgi(smollm2, tmp_path):
  """The default heads are Hydra heads (only this project decodes them); `--heads default` exports
  their Medusa-type sibling, whose Medusa layout draws TGI's whole-vocabulary top-1 from the
  drafting vocabulary (lm_head rows outside it are zero) on the model's real hidden states."""
  import os
  import subprocess
  import sys

  from safetensors.numpy import load_file

  from medusa_jax.formats.layout import read_heads
  from medusa_jax.medusa.draft_vocab import DraftVocab, read
  from medusa_jax.weights.specs import default_heads

  assert smollm2.heads.config.head_type == "hydra"
  medusa_dir = default_heads("smollm2-135m-instruct", medusa_type=True)
  heads = read_heads(medusa_dir, smollm2.model)
  assert heads.config.head_type == "medusa"
  out = tmp_path / "tgi"
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "infer", "export_hf.py")
  proc = subprocess.run([sys.executable, script, "--heads", "default", "--format", "medusa",
                         "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  w = load_file(str(out / "medusa_lm_head.safetensors"))
  ids = read(medusa_dir, 8192)
  tokens = jnp.asarray([smollm2.encode(p) for p in CHAT_PROMPTS[:1]])
  hidden, _ = smollm2.model.hidden_states(tokens, jnp.arange(tokens.shape[1])[None])
  feats = heads.hidden(hidden[0])  # [K, seq, embed]
  ours = np.asarray(DraftVocab.build(smollm2.model, heads, ids).top_k(feats, 1))[..., 0]
  n = heads.config.num_layers
  for k in range(heads.config.num_heads):  # the exported weights, in NumPy, whole vocabulary
    x = np.asarray(hidden[0], np.float32)
    for l in range(n):
      z = x @ w[f"{k}.{l}.linear.weight"].T + w[f"{k}.{l}.linear.bias"]
      x = x + z / (1 + np.exp(-z))
    np.testing.assert_array_equal((x @ w[f"{k}.{n}.weight"].T).argmax(-1), ours[k])


def test_gguf_tokenizer_matches_transformers():
  """Our torch-free GGUF tokenizer encodes like transformers' own GGUF tokenizer."""
  import os

  from transformers import AutoTokenizer

  from medusa_jax.weights.gguf import _open, tokenizer_from_metadata
  from medusa_jax.weights.specs import embedded_gguf_path

  path = embedded_gguf_path()
  ours = tokenizer_from_metadata(_open(path), path)
  ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  texts = ["Hello world!", "  spaces, 12345 digits, 3.14", "naïve café — 🙂\n\ttabs",
           "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # square"]
  for text in texts:
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text
  messages = [{"role": "user", "content": "What is 2+2?"}]
  assert (ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
          == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
  assert (ours.eos_token_id, ours.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
