"""Acceptance on the device against a plain NumPy implementation of Medusa's rules, path by path."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from medusa_jax.acceptance import TypicalParams, choose_path, node_acceptance
from medusa_jax.tree import get_tree


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

  ok, logp = node_acceptance(jnp.asarray(tokens), jnp.asarray(logits[:, tree.internal]), tree, typical)
  best, length = choose_path(ok, logp, tree)
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
