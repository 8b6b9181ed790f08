"""Tree buffers against a hand-worked small tree; validation; the accuracy-driven tree builder."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from medusa_jax import MedusaError
from medusa_jax.medusa.tree import MC_SIM_7B_63, Tree, get_tree
from medusa_jax.tuning.tree_builder import tree_from_path_counts

SMALL = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_small_tree_buffers_by_hand():
  t = Tree([[0, 0, 0], [1, 0], [0], [0, 1], [1], [0, 0]])  # any order in
  assert t.paths == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
  assert (t.size, t.depth, t.topk) == (7, 3, 2)
  expected_mask = np.array([
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],
      [1, 1, 0, 1, 0, 0, 0],
      [1, 1, 0, 0, 1, 0, 0],
      [1, 0, 1, 0, 0, 1, 0],
      [1, 1, 0, 1, 0, 0, 1],
  ], bool)
  np.testing.assert_array_equal(t.mask, expected_mask)
  np.testing.assert_array_equal(t.depths, [0, 1, 1, 2, 2, 2, 3])
  # flat candidates: [root, head0 top0, head0 top1, head1 top0, head1 top1, head2 top0, head2 top1]
  np.testing.assert_array_equal(t.candidate_index, [0, 1, 2, 3, 4, 3, 5])
  np.testing.assert_array_equal(t.parents, [-1, 0, 0, 1, 1, 2, 3])
  np.testing.assert_array_equal(t.retrieve, [[0, 1, 4, 0], [0, 2, 5, 0], [0, 1, 3, 6]])
  np.testing.assert_array_equal(t.retrieve_mask, [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
  # nodes 4, 5, 6 are leaves: acceptance needs logits at the root and nodes 1, 2, 3 only
  np.testing.assert_array_equal(t.internal, [0, 1, 2, 3])
  np.testing.assert_array_equal(t.parent_slot, [0, 0, 0, 1, 1, 2, 3])
  # siblings tried before each node: node 2 after 1 (the root's children), node 4 after 3 (node 1's)
  earlier = np.zeros((7, 7), bool)
  earlier[2, 1] = earlier[4, 3] = True
  np.testing.assert_array_equal(t.earlier_siblings, earlier)


def test_default_tree_shape():
  t = get_tree("mc_sim_7b_63")
  assert t.size == 64 and t.depth == 4 and t.topk == 10
  assert np.bincount(t.depths)[1:].tolist() == [10, 28, 23, 2]
  # every retrieve row walks parent -> child
  for row, valid in zip(t.retrieve, t.retrieve_mask):
    nodes = row[valid]
    assert nodes[0] == 0 and all(t.parents[b] == a for a, b in zip(nodes[:-1], nodes[1:]))
  assert len(MC_SIM_7B_63) == 63
  stage2 = get_tree("vicuna_7b_stage2", num_heads=4)
  assert stage2.size == 64 and stage2.depth == 4


@pytest.mark.parametrize("paths, kwargs, message", [
    ([[0], [1, 0]], {}, "has no parent"),
    ([[0], [0, 0], [0, 0, 0]], {"num_heads": 2}, "exceeds the 2 Medusa heads"),
    ([[0], [20]], {"vocab_size": 16}, "top-21 tokens of a 16-token vocabulary"),
    ([[0], [0]], {}, "same path twice"),
    ([[0], [-1]], {}, "non-negative"),
    ([], {}, "at least one path"),
    ([0, 1], {}, "a list of paths, each a list of top-k ranks"),
    ([[0], ["1"]], {}, "a list of paths, each a list of top-k ranks"),
])
def test_invalid_trees(paths, kwargs, message):
  with pytest.raises(MedusaError, match=message):
    Tree(paths, **kwargs)


def test_unknown_tree_name():
  with pytest.raises(MedusaError, match="unknown tree 'nope'"):
    get_tree("nope")


def test_tree_specs_from_text_and_files(tmp_path):
  """A tree given as JSON text or a JSON file (`{"paths": ...}` or a bare list) is the same tree;
  malformed ones are one-line errors."""
  want = Tree([[0], [0, 0], [1]])
  (tmp_path / "obj.json").write_text('{"paths": [[0], [0, 0], [1]]}')
  (tmp_path / "list.json").write_text("[[1], [0], [0, 0]]")
  (tmp_path / "other.json").write_text('{"choices": [[0]]}')
  (tmp_path / "broken.json").write_text("[[0],")
  assert get_tree("[[0], [0, 0], [1]]") == want
  assert get_tree(str(tmp_path / "obj.json")) == want == get_tree(str(tmp_path / "list.json"))
  with pytest.raises(MedusaError, match="cannot parse the tree"):
    get_tree("[0,")
  with pytest.raises(MedusaError, match='holds {"paths"'):
    get_tree(str(tmp_path / "other.json"))
  with pytest.raises(MedusaError, match="cannot read a tree from"):
    get_tree(str(tmp_path / "broken.json"))


def test_tree_from_path_counts_keeps_the_most_frequent_paths():
  counts = {(0,): 50, (1,): 20, (2,): 5, (0, 0): 30, (0, 1): 8, (1, 0): 8, (0, 0, 0): 30, (3,): 0}
  build = functools.partial(tree_from_path_counts, counts, num_heads=3, topk=4)
  assert build(3) == ((0,), (0, 0), (0, 0, 0))  # tie: the parent first
  assert build(6) == ((0,), (0, 0), (0, 0, 0), (1,), (0, 1), (1, 0))
  # 7 paths were ever right; then the shortest, lowest-rank others: (3,), then depth 2 from (0, 2)
  assert build(10) == build(7) + ((3,), (0, 2), (0, 3))
  for n in (1, 6, 10, 30):
    assert len(Tree(build(n), num_heads=3).paths) == n  # always a valid tree
  assert len(tree_from_path_counts({}, 5, num_heads=2, topk=3)) == 5
