"""Export: orbax -> each format -> back is exact; exported heads give the same logits in an
independent PyTorch implementation; the exported backbone loads in transformers; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import ROOT, random_heads

from medusa_jax import MedusaError
from medusa_jax.formats.layout import export, read_heads
from medusa_jax.formats.medusa import to_tensors
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.model.config import preset
from medusa_jax.training.config import load_config
from medusa_jax.training.loop import train
from medusa_jax.weights.hf import read_dir
from medusa_jax.weights.specs import random_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A short orbax training run on random:tiny (seed 0) and its base model."""
  out = tmp_path_factory.mktemp("run")
  data = os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json")
  train(load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                    [f"output_dir={out}", f"data={data}", "max_steps=4", "save_every=4", "eval_every=0"]),
        progress=False)
  return str(out), random_model(preset("tiny"), seed=0)


@pytest.mark.parametrize("fmt", ["medusa", "vllm"])
def test_roundtrip_orbax_format_orbax_is_exact(tmp_path, trained, fmt):
  run, base = trained
  heads = read_heads(run, base)
  export(fmt, str(tmp_path / fmt), model=base, heads=heads, base_name="tiny")
  again = read_heads(str(tmp_path / fmt), base)
  a, b = to_tensors(heads), to_tensors(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_medusa_export_matches_independent_pytorch_heads(tmp_path):
  """Medusa heads re-implemented in PyTorch on transformers' LlamaForCausalLM hidden states."""
  from safetensors.torch import load_file
  from transformers import LlamaForCausalLM

  base = random_model(preset("tiny"), seed=2)
  heads = random_heads(base, HeadsConfig(3, 2, True), scale=0.1)
  export("hf-llama", str(tmp_path / "llama"), model=base, heads=None, base_name="tiny")
  export("medusa", str(tmp_path / "medusa"), model=base, heads=heads, base_name="tiny")
  ref = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), dtype=torch.float32).eval()
  w = load_file(str(tmp_path / "medusa" / "medusa_lm_head.safetensors"))
  tokens = np.random.default_rng(0).integers(3, 500, (2, 12))
  with torch.no_grad():
    out = ref(torch.tensor(tokens), output_hidden_states=True)
    h = out.hidden_states[-1]  # after the final norm
    for k in range(3):
      x = h
      for l in range(2):
        x = x + torch.nn.functional.silu(x @ w[f"{k}.{l}.linear.weight"].T + w[f"{k}.{l}.linear.bias"])
      expected = (x @ w[f"{k}.2.weight"].T).numpy()
      hidden, _ = base.hidden_states(jnp.asarray(tokens), jnp.arange(12)[None].repeat(2, 0))
      ours = np.asarray(heads(hidden, base)[k])
      assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4


