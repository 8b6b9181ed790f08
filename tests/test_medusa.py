"""Medusa tree decoding: lossless greedy against plain greedy decoding, an oracle that proves
acceptance and compaction, and the KV cache after a step against a plain forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  oracle_heads,
  oracle_hydra_heads,
  permutation_model,
  random_heads,
  random_prompts,
)

from medusa_jax.decode.acceptance import accept
from medusa_jax.decode.engine import Engine
from medusa_jax.decode.plain import prefill
from medusa_jax.decode.sampling import SamplingParams, sampling_logits
from medusa_jax.decode.speculative import keep_path, tree_forward
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
from medusa_jax.medusa.tree import get_tree
from medusa_jax.model.config import preset
from medusa_jax.model.kv_cache import KVCache
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model


@pytest.fixture(scope="module")
def tiny():
  model = random_model(preset("tiny"), seed=3)
  return Engine(model, ByteTokenizer(), heads=random_heads(model), max_cache_len=1024)


@pytest.fixture(scope="module")
def tiny_hydra():
  model = random_model(preset("tiny"), seed=4)
  heads = random_heads(model, HeadsConfig(4, 1, True, "hydra"), scale=0.5)
  return Engine(model, ByteTokenizer(), heads=heads, max_cache_len=1024)


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "vicuna_7b_stage2", "chain3",
                                  ((0,), (1,), (0, 0), (0, 1), (1, 0))])
@pytest.mark.parametrize("lengths", [[11], [5, 17, 9, 30]])
def test_greedy_medusa_equals_greedy_baseline(tiny, tree, lengths):
  tiny.set_tree(tree)
  prompts = random_prompts(len(lengths), lengths)
  base, base_n, _, _ = tiny.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  med, med_n, steps, _ = tiny.generate_ids(prompts, max_new_tokens=48, mode="medusa")
  np.testing.assert_array_equal(med_n, base_n)
  np.testing.assert_array_equal(med, base)
  assert (steps <= med_n).all() and (steps >= 1).all()


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", ((0,), (1,), (0, 0), (0, 1), (1, 0))])
def test_greedy_hydra_equals_greedy_baseline(tiny_hydra, tree):
  tiny_hydra.set_tree(tree)
  prompts = random_prompts(4, [5, 17, 9, 30])
  base, base_n, _, _ = tiny_hydra.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  med, med_n, _, _ = tiny_hydra.generate_ids(prompts, max_new_tokens=48, mode="medusa")
  np.testing.assert_array_equal(med_n, base_n)
  np.testing.assert_array_equal(med, base)


def test_hydra_tree_children_are_the_teacher_forced_heads_top_k(tiny_hydra):
  """Each node of a Hydra tree at depth d + 1 with rank r is rank r of head d run on the node's
  path (root and ancestors' tokens, as training feeds it), computed path by path."""
  model, heads = tiny_hydra.model, tiny_hydra.heads
  tree = get_tree(((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 1), (0, 0, 0), (0, 1, 2), (0, 0, 0, 0)))
  h = jax.random.normal(jax.random.PRNGKey(1), (3, model.config.hidden_size))
  root = jnp.asarray([5, 77, 300], jnp.int32)
  tokens = np.asarray(heads.draft_tree(model, h, root, tree, None))
  assert (tokens[:, 0] == root).all()
  for n, p in enumerate(tree.paths, start=1):
    parent = [0] + [tree.paths.index(p[:i]) + 1 for i in range(1, len(p))]
    path = jnp.asarray(tokens[:, parent])  # [3, d]: the root, then the ancestors' tokens
    logits = heads(h, model, len(p), path=path)[len(p) - 1]  # [3, vocab]
    np.testing.assert_array_equal(tokens[:, n], np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, p[-1]])


