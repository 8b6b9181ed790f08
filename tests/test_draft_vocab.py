"""The heads' drafting vocabulary: ranking and files by hand, the restricted top-k against the
full-vocabulary logits masked outside the set, and Medusa outputs unchanged by it."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import oracle_heads, permutation_model, random_heads, random_prompts

from medusa_jax.decode.engine import Engine
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.draft_vocab import DraftVocab
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.tuning.head_accuracy import head_accuracy
from medusa_jax.weights.specs import random_model


def test_rank_by_frequency_by_hand():
  ids, n = draft_vocab.rank_by_frequency([[5, 3, 5], [3, 5, 7], np.asarray([9, 2])])
  # 5 three times, 3 twice, then 2, 7, 9 once each (ties: smaller id first)
  np.testing.assert_array_equal(ids, [5, 3, 2, 7, 9])
  assert n == 8


def test_save_and_read(tmp_path):
  draft_vocab.save(str(tmp_path), np.asarray([5, 3, 2]), 8)
  assert json.loads((tmp_path / "draft_vocab.json").read_text()) == {"ids": [5, 3, 2], "tokens_counted": 8}
  np.testing.assert_array_equal(draft_vocab.read(str(tmp_path), 2), [5, 3])
  np.testing.assert_array_equal(draft_vocab.read(str(tmp_path), None), [5, 3, 2])
  assert draft_vocab.read(str(tmp_path), 0) is None  # 0: the whole vocabulary
  assert draft_vocab.read(str(tmp_path / "elsewhere"), 8) is None  # no file: the whole vocabulary
  with pytest.raises(MedusaError, match=">= 0"):
    draft_vocab.read(str(tmp_path), -1)
  (tmp_path / "draft_vocab.json").write_text("{not json")
  with pytest.raises(MedusaError, match="not a drafting vocabulary"):
    draft_vocab.read(str(tmp_path), 8)


@pytest.mark.parametrize("tied,share", [(True, True), (False, True), (True, False)])
def test_top_k_is_full_vocab_top_k_masked_outside_the_set(tied, share):
  model = random_model(dataclasses.replace(preset("tiny"), tie_embeddings=tied), seed=1)
  heads = random_heads(model, HeadsConfig(3, 1, share), scale=0.5)
  vocab = model.config.vocab_size
  ids = np.random.default_rng(0).permutation(vocab)[: vocab // 3]
  draft = DraftVocab.build(model, heads, ids, topk=4)
  h = jax.random.normal(jax.random.PRNGKey(2), (2, 5, model.config.hidden_size))
  full = np.asarray(heads(h, model))  # [3, 2, 5, vocab]
  masked = np.full_like(full, -np.inf)
  masked[..., ids] = full[..., ids]
  expected = np.argsort(-masked, axis=-1, kind="stable")[..., :4]
  np.testing.assert_array_equal(draft.top_k(heads.hidden(h), 4), expected)
  np.testing.assert_allclose(draft.logits(heads.hidden(h)), full[..., ids], rtol=1e-5, atol=1e-5)


def test_build_rejects_bad_ids():
  model = random_model(preset("tiny"), seed=1)
  heads = random_heads(model, HeadsConfig(2, 1, True))
  vocab = model.config.vocab_size
  for ids, topk, match in [([1, vocab], 1, "outside"), ([-1, 2], 1, "outside"),
                           ([3, 3, 4], 2, "distinct token ids, got 3"), ([3, 4], 5, "at least 5")]:
    with pytest.raises(MedusaError, match=match):
      DraftVocab.build(model, heads, ids, topk=topk)
  with pytest.raises(MedusaError, match="needs Medusa heads"):
    Engine(model, ByteTokenizer()).set_draft_vocab([3, 4])
  engine = Engine(model, ByteTokenizer(), heads=heads, tree="chain2", draft_vocab=[3, 4])
  with pytest.raises(MedusaError, match="top-3 guesses of a 2-token drafting vocabulary"):
    engine.set_tree([[0], [2]])


@pytest.mark.parametrize("lengths", [[11], [5, 17, 9]])
def test_greedy_medusa_with_a_draft_vocab_equals_greedy_baseline(lengths):
  model = random_model(preset("tiny"), seed=3)
  ids = np.random.default_rng(1).permutation(model.config.vocab_size)[:100]
  engine = Engine(model, ByteTokenizer(), heads=random_heads(model), tree="mc_sim_7b_63",
                  max_cache_len=512, draft_vocab=ids)
  prompts = random_prompts(len(lengths), lengths)
  base, base_n, _, _ = engine.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  med, med_n, _, _ = engine.generate_ids(prompts, max_new_tokens=40, mode="medusa")
  np.testing.assert_array_equal(med_n, base_n)
  np.testing.assert_array_equal(med, base)


def test_oracle_heads_keep_every_guess_inside_the_set_and_lose_the_rest():
  """Oracle heads (always right over the whole vocabulary): with every id in a shuffled order
  they still reach depth + 1 tokens per step (the id mapping is right); with half the ids a step
  accepts a guess exactly when its token is in the set; the text never changes."""
  model, sigma = permutation_model()
  engine = Engine(model, ByteTokenizer(), heads=oracle_heads(model, sigma, 1), tree="chain1",
                  max_cache_len=256)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  prompt, n = [5, 9, 2], 30
  expected, t = [], prompt[-1]
  for _ in range(n):
    t = int(sigma[t])
    expected.append(t)
  rng = np.random.default_rng(0)
  engine.set_draft_vocab(rng.permutation(64))
  tokens, _, steps, _ = engine.generate_ids([prompt], max_new_tokens=n, mode="medusa")
  assert list(tokens[0]) == expected and steps[0] == 1 + -(-(n - 1) // 2)
  half = rng.permutation(64)[:32]
  engine.set_draft_vocab(half)
  tokens, _, steps, _ = engine.generate_ids([prompt], max_new_tokens=n, mode="medusa")
  assert list(tokens[0]) == expected
  # replay: with e tokens emitted, the step's guess is the next but one, expected[e]; the step
  # emits it and a bonus token when it is in the set, else the bonus token alone
  emitted, replay_steps = 1, 1
  while emitted < n:
    emitted += 2 if expected[emitted] in set(half.tolist()) else 1
    replay_steps += 1
  assert steps[0] == replay_steps


def test_head_accuracy_over_a_shuffled_whole_vocab_equals_the_whole_vocab():
  model, sigma = permutation_model()
  heads = oracle_heads(model, sigma, 3)
  heads.lm_heads[1].kernel[...] = heads.lm_heads[0].kernel[...]  # head 1 off by one: rank 1
  engine = Engine(model, ByteTokenizer(), heads=heads, tree="chain3", max_cache_len=256)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  prompts = [[5, 9, 2], [7, 1, 3, 3, 8, 11, 4]]
  whole = head_accuracy(engine, prompts, max_new_tokens=20, topk=4)
  engine.set_draft_vocab(np.random.default_rng(0).permutation(64))
  shuffled = head_accuracy(engine, prompts, max_new_tokens=20, topk=4)
  np.testing.assert_array_equal(shuffled.per_rank, whole.per_rank)
  assert shuffled.path_counts == whole.path_counts
  engine.set_draft_vocab([int(sigma[sigma[0]])])  # one id: head 0's targets are almost never it
  none = head_accuracy(engine, prompts, max_new_tokens=20, topk=4)
  assert none.per_rank[0, 0] < 0.2 and none.per_rank[:, 1:].sum() == 0
