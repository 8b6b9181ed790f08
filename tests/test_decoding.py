"""The jitted baseline decode loop: batching, EOS, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medusa_jax.decode.engine import Engine
from medusa_jax.decode.sampling import SamplingParams, sample, top_p_filter
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model


@pytest.fixture(scope="module")
def tiny_engine():
  return Engine(random_model(preset("tiny"), seed=3), ByteTokenizer(), max_cache_len=512)


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(3, 500, size=n)) for n in lengths]


def _reference_greedy(engine, prompt, n):
  """Greedy decoding by repeated full forwards with no cache: the independent reference.
  Sequences are right-padded to one length (causal attention ignores the padding)."""
  graphdef, state = nnx.split(engine.model)
  size = len(prompt) + n

  @jax.jit
  def next_token(state, seq, last):
    logits, _, _ = nnx.merge(graphdef, state)(seq[None], jnp.arange(size)[None])
    return jnp.argmax(logits[0, last])

  seq = np.zeros(size, np.int32)
  seq[: len(prompt)] = prompt
  for i in range(len(prompt), size):
    seq[i] = int(next_token(state, jnp.asarray(seq), i - 1))
  return list(seq[len(prompt):])


def test_greedy_equals_uncached_reference(tiny_engine):
  prompt = _prompts(0, [13])[0]
  tokens, counts, steps, _ = tiny_engine.generate_ids([prompt], max_new_tokens=20)
  assert counts[0] == steps[0] == 20
  assert list(tokens[0]) == _reference_greedy(tiny_engine, prompt, 20)


def test_batch_with_mixed_lengths_equals_each_alone(tiny_engine):
  prompts = _prompts(1, [5, 17, 9, 30])
  batch, counts, _, _ = tiny_engine.generate_ids(prompts, max_new_tokens=16)
  for p, row, n in zip(prompts, batch, counts):
    alone, n_alone, _, _ = tiny_engine.generate_ids([p], max_new_tokens=16)
    assert n == n_alone[0]
    assert list(row[:n]) == list(alone[0][:n])


def test_stops_at_eos_per_row():
  config = preset("tiny")
  model = random_model(config, seed=4)
  engine = Engine(model, ByteTokenizer(), max_cache_len=512)
  prompts = _prompts(2, [6, 11])
  free, _, _, _ = engine.generate_ids(prompts, max_new_tokens=12)
  # Make the 4th greedy token of row 0 an end-of-sequence token: that row stops there, row 1 goes on.
  engine.eos_ids = jnp.asarray([int(free[0][3])], jnp.int32)
  tokens, counts, _, _ = engine.generate_ids(prompts, max_new_tokens=12)
  first = list(free[0]).index(int(free[0][3]))
  assert counts[0] == first + 1
  assert list(tokens[0][: counts[0]]) == list(free[0][: first + 1])
  assert (tokens[0][counts[0]:] == engine.pad_id).all()
  if int(free[0][3]) not in list(free[1]):
    assert counts[1] == 12 and list(tokens[1]) == list(free[1])


def test_top_p_keeps_smallest_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
  assert kept.tolist() == [[True, True, False, False]]
  kept = np.isfinite(np.asarray(top_p_filter(logits, 0.85)))
  assert kept.tolist() == [[True, True, True, False]]


def test_sampling_follows_the_distribution():
  probs = np.asarray([0.6, 0.3, 0.1])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1))))
  draws = np.asarray(sample(logits, jax.random.PRNGKey(0), SamplingParams(1.0, 1.0)))
  freq = np.bincount(draws, minlength=3) / draws.size
  np.testing.assert_allclose(freq, probs, atol=0.015)


def test_sampled_generation_is_seeded(tiny_engine):
  prompt = _prompts(5, [8])
  a = tiny_engine.generate_ids(prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1)[0]
  b = tiny_engine.generate_ids(prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1)[0]
  c = tiny_engine.generate_ids(prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=2)[0]
  assert (a == b).all() and not (a == c).all()
