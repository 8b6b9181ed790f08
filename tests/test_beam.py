"""Beam search against transformers' PyTorch `generate(num_beams=W, do_sample=False)` on the same
random weights: the same hypotheses, in the same order, with the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medusa_jax.decode.engine import Engine
from medusa_jax.errors import MedusaError
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.hf import read_dir

EOS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(the PyTorch Llama, our Engine on its weights). Its EOS row is scaled up so that hypotheses
  end before `max_new_tokens` as well as at it."""
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  ref = LlamaForCausalLM(LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=512, tie_word_embeddings=False,
      pad_token_id=0, bos_token_id=1, eos_token_id=EOS, initializer_range=0.2)).eval()
  with torch.no_grad():
    ref.lm_head.weight[EOS] *= 2.5
  path = tmp_path_factory.mktemp("beam_llama")
  ref.save_pretrained(path, safe_serialization=True)
  model, _ = read_dir(str(path))
  return ref, Engine(model, ByteTokenizer(), max_cache_len=128)


_RNG = np.random.default_rng(0)
PROMPTS = [list(_RNG.integers(3, 300, size=n)) for n in (5, 11, 8)]


@pytest.mark.parametrize("beams,length_penalty,early_stopping",
                         [(2, 1.0, False), (4, 1.0, False), (3, 0.5, True), (4, 2.0, "never")])
def test_beam_search_equals_transformers(models, beams, length_penalty, early_stopping):
  ref, engine = models
  n = 12
  out = engine.generate_ids(PROMPTS, mode="beam", num_beams=beams, length_penalty=length_penalty,
                            early_stopping=early_stopping, num_return_sequences=beams, max_new_tokens=n)
  ended_early = 0
  for i, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      hf = ref.generate(torch.tensor([prompt]), num_beams=beams, do_sample=False, max_new_tokens=n,
                        length_penalty=length_penalty, early_stopping=early_stopping,
                        num_return_sequences=beams, pad_token_id=0, eos_token_id=EOS)
    for j, expected in enumerate(hf[:, len(prompt):].numpy()):
      row = i * beams + j
      count = int(out.num_tokens[row])
      assert list(out.tokens[row, :count]) == list(expected[:count]), (i, j)
      # transformers pads with EOS (pad id 0 is falsy there); ours with the pad id
      assert set(expected[count:]) <= {EOS} and set(out.tokens[row, count:]) <= {0}
      ended_early += count < n
  if early_stopping != "never":  # length_penalty 2 favours long hypotheses
    assert ended_early, "no hypothesis ended in EOS: the test would not cover EOS handling"


def test_beam_scores_equal_transformers(models):
  ref, engine = models
  from medusa_jax.decode.beam import BeamParams, beam_generate
  from medusa_jax.decode.engine import pad_prompts

  tokens, lens = pad_prompts(PROMPTS, 16, 0)
  out = beam_generate(engine.state, tokens, lens, np.asarray([EOS], np.int32), graphdef=engine.graphdef,
                      params=BeamParams(3, 0.5, False), max_new_tokens=10, cache_len=64, pad_id=0)
  for i, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      hf = ref.generate(torch.tensor([prompt]), num_beams=3, do_sample=False, max_new_tokens=10,
                        length_penalty=0.5, num_return_sequences=3, output_scores=True,
                        return_dict_in_generate=True, pad_token_id=0, eos_token_id=EOS)
    np.testing.assert_allclose(np.asarray(out.scores[i]), hf.sequences_scores.numpy(), rtol=1e-4)


def test_one_beam_is_greedy(models):
  _, engine = models
  beam = engine.generate_ids(PROMPTS, mode="beam", num_beams=1, max_new_tokens=10)
  greedy = engine.generate_ids(PROMPTS, mode="baseline", max_new_tokens=10)
  np.testing.assert_array_equal(beam.num_tokens, greedy.num_tokens)
  for a, b, n in zip(beam.tokens, greedy.tokens, greedy.num_tokens):
    assert list(a[:n]) == list(b[:n])


def test_bad_beam_settings_are_one_line_errors(models):
  _, engine = models
  with pytest.raises(MedusaError, match="num_return_sequences"):
    engine.generate_ids(PROMPTS, mode="beam", num_beams=2, num_return_sequences=3)
  with pytest.raises(MedusaError, match="early_stopping"):
    engine.generate_ids(PROMPTS, mode="beam", early_stopping="sometimes")
  with pytest.raises(MedusaError, match="num_beams"):
    engine.generate_ids(PROMPTS, mode="beam", num_beams=0)


def _random_heads_engine():
  from helpers import random_heads

  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  model = random_model(preset("tiny"), seed=3)
  return Engine(model, ByteTokenizer(), heads=random_heads(model), max_cache_len=1024)


@pytest.mark.parametrize("settings", [dict(num_beams=2), dict(num_beams=4, early_stopping=True),
                                      dict(num_beams=3, length_penalty=0.5, early_stopping="never"),
                                      dict(num_beams=3, draft_beams=3, draft_depth=2)])
def test_speculative_beam_search_equals_beam_search(settings):
  """Each beam drafts the heads' tree (static, or per step with draft_beams), one forward verifies
  them all: the same hypotheses as plain beam search, for a batch of prompts of mixed lengths."""
  from helpers import random_prompts

  engine = _random_heads_engine()
  prompts = random_prompts(4, [5, 17, 9, 30])
  n = settings["num_beams"]
  plain = engine.generate_ids(prompts, mode="beam", max_new_tokens=24, num_return_sequences=n, **settings)
  spec = engine.generate_ids(prompts, mode="beam", max_new_tokens=24, num_return_sequences=n, beam_heads=True,
                             **settings)
  np.testing.assert_array_equal(spec.num_tokens, plain.num_tokens)
  np.testing.assert_array_equal(spec.tokens, plain.tokens)
  assert spec.steps[0] <= plain.steps[0]


def test_speculative_beam_search_with_oracle_heads_takes_several_steps_per_forward():
  """A backbone whose next token is sigma(token), sharpened so that beams stay apart, and heads that
  guess sigma's powers: the beams' steps mostly stay inside the heads' 63-node trees."""
  import jax.numpy as jnp
  from helpers import oracle_heads, permutation_model, random_prompts

  model, sigma = permutation_model()
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 8.0
  engine = Engine(model, ByteTokenizer(), heads=oracle_heads(model, sigma, 4), max_cache_len=512)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  prompts = [[int(t) % 64 for t in p] for p in random_prompts(7, [6, 13])]
  for beams in (1, 2, 3):
    plain = engine.generate_ids(prompts, mode="beam", num_beams=beams, num_return_sequences=beams, max_new_tokens=30)
    spec = engine.generate_ids(prompts, mode="beam", num_beams=beams, num_return_sequences=beams,
                               max_new_tokens=30, beam_heads=True)
    np.testing.assert_array_equal(spec.tokens, plain.tokens)
    assert plain.steps[0] == 30 and spec.steps[0] <= 10, spec.steps


def test_speculative_beam_search_needs_heads(models):
  _, engine = models
  with pytest.raises(MedusaError, match="needs Medusa heads"):
    engine.generate_ids(PROMPTS, mode="beam", beam_heads=True)