@pytest.mark.parametrize("temperature,head_type", [(0.0, "medusa"), (0.5, "medusa"), (0.0, "hydra")])
def test_oracle_heads_reach_depth_plus_one_tokens_per_step(temperature, head_type):
  model, sigma = permutation_model()
  heads = oracle_heads(model, sigma, 4) if head_type == "medusa" else oracle_hydra_heads(model, 4)
  engine = Engine(model, ByteTokenizer(), heads=heads, max_cache_len=512)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)  # never stop early
  prompts = random_prompts(7, [6, 13])
  prompts = [[int(t) % 64 for t in p] for p in prompts]
  n = 41
  for tree in ("mc_sim_7b_63", "chain2"):
    engine.set_tree(tree)
    depth = engine.tree.depth
    tokens, counts, steps, _ = engine.generate_ids(prompts, max_new_tokens=n, mode="medusa",
                                                   temperature=temperature)
    for p, row in zip(prompts, tokens):  # the true continuation: sigma applied repeatedly
      expected, t = [], p[-1]
      for _ in range(n):
        t = int(sigma[t])
        expected.append(t)
      assert list(row) == expected
    assert (counts == n).all()
    # prefill emits 1 token, then every step depth + 1
    assert (steps == 1 + -(-(n - 1) // (depth + 1))).all(), steps


def test_cache_after_step_equals_plain_forward():
  """A tree step whose oracle guesses are all right emits depth + 1 tokens and leaves the cache a
  plain forward over the same tokens would."""
  model = random_model(preset("tiny"), seed=5)
  engine = Engine(model, ByteTokenizer(), max_cache_len=512)
  prompts = random_prompts(9, [7, 12])
  greedy, _, _, _ = engine.generate_ids(prompts, max_new_tokens=8, mode="baseline")
  tree = get_tree("mc_sim_7b_63")
  d = tree.depth
  p_len = 16
  tokens = np.zeros((2, p_len), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  lens = np.asarray([len(p) for p in prompts], np.int32)
  # oracle top-k: rank 0 of head k is the true token k + 2 ahead; other ranks are distractors
  top = np.random.default_rng(0).integers(3, 500, size=(2, d, tree.topk)).astype(np.int32)
  top[:, :, 0] = greedy[:, 1: d + 1]

  @jax.jit
  def run(tokens, lens, top):
    cache = KVCache.init(model.config, 2, p_len + tree.size)  # room for the prompt and the tree
    cache = prefill(model, tokens, lens, cache).cache
    flat = jnp.concatenate([jnp.asarray(greedy[:, :1]), top.reshape(2, -1)], axis=1)
    tree_tokens = flat[:, tree.candidate_index]  # node (d, r): rank r of head d - 1
    fwd = tree_forward(model, cache, tree_tokens, tree.arrays(2))
    accepted = accept(tree_tokens, fwd.logits, tree, None, jax.random.PRNGKey(0))
    kept = keep_path(tree_tokens, fwd.hidden, fwd.cache, accepted)
    return kept.emitted, kept.count, kept.cache, accepted.bonus

  emitted, n, cache, bonus = run(jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(top))
  np.testing.assert_array_equal(n, [d + 1, d + 1])
  np.testing.assert_array_equal(emitted, greedy[:, 1: d + 2])
  np.testing.assert_array_equal(bonus, greedy[:, d + 1])

  for i, p in enumerate(prompts):  # plain forward over prompt + root + accepted tokens
    seq = jnp.asarray([p + list(greedy[i, : d + 1])])
    ref = KVCache.init(model.config, 1, 64)
    _, _, ref = model(seq, jnp.arange(seq.shape[1])[None], ref)
    k = len(p) + d + 1
    assert int(cache.lengths[i]) == k
    for layer in range(model.config.num_layers):
      np.testing.assert_allclose(cache.keys[layer][i, :k], ref.keys[layer][0, :k], atol=1e-5)
      np.testing.assert_allclose(cache.values[layer][i, :k], ref.values[layer][0, :k], atol=1e-5)


def test_heads_start_as_identity_with_base_lm_head():
  model = random_model(preset("tiny"), seed=6)
  heads = MedusaHeads.for_model(model, HeadsConfig(3, 2, share_lm_head=False))
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 5, model.config.hidden_size))
  logits = heads(h, model)
  assert logits.shape == (3, 2, 5, model.config.vocab_size)
  for k in range(3):
    np.testing.assert_allclose(logits[k], model.logits(h), rtol=1e-5, atol=1e-5)
  # each layer has its own weights (the reference shared one ResBlock by accident)
  blocks = heads.blocks[0]
  assert blocks[0].linear.kernel is not blocks[1].linear.kernel


def test_typical_sampling_runs_and_counts(tiny):
  tiny.set_tree("mc_sim_7b_63")
  tokens, counts, steps, _ = tiny.generate_ids(random_prompts(3, [9, 4]), max_new_tokens=30,
                                               mode="medusa", temperature=0.8, seed=1)
  assert (counts == 30).all() and (steps <= counts).all()
  assert ((tokens >= 0) & (tokens < 512)).all()


def _markov_model(vocab=16, seed=0, peak=0.0):
  """A backbone whose next-token distribution depends only on the current token (random
  transition logits, with `peak` > 0 one token of each row that far above the others, times the
  final norm's 4): one-hot embeddings, zeroed attention and MLP outputs."""
  config = dataclasses.replace(preset("tiny"), vocab_size=vocab, hidden_size=vocab,
                               tie_embeddings=False, eos_token_ids=(vocab - 1,))
  model = random_model(config, seed=seed)
  model.embed.embedding[...] = jnp.eye(vocab)
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(vocab, vocab)) * 0.5
  logits[np.arange(vocab), rng.permutation(vocab)] = logits.max(axis=1) + peak
  model.lm_head.kernel[...] = jnp.asarray(logits, jnp.float32)
  for layer in model.layers:
    layer.attn.o[...] = jnp.zeros_like(layer.attn.o[...])
    layer.mlp.down.kernel[...] = jnp.zeros_like(layer.mlp.down.kernel[...])
  return model