@pytest.mark.parametrize("share", [True, False])
def test_vllm_token_map_proposes_what_our_drafting_vocabulary_does(tmp_path, share):
  """vLLM's Medusa with `token_map` (re-implemented here in PyTorch after its loader: lm_head rows
  at the map, logits scattered back into the vocabulary) proposes the same top-1 tokens as our
  heads over the same drafting vocabulary; the medusa format keeps the ids in draft_vocab.json."""
  from safetensors.torch import load_file

  from medusa_jax.medusa import draft_vocab
  from medusa_jax.medusa.draft_vocab import DraftVocab

  base = random_model(preset("tiny"), seed=2)
  heads = random_heads(base, HeadsConfig(3, 1, share), scale=0.1)
  vocab = base.config.vocab_size
  ids = np.random.default_rng(0).permutation(vocab)[:100]
  export("vllm", str(tmp_path / "v"), model=base, heads=heads, base_name="tiny", draft_ids=ids)
  export("medusa", str(tmp_path / "m"), model=base, heads=heads, base_name="tiny", draft_ids=ids)
  np.testing.assert_array_equal(draft_vocab.read(str(tmp_path / "m"), None), ids)
  with open(tmp_path / "v" / "config.json") as f:
    assert json.load(f)["truncated_vocab_size"] == 100
  w = load_file(str(tmp_path / "v" / "model.safetensors"))
  token_map = w["token_map"]
  assert token_map.dtype == torch.int64
  hidden = np.random.default_rng(1).normal(size=(7, base.config.hidden_size)).astype(np.float32)
  ours = np.asarray(DraftVocab.build(base, heads, ids).top_k(heads.hidden(jnp.asarray(hidden)), 1))[..., 0]
  for h in range(3):
    x = torch.tensor(hidden)
    x = x + torch.nn.functional.silu(x @ w[f"blocks.{h}.layers.0.weight"].T + w[f"blocks.{h}.layers.0.bias"])
    logits = x @ w[f"lm_heads.{h}.weight"][token_map].T
    full = torch.full((7, vocab), -torch.inf)
    full[:, token_map] = logits
    np.testing.assert_array_equal(full.argmax(-1).numpy(), ours[h])
  m = load_file(str(tmp_path / "m" / "medusa_lm_head.safetensors"))
  outside = np.ones(vocab, bool)
  outside[ids] = False
  for h in range(3):  # TGI's whole-vocabulary top-1 over the Medusa export: rows outside are zero
    lm = m[f"{h}.1.weight"]
    assert not lm[outside].any()
    np.testing.assert_array_equal(lm[ids], to_tensors(heads, base)[f"{h}.1.weight"][ids])
    x = torch.tensor(hidden)
    x = x + torch.nn.functional.silu(x @ m[f"{h}.0.linear.weight"].T + m[f"{h}.0.linear.bias"])
    logits = x @ lm.T
    positive = logits[:, ids].max(-1).values > 0  # then a zero row cannot win
    assert positive.sum() >= 3
    np.testing.assert_array_equal(logits.argmax(-1).numpy()[positive.numpy()], ours[h][positive.numpy()])
  again = read_heads(str(tmp_path / "v"), base)  # our reader still takes the full lm_heads
  np.testing.assert_array_equal(again.lm_heads[0].kernel[...], to_tensors(heads, base)["0.1.weight"].T)
  with pytest.raises(MedusaError, match="outside"):
    export("vllm", str(tmp_path / "bad"), model=base, heads=heads, base_name="tiny", draft_ids=[vocab])
  assert not (tmp_path / "bad").exists()


def test_hf_llama_export_loads_in_transformers_and_back(tmp_path):
  from transformers import LlamaForCausalLM

  base = random_model(preset("tiny"), seed=4)
  export("hf-llama", str(tmp_path / "llama"), model=base, heads=None, base_name="tiny")
  ref = LlamaForCausalLM.from_pretrained(str(tmp_path / "llama"), dtype=torch.float32).eval()
  tokens = np.random.default_rng(1).integers(3, 500, (1, 16))
  with torch.no_grad():
    expected = ref(torch.tensor(tokens)).logits.numpy()
  ours, _, _ = base(jnp.asarray(tokens), jnp.arange(16)[None])
  assert np.abs(np.asarray(ours) - expected).max() / np.abs(expected).max() < 1e-4
  again, _ = read_dir(str(tmp_path / "llama"))
  np.testing.assert_array_equal(again.embed.embedding[...], base.embed.embedding[...])


def test_bad_input_leaves_nothing(tmp_path, trained):
  run, base = trained
  other = random_model(preset("tiny").__class__(**{**preset("tiny").__dict__, "hidden_size": 32}))
  heads = read_heads(run, base)
  export("medusa", str(tmp_path / "m"), model=base, heads=heads, base_name="tiny")
  with pytest.raises(MedusaError, match="hidden_size 64 but the base model has 32"):
    read_heads(str(tmp_path / "m"), other)
  with pytest.raises(MedusaError, match=f"the checkpoints under {run} do not fit this base model and config: params.* is \\[64"):
    read_heads(run, other)
  with pytest.raises(MedusaError, match="exists; pass --force"):
    export("medusa", str(tmp_path / "m"), model=base, heads=heads, base_name="tiny")
  os.remove(tmp_path / "m" / "medusa_lm_head.safetensors")
  (tmp_path / "m" / "medusa_lm_head.safetensors").write_bytes(os.urandom(50))
  with pytest.raises(MedusaError, match="cannot read"):
    read_heads(str(tmp_path / "m"), base)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer", "export_hf.py"), "--model",
                         "random:tiny", "--heads", str(tmp_path / "m"), "--format", "vllm", "--out",
                         str(tmp_path / "v")], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith("error: cannot read")
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "v").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
