"""Acceptance on the device against a plain NumPy implementation of Medusa's rules, path by path;
lossless sampling against the distributions it must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decode.acceptance import (
  TypicalParams,
  accept,
  choose_path,
  node_acceptance,
)
from medusa_jax.decode.sampling import SamplingParams
from medusa_jax.medusa.tree import get_tree


def _numpy_reference(tokens, logits, tree, params):
  """Medusa's evaluate_posterior, written over explicit (candidate path, position) pairs."""
  best, length = [], []
  for b in range(tokens.shape[0]):
    lengths, scores = [], []
    for row, valid in zip(tree.retrieve, tree.retrieve_mask):
      n, logp = 0, 0.0
      for j in range(1, tree.depth + 1):
        if not valid[j]:
          break
        parent_logits = logits[b, row[j - 1]].astype(np.float64)
        tok = tokens[b, row[j]]
        if params is None:
          ok = tok == np.argmax(parent_logits)
          lp = 0.0
        else:
          z = parent_logits / params.temperature
          p = np.exp(z - z.max())
          p /= p.sum()
          entropy = -(p * np.log(p + 1e-5)).sum()
          ok = p[tok] > min(params.posterior_threshold, params.posterior_alpha * np.exp(-entropy))
          lp = np.log(p[tok])
        if not ok:
          break
        n += 1
        logp += lp
      lengths.append(n)
      scores.append(logp)
    longest = max(lengths)
    cands = [i for i, n in enumerate(lengths) if n == longest]
    best.append(cands[int(np.argmax([scores[i] for i in cands]))])
    length.append(longest)
  return np.asarray(best), np.asarray(length)


@pytest.mark.parametrize("typical", [None, TypicalParams(0.7, 0.09, 0.3), TypicalParams(1.0, 0.3, 0.55)])
def test_matches_numpy_reference(typical):
  tree = get_tree("mc_sim_7b_63")
  rng = np.random.default_rng(0)
  batch, vocab = 16, 12  # a small vocabulary so that random candidates are often accepted
  logits = (rng.normal(size=(batch, tree.size, vocab)) * 2.0).astype(np.float32)
  tokens = rng.integers(0, vocab, size=(batch, tree.size)).astype(np.int32)
  # plant agreement so that long paths occur: half the nodes copy their parent's argmax
  plant = rng.random((batch, tree.size)) < 0.6
  argmax_parent = np.argmax(logits, -1)[:, np.clip(tree.parents, 0, None)]
  tokens = np.where(plant, argmax_parent, tokens).astype(np.int32)

  arrays = tree.arrays(batch)
  ok, logp = node_acceptance(jnp.asarray(tokens), jnp.asarray(logits[:, tree.internal]), arrays, typical)
  best, length = choose_path(ok, logp, arrays)
  ref_best, ref_length = _numpy_reference(tokens, logits, tree, typical)
  np.testing.assert_array_equal(np.asarray(length), ref_length)
  assert ref_length.max() >= 2  # the test exercises multi-token acceptance
  if typical is None:  # greedy ties: the winning path must accept the same tokens
    for b in range(batch):
      a = tree.retrieve[int(best[b]), 1: ref_length[b] + 1]
      r = tree.retrieve[ref_best[b], 1: ref_length[b] + 1]
      np.testing.assert_array_equal(tokens[b, a], tokens[b, r])
  else:
    np.testing.assert_array_equal(np.asarray(best), ref_best)


def _top_p_probs(logits, temperature, top_p):
  """NumPy: softmax(logits / T) renormalised over the smallest set of tokens reaching `top_p`."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  before = np.cumsum(p[order]) - p[order]
  keep = np.zeros(len(p), bool)
  keep[order[before < top_p]] = True
  p = np.where(keep, p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("guesses", [[2, 4, 1, 3, 1], [2, 2, 1, 3, 1]])  # the second repeats a token
def test_lossless_sampling_emits_the_target_distribution(guesses):
  """Recursive rejection sampling over a hand-built tree, 200k draws: every emitted token follows
  its node's distribution (temperature + top-p), whatever the heads guessed."""
  tree = get_tree([[0], [1], [0, 0], [0, 1], [1, 0]])  # nodes: root, [0], [1], [0,0], [0,1], [1,0]
  rng = np.random.default_rng(0)
  vocab, n = 6, 200_000
  probs = rng.dirichlet(np.ones(vocab), size=tree.size)
  probs[0] = [0.05, 0.1, 0.35, 0.05, 0.25, 0.2]  # the root's children (tokens 2, 4) are likely
  probs[1] = [0.1, 0.4, 0.1, 0.3, 0.05, 0.05]    # node [0]'s children (tokens 1, 3) too
  logits = np.log(probs).astype(np.float32)
  tokens = np.array([0] + guesses, np.int32)  # root, then each node's guess
  rule = SamplingParams(temperature=0.8, top_p=0.9)
  target = np.stack([_top_p_probs(l, 0.8, 0.9) for l in logits])
  path, accepted, _, bonus = jax.jit(accept, static_argnames=("tree", "rule"))(
      jnp.asarray(np.broadcast_to(tokens, (n, tree.size))),
      jnp.asarray(np.broadcast_to(logits, (n, tree.size, vocab))), tree=tree, rule=rule,
      key=jax.random.PRNGKey(0))
  path, accepted, bonus = np.asarray(path), np.asarray(accepted), np.asarray(bonus)
  # emitted: the accepted nodes' tokens, then the bonus token; and the node each token was drawn at
  emitted = np.full((n, 3), -1)
  emitted[:, :2] = np.where(np.arange(2)[None] < accepted[:, None], tokens[path[:, 1:]], -1)
  emitted[np.arange(n), accepted] = bonus
  drawn_at = path[np.arange(n)[:, None], np.minimum(np.arange(3)[None], accepted[:, None])]
  assert accepted.max() == 2 and (accepted == 0).any()
  for node in range(tree.size):  # the token drawn at each node (accepted child or bonus)
    for d in range(3):
      rows = (drawn_at[:, d] == node) & (d <= accepted)
      if rows.sum() < 5_000:
        continue
      freq = np.bincount(emitted[rows, d], minlength=vocab) / rows.sum()
      sigma = np.sqrt(target[node] * (1 - target[node]) / rows.sum())
      assert (np.abs(freq - target[node]) < 5 * sigma + 1e-3).all(), (node, freq, target[node])
  # a node is reached only through its parent's token; never twice among siblings
  for d in range(1, 3):
    deeper = accepted >= d
    assert (tree.parents[path[deeper, d]] == path[deeper, d - 1]).all()