SAMPLING_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0, 0]]


def test_lossless_sampling_draws_from_the_models_distribution(monkeypatch):
  """Tree sampling (Medusa heads, prompt lookup, both, an EAGLE drafter) against the exact transitions of a
  Markov-chain model whose most likely next token has ~0.9 of the mass, rows starting from
  different tokens (`tests/helpers.py`; the baseline passes the same check). It fails for
  typical acceptance (not lossless), an acceptance probability 3% too high, and a step key reused
  every step. Heads guess the most likely tokens k + 2 ahead, so steps accept several tokens."""
  from helpers import markov_deviation, oracle_eagle

  from medusa_jax.decode import acceptance, speculative

  vocab, rows, n = 16, 2048, 16
  model = _markov_model(vocab, peak=0.5)
  sampling = SamplingParams(temperature=0.9, top_p=0.95)
  logits, _, _ = model(jnp.arange(vocab)[:, None], jnp.zeros((vocab, 1), jnp.int32))
  transition = np.asarray(jax.nn.softmax(sampling_logits(logits[:, 0], sampling)), np.float64)
  heads = MedusaHeads.for_model(model, HeadsConfig(4, 1, share_lm_head=False))
  power = transition
  for lm in heads.lm_heads:  # head k ranks tokens by their probability k + 2 steps ahead
    power = power @ transition
    lm.kernel[...] = jnp.asarray(np.log(power + 1e-9), jnp.float32)
  starts = np.random.default_rng(0).integers(0, vocab, size=rows)
  prompts = [[3, 5, int(s)] for s in starts]
  likeliest = transition == transition.max(axis=1, keepdims=True)  # what the heads propose first

  def deviation(drafter=None, **settings):  # a new engine each time: it keeps what it compiled
    drafter = drafter or dict(heads=heads, tree=SAMPLING_TREE)
    engine = Engine(model, ByteTokenizer(), max_cache_len=64, **drafter)
    engine.eos_ids = jnp.asarray([-1], jnp.int32)  # never stop early
    out, counts, steps, _ = engine.generate_ids(prompts, max_new_tokens=n, temperature=sampling.temperature,
                                                top_p=sampling.top_p, seed=1, **settings)
    assert (counts == n).all()
    return markov_deviation(out, starts, transition, likeliest), counts.sum() / steps.sum()

  assert deviation(mode="baseline")[0] < 4  # the check is fair to plain sampling
  z, tokens_per_step = deviation(mode="medusa")
  assert z < 4 and tokens_per_step > 2  # the tree is exercised
  z, tokens_per_step = deviation(mode="lookup", draft_tokens=3, ngram=1)
  assert z < 4 and tokens_per_step > 1.1  # lookup drafts get accepted too
  assert deviation(mode="medusa", lookup=3, ngram=1, min_ngram=1)[0] < 4  # and grafted ones
  assert deviation(mode="medusa", acceptance="typical")[0] > 4
  # an EAGLE drafter guessing the likeliest successor, ranking the tokens after it (its tree grown
  # each step: `helpers.oracle_eagle`)
  eagle = oracle_eagle(model, np.argmax(transition, axis=1), np.log(transition + 1e-9), width=2, depth=3, budget=6)
  z, tokens_per_step = deviation(dict(heads=eagle, draft_vocab=np.arange(vocab)), mode="medusa")
  assert z < 4 and tokens_per_step > 2

  exact, step = acceptance.lossless_acceptance, speculative.speculative_step
  for name, wrong in [("lossless_acceptance", lambda tokens, probs, *a: exact(tokens, probs * 1.03, *a)),
                      ("speculative_step", lambda *a: step(*a[:6], jax.random.PRNGKey(7), *a[7:]))]:
    with monkeypatch.context() as patch:
      patch.setattr(acceptance if name == "lossless_acceptance" else speculative, name, wrong)
      jax.clear_caches()
      assert deviation(mode="medusa")[0] > 4, name
  jax.clear_caches()
