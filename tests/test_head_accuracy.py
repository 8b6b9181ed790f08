"""Per-head, per-rank and per-path accuracy against the base model's greedy answers, on hand-built heads whose
ranks are known exactly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers import oracle_heads, permutation_model

from medusa_jax.decode.engine import Engine
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.tuning.head_accuracy import head_accuracy, tokens_per_step


def test_oracle_and_off_by_one_heads():
  """Heads 0 and 2 map x to sigma^(k+2)(x) (always right: rank 0); head 1 maps x to sigma^2(x)
  instead of sigma^3(x): the right token scores 0 under exactly one token scoring 1, so rank 1."""
  model, sigma = permutation_model()
  heads = oracle_heads(model, sigma, 3)
  heads.lm_heads[1].kernel[...] = heads.lm_heads[0].kernel[...]
  engine = Engine(model, ByteTokenizer(), heads=heads, tree="chain3", max_cache_len=256)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)  # answers run to max_new_tokens
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 11, 4]]
  acc = head_accuracy(engine, prompts, max_new_tokens=20, topk=4)
  # head 0 at positions len(prompt) - 1 ... while t + 2 stays inside prompt + 20 answer tokens
  assert acc.positions == 2 * 19
  np.testing.assert_array_equal(acc.per_rank, [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
  # jointly: head 0's top guess, then head 1's second, then head 2's top, each one position
  # shorter (head k needs t + k + 2 inside the sequence)
  assert acc.path_counts == {(0,): 38, (0, 1): 36, (0, 1, 0): 34}
  # Replayed on each 20-token answer: the prefill emits token 0; (0, 1) is right at columns
  # 0..17, so tree steps at 0, 3, ..., 15 emit 3 tokens each; at 18 one token is left: 8 steps.
  assert acc.expected_tokens_per_step([(0,), (0, 1)]) == 40 / 16
  # ... as decoding counts them, with the chain tree these heads are right along
  tokens = steps = 0
  for prompt in prompts:
    _, count, step_count, _ = engine.generate_ids([prompt], max_new_tokens=20, mode="medusa")
    tokens, steps = tokens + int(count[0]), steps + int(step_count[0])
  assert acc.expected_tokens_per_step(engine.tree.paths) == tokens / steps
  assert acc.expected_tokens_per_step([(0,), (1,), (0, 0)]) == 40 / 22  # only (0,): 2 per tree step


def test_tokens_per_step_replays_the_decoding_steps():
  """Head 0 right (rank 0) at every other position: averaged over every position a 1-node tree
  step emits 1.5 tokens, but a replay visits only the positions where steps start."""
  even = np.asarray([[0, 5] * 5])  # [num_heads=1, 10 answer tokens]
  assert tokens_per_step([even], [(0,)]) == 10 / 6              # prefill; steps at 0, 2, 4, 6, 8
  assert tokens_per_step([even[:, ::-1]], [(0,)]) == 10 / 6     # prefill; steps at 0 (1 token), 1, 3, 5, 7
  assert tokens_per_step([even, even[:, ::-1]], [(1,)]) == 1.0  # never right: one token a step
  both = np.asarray([[0] * 6, [0, 0, 0, -1, 0, 0]])             # a -1 (no rank) breaks a path
  assert tokens_per_step([both], [(0,), (0, 0)]) == 6 / 3       # prefill; 0 (3 tokens), 3 (2)
