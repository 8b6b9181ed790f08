"""Trees built each step from a beam search over the heads: the buffers of a hand-worked beam
against the static tree of the same shape, the beam search against brute force, and greedy output
against plain greedy decoding."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
  check_oracle_fills_every_step,
  oracle_heads,
  oracle_hydra_heads,
  permutation_model,
  random_heads,
  random_prompts,
)

from medusa_jax.decode.engine import Engine
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.dynamic_tree import beam_paths, beam_tree
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model

# three beams: two share their first two tokens, the third shares only its second token's value
PATHS = [[5, 7, 9], [5, 7, 8], [6, 7, 9]]
# merged, nodes by (depth, first beam): 1:5 2:6 | 3:5-7 4:6-7 | 5:5-7-9 6:5-7-8 7:6-7-9
SAME_SHAPE = Tree([[0], [1], [0, 0], [1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]])


def test_hand_worked_beam_gives_the_static_trees_buffers():
  tokens, t = beam_tree(jnp.asarray([42]), jnp.asarray([PATHS]), budget=10)
  ref = SAME_SHAPE.arrays(1)
  real = slice(0, SAME_SHAPE.size)
  assert np.asarray(tokens[0]).tolist() == [42, 5, 6, 7, 7, 9, 8, 9, 0, 0]
  for name in ("depths", "parents", "parent_slot"):
    np.testing.assert_array_equal(getattr(t, name)[0, real], np.asarray(getattr(ref, name)[0]))
  for name in ("mask", "earlier_siblings"):
    np.testing.assert_array_equal(getattr(t, name)[0, real, real], np.asarray(getattr(ref, name)[0]))
  np.testing.assert_array_equal(t.retrieve[0], [[0, 1, 3, 5], [0, 1, 3, 6], [0, 2, 4, 7]])
  assert np.asarray(t.retrieve_mask).all()
  # the two padding nodes: no parent, no sibling, see only themselves, on no path
  assert np.asarray(t.parents[0, 8:]).tolist() == [-1, -1]
  np.testing.assert_array_equal(t.mask[0, 8:], np.eye(10, dtype=bool)[8:])
  assert not np.asarray(t.earlier_siblings[0, 8:]).any() and not np.asarray(t.earlier_siblings[0, :, 8:]).any()
  assert np.asarray(t.internal).tolist() == list(range(10))


def test_budget_cuts_whole_prefixes():
  tokens, t = beam_tree(jnp.asarray([42]), jnp.asarray([PATHS]), budget=6)
  assert np.asarray(tokens[0]).tolist() == [42, 5, 6, 7, 7, 9]
  np.testing.assert_array_equal(t.retrieve_mask[0], [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(t.retrieve[0], [[0, 1, 3, 5], [0, 1, 3, 0], [0, 2, 4, 0]])
  np.testing.assert_array_equal(t.mask[0], SAME_SHAPE.mask[:6, :6])


def test_medusa_beam_paths_are_the_best_paths_by_brute_force():
  model = random_model(preset("tiny"), seed=3)
  heads = random_heads(model, scale=0.5)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, model.config.hidden_size))
  root = jnp.asarray([3, 9])
  width, depth = 4, 3
  paths = np.asarray(beam_paths(heads, model, h, root, width, depth))
  logp = np.asarray(jax.nn.log_softmax(heads(h, model, depth), axis=-1))  # [depth, b, V]: independent heads
  for b in range(2):
    top = [np.argsort(-logp[k, b])[:width] for k in range(depth)]
    scored = sorted(((sum(logp[k, b, t] for k, t in enumerate(p)), p) for p in itertools.product(*top)),
                    reverse=True)
    assert [list(p) for _, p in scored[:width]] == paths[b].tolist()


@pytest.mark.parametrize("beams,depth,budget,lengths", [(3, 3, None, [5, 17, 9, 30]), (4, 4, 9, [5, 17, 9, 30]),
                                                        (1, 2, None, [11])])
def test_greedy_medusa_beam_equals_greedy_baseline(beams, depth, budget, lengths):
  model = random_model(preset("tiny"), seed=3)
  engine = Engine(model, ByteTokenizer(), heads=random_heads(model), max_cache_len=1024)
  prompts = random_prompts(len(lengths), lengths)
  base = engine.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out = engine.generate_ids(prompts, max_new_tokens=40, mode="medusa", draft_beams=beams, draft_depth=depth,
                            tree_budget=budget)
  np.testing.assert_array_equal(out.num_tokens, base.num_tokens)
  np.testing.assert_array_equal(out.tokens, base.tokens)


def test_greedy_hydra_beam_equals_greedy_baseline():
  model = random_model(preset("tiny"), seed=4)
  engine = Engine(model, ByteTokenizer(), heads=random_heads(model, HeadsConfig(4, 1, True, "hydra"), scale=0.5),
                  max_cache_len=1024)
  prompts = random_prompts(4, [5, 17, 9, 30])
  base = engine.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out = engine.generate_ids(prompts, max_new_tokens=40, mode="medusa", draft_beams=3, draft_depth=3)
  np.testing.assert_array_equal(out.tokens, base.tokens)


@pytest.mark.parametrize("head_type", ["medusa", "hydra"])
def test_oracle_heads_fill_every_step(head_type):
  """Heads that are always right: the beam's best path is the continuation, so each step emits
  depth + 1 tokens, with greedy, lossless-sampling and typical acceptance."""
  model, sigma = permutation_model()
  heads = oracle_heads(model, sigma, 4) if head_type == "medusa" else oracle_hydra_heads(model, 4)
  engine = Engine(model, ByteTokenizer(), heads=heads, max_cache_len=512)
  check_oracle_fills_every_step(engine, sigma, 3, draft_beams=3, draft_depth=3)


def test_bad_beam_drafting_settings_are_one_line_errors():
  model = random_model(preset("tiny"), seed=3)
  engine = Engine(model, ByteTokenizer(), heads=random_heads(model), max_cache_len=1024)
  with pytest.raises(MedusaError, match="draft_depth 5 exceeds the 4 heads"):
    engine.generate_ids([[5, 6]], mode="medusa", draft_beams=2, draft_depth=5)
  with pytest.raises(MedusaError, match="tree_budget must be >= 2"):
    engine.generate_ids([[5, 6]], mode="medusa", draft_beams=2, tree_budget=1)
