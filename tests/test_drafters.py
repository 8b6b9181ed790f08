"""Drafters behind the shared verifier: prompt lookup on hand-built sequences, the grafted
Medusa + lookup tree's buffers, and greedy output identical to plain greedy decoding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from medusa_jax.decode.drafters import HeadsDrafter, HybridDrafter, LookupDrafter
from medusa_jax.decode.engine import Engine
from medusa_jax.decode.lookup import lookup_continuation
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model
from tests.test_medusa import random_heads


def _lookup(rows, k=3, n=3, size=16):
  history = np.zeros((len(rows), size), np.int32)
  for i, r in enumerate(rows):
    history[i, :len(r)] = r
  tokens, valid = lookup_continuation(jnp.asarray(history), jnp.asarray([len(r) for r in rows]), k, n)
  return np.asarray(tokens).tolist(), np.asarray(valid).tolist()


def test_lookup_proposes_what_followed_the_latest_longest_match():
  tokens, valid = _lookup([
      [5, 6, 7, 8],                 # no earlier occurrence of 8: nothing
      [1, 2, 9, 1, 2, 4, 1, 2],     # "1 2" twice before: the latest (followed by 4 1 2)
      [3, 1, 2, 7, 7, 2, 5, 1, 2],  # "1 2" (n=2) beats the later "2" (n=1): 7 7 2
      [4, 9, 4, 9, 4],              # overlapping match ending at the last-but-one position
      [6, 8, 3, 6, 8],              # continuation runs into the end: 3 6 8, all inside
      [2, 5, 2],                    # n=1 only: 5 2, then the end of the history
  ])
  assert tokens == [[0, 0, 0], [4, 1, 2], [7, 7, 2], [9, 4, 0], [3, 6, 8], [5, 2, 0]]
  assert valid == [0, 3, 3, 2, 3, 2]


def test_lookup_ngram_limit_and_trigram_preference():
  # bigram "1 2" occurs early (followed by 3); the trigram "0 1 2" later (followed by 8)
  rows = [[0, 1, 2, 3, 9, 9, 0, 1, 2, 8, 5, 0, 1, 2]]
  assert _lookup(rows, k=2, n=3)[0] == [[8, 5]]
  assert _lookup(rows, k=2, n=1)[0] == [[8, 5]]  # the latest "2" is the same one
  rows = [[7, 1, 2, 3, 5, 1, 2, 6, 4, 7, 1, 2]]
  assert _lookup(rows, k=1, n=3)[0] == [[3]]  # "7 1 2" (n=3) over the later "1 2" -> 6
  assert _lookup(rows, k=1, n=2)[0] == [[6]]


def test_grafted_tree_buffers():
  heads_tree = Tree([(0,), (1,), (0, 0)])
  hybrid = HybridDrafter(HeadsDrafter(None, heads_tree), LookupDrafter(3))
  t = hybrid.tree
  # nodes by (depth, path): 1:(0,) 2:(1,) 3:(2,) 4:(0,0) 5:(2,0) 6:(2,0,0); the chain's rank is 2
  assert t.paths == ((0,), (1,), (2,), (0, 0), (2, 0), (2, 0, 0))
  assert t.parents.tolist() == [-1, 0, 0, 0, 1, 3, 5]
  assert t.depths.tolist() == [0, 1, 1, 1, 2, 2, 3]
  heads_nodes, chain_nodes = hybrid._nodes
  assert heads_nodes.tolist() == [0, 1, 2, 4] and chain_nodes.tolist() == [3, 5, 6]
  assert t.retrieve.tolist() == [[0, 2, 0, 0], [0, 1, 4, 0], [0, 3, 5, 6]]
  assert t.earlier_siblings[3].tolist() == [False, True, True, False, False, False, False]


@pytest.fixture(scope="module")
def tiny():
  model = random_model(preset("tiny"), seed=3)
  engine = Engine(model, ByteTokenizer(), heads=random_heads(model), tree=[(0,), (1,), (0, 0), (0, 0, 0)],
                  max_cache_len=1024)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)  # never stop early
  return engine


def _prompts(lengths, seed=5):
  """Prompts with repeats inside (lookup then has matches to propose)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in lengths:
    motif = list(rng.integers(3, 500, size=4))
    out.append((motif + list(rng.integers(3, 500, size=3))) * (n // 7) + motif[: n % 7])
  return out


@pytest.mark.parametrize("lengths", [[23], [9, 30, 15, 44]])
@pytest.mark.parametrize("settings", [dict(mode="lookup", draft_tokens=4, ngram=3),
                                      dict(mode="lookup", draft_tokens=1, ngram=1),
                                      dict(mode="medusa", lookup=5, ngram=2)])
def test_greedy_output_equals_the_baseline(tiny, lengths, settings):
  prompts = _prompts(lengths)
  base, base_n, _, _ = tiny.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out, n, steps, _ = tiny.generate_ids(prompts, max_new_tokens=40, **settings)
  np.testing.assert_array_equal(n, base_n)
  np.testing.assert_array_equal(out, base)
  assert (steps <= n).all() and (steps >= 1).all()


def test_lookup_accepts_the_repeated_text(tiny):
  """Greedy decoding of a tiny random model falls into a loop; once it has, lookup proposes the
  loop and each step emits draft_tokens + 1 tokens."""
  prompts = _prompts([20])
  base, _, _, _ = tiny.generate_ids(prompts, max_new_tokens=200, mode="baseline")
  out, n_l, steps, _ = tiny.generate_ids(prompts, max_new_tokens=200, mode="lookup", draft_tokens=4)
  np.testing.assert_array_equal(out, base)
  assert n_l[0] / steps[0] > 1.5


@pytest.mark.parametrize("bad,match", [(dict(draft_tokens=0), "draft_tokens"), (dict(ngram=0), "ngram"),
                                       (dict(lookup=-1), "lookup"), (dict(mode="nope"), "unknown mode")])
def test_bad_settings_are_one_line_errors(tiny, bad, match):
  with pytest.raises(MedusaError, match=match):
    tiny.generate_ids([[3, 4]], max_new_tokens=4, **bad)


@pytest.fixture(scope="module")
def tiny_draft():
  """The tiny engine with a separate random draft model (another seed: a poor drafter)."""
  model = random_model(preset("tiny"), seed=3)
  engine = Engine(model, ByteTokenizer(), max_cache_len=1024)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  return engine


@pytest.mark.parametrize("lengths", [[23], [9, 30, 15, 44]])
@pytest.mark.parametrize("draft,k", [("self:1", 3), ("other", 4), ("same", 2)])
def test_draft_model_greedy_equals_the_baseline(tiny_draft, lengths, draft, k):
  tiny_draft.set_draft_model(random_model(preset("tiny"), seed={"other": 9, "same": 3}[draft])
                             if draft != "self:1" else draft, ByteTokenizer())
  prompts = _prompts(lengths)
  base, base_n, _, _ = tiny_draft.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out, n, steps, _ = tiny_draft.generate_ids(prompts, max_new_tokens=40, mode="draft", draft_tokens=k)
  np.testing.assert_array_equal(n, base_n)
  np.testing.assert_array_equal(out, base)
  if draft == "same":  # the target drafting for itself: every step accepts all K and adds one
    np.testing.assert_array_equal(steps, 1 + -(-(n - 1) // (k + 1)))


def test_self_draft_with_every_layer_is_the_target(tiny_draft):
  layers = tiny_draft.config.num_layers
  tiny_draft.set_draft_model(f"self:{layers}")
  out, n, steps, _ = tiny_draft.generate_ids(_prompts([12]), max_new_tokens=31, mode="draft", draft_tokens=4)
  assert steps[0] == 1 + 30 // 5


def test_bad_draft_models_are_one_line_errors(tiny_draft):
  layers = tiny_draft.config.num_layers
  for bad, match in [(f"self:{layers + 1}", "L must be in"), ("self:0", "L must be in"),
                     ("selfish", "a draft model is self:L")]:
    with pytest.raises(MedusaError, match=match):
      tiny_draft.set_draft_model(bad)
  import dataclasses
  other = random_model(dataclasses.replace(preset("tiny"), vocab_size=300), seed=1)
  with pytest.raises(MedusaError, match="vocabulary"):
    tiny_draft.set_draft_model(other)
  tiny_draft.set_draft_model(None)
  with pytest.raises(MedusaError, match="needs a draft model"):
    tiny_draft.generate_ids([[3, 4]], max_new_tokens=4, mode="draft")
  with pytest.raises(MedusaError, match="unknown model preset"):
    import medusa_jax
    medusa_jax.load("random:tiny", heads=None, draft_model="random:nope")


def _deviation(samples: np.ndarray, starts: np.ndarray, transition: np.ndarray, over: np.ndarray) -> float:
  """How far sampled sequences `[rows, n]` (after tokens `starts` `[rows]`) stray from the exact
  next-token distributions `transition` `[V, V]`, in standard deviations: the larger of a pooled
  chi-square over every (previous, next) pair (as a z-score) and a directed test of the mass on
  the tokens a draft over-proposes (`over` `[V, V]` bool), where an error in the acceptance
  probability shows first. Inf for a token outside the support."""
  prev = np.concatenate([starts[:, None], samples[:, :-1]], axis=1).ravel()
  nxt = samples.ravel()
  counts = np.zeros_like(transition)
  np.add.at(counts, (prev, nxt), 1)
  n = counts.sum(axis=1, keepdims=True)
  expected = n * transition
  if (counts[expected == 0] > 0).any():
    return np.inf
  used = (n[:, 0] > 0)[:, None] & (transition > 0)
  chi2 = np.sum((counts - expected)[used] ** 2 / expected[used])
  df = used.sum() - (n[:, 0] > 0).sum()
  mass = np.sum(transition * over, axis=1)
  directed = (np.sum(counts * over) - np.sum(n[:, 0] * mass)) / np.sqrt(np.sum(n[:, 0] * mass * (1 - mass)))
  return max((chi2 - df) / np.sqrt(2 * df), abs(directed))


def test_draft_model_sampling_has_the_targets_distribution(monkeypatch):
  """Speculative sampling with a draft model (another Markov chain) against the exact transitions
  of the target: rows start from different tokens, several steps each, 3 drafted tokens per
  step. The same check fails when the acceptance probability is 3% too high."""
  import jax

  from medusa_jax.decode import acceptance
  from medusa_jax.decode.sampling import SamplingParams, sampling_logits
  from tests.test_medusa import _markov_model

  vocab, rows, n = 16, 4096, 32
  target, draft = _markov_model(vocab, seed=0), _markov_model(vocab, seed=0)
  noise = np.random.default_rng(1).normal(size=(vocab, vocab)) * 0.5  # a draft near the target
  draft.lm_head.kernel[...] = draft.lm_head.kernel[...] + jnp.asarray(noise, jnp.float32)
  sampling = SamplingParams(temperature=0.9, top_p=0.95)

  def transitions(model):
    logits = model(jnp.arange(vocab)[:, None], jnp.zeros((vocab, 1), jnp.int32))[0][:, 0]
    return np.asarray(jax.nn.softmax(sampling_logits(logits, sampling)), np.float64)

  p, q = transitions(target), transitions(draft)
  starts = np.random.default_rng(0).integers(0, vocab - 1, size=rows)
  prompts = [[3, 5, int(s)] for s in starts]

  kw = dict(max_new_tokens=n, temperature=sampling.temperature, top_p=sampling.top_p, seed=2)

  def run(mode):
    engine = Engine(target, ByteTokenizer(), max_cache_len=64)
    engine.eos_ids = jnp.asarray([-1], jnp.int32)
    engine.set_draft_model(draft)
    out, counts, steps, _ = engine.generate_ids(prompts, mode=mode, draft_tokens=3, **kw)
    return out, counts.sum() / steps.sum()

  out, tokens_per_step = run("draft")
  assert tokens_per_step > 1.3  # drafts are accepted
  assert _deviation(run("baseline")[0], starts, p, q > p) < 4  # the check is fair to plain sampling
  assert _deviation(out, starts, p, q > p) < 4

  exact = acceptance.draft_ratio_acceptance
  monkeypatch.setattr(acceptance, "draft_ratio_acceptance",
                      lambda tokens, probs, draft_probs, uniform, tree: exact(tokens, probs * 1.03, draft_probs,
                                                                              uniform, tree))
  jax.clear_caches()
  try:
    wrong = run("draft")[0]
  finally:
    jax.clear_caches()
  assert _deviation(wrong, starts, p, q > p) > 4


def test_heads_directory_names_its_lookup_chain(tmp_path):
  """`tree.json`'s "lookup" makes Medusa graft that chain by default (greedy output unchanged, a
  config's `lookup` overrides it); a bad value is a one-line error."""
  import json

  import medusa_jax
  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.medusa.heads import HeadsConfig

  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  heads_dir = tmp_path / "heads"
  medusa_format.write(str(heads_dir), random_heads(base, HeadsConfig(3, 1, True)), base,
                      base_model="random:tiny", lm_head_copies=False)
  (heads_dir / "tree.json").write_text(json.dumps({"paths": [[0], [0, 0], [1]], "lookup": 3}))
  engine = medusa_jax.load("random:tiny", heads=str(heads_dir))
  assert engine.lookup == 3 and engine.drafter("medusa", engine_config := medusa_jax.GenerationConfig())[0].tree.size == 7
  assert engine.drafter("medusa", engine_config.replace(lookup=0))[0].tree.size == 4
  prompts = _prompts([20, 31])
  base_out = engine.generate_ids(prompts, max_new_tokens=24, mode="baseline")[0]
  np.testing.assert_array_equal(engine.generate_ids(prompts, max_new_tokens=24)[0], base_out)
  assert medusa_jax.load("random:tiny", heads=str(heads_dir), tree="chain2").lookup == 0
  (heads_dir / "tree.json").write_text(json.dumps({"paths": [[0]], "lookup": -2}))
  with pytest.raises(MedusaError, match='"lookup" must be'):
    medusa_jax.load("random:tiny", heads=str(heads_dir))


def test_server_chunks_graft_lookup_and_stay_lossless(tiny):
  """The server's slots (`decode/slots.py`) keep each row's tokens, so a tree chunk grafts the
  lookup chain too: two greedy rows decoded in chunks give the baseline's tokens, and the chain
  is accepted on repetitive text (more tokens per step than the heads alone)."""
  from medusa_jax.decode import slots as device

  prompts = _prompts([20, 34])
  base, base_n, _, _ = tiny.generate_ids(prompts, max_new_tokens=48, mode="baseline")

  def decode(lookup):
    slots = device.Slots.init(tiny.config, 2, 256, tiny.dtype)
    out = [[] for _ in prompts]
    for i, p in enumerate(prompts):
      tokens = np.full((1, 64), tiny.pad_id, np.int32)
      tokens[0, :len(p)] = p
      slots, first, _ = device.insert(tiny.state, slots, jnp.int32(i), jnp.asarray(tokens), jnp.int32(len(p)),
                                      jnp.float32(0), jnp.float32(1), jnp.uint32(0), jnp.int32(48),
                                      jnp.bool_(True), tiny.eos_ids, graphdef=tiny.graphdef)
      out[i] = [int(first)]
    chunks = 0
    while not bool(np.asarray(slots.done[:2]).all()):
      slots, tokens, counts = device.run_chunk(tiny.state, tiny.heads_state, slots, tiny.draft, tiny.eos_ids,
                                               graphdef=tiny.graphdef, heads_graphdef=tiny.heads_graphdef,
                                               tree=tiny.tree, bucket=2, steps=2, lookup=lookup)
      for i in range(2):
        out[i] += [int(t) for t in np.asarray(tokens[i])[: int(counts[i])]]
      chunks += 1
    return out, chunks

  chunks = {}
  for lookup in (0, 4):
    out, chunks[lookup] = decode(lookup)
    for i in range(2):
      assert out[i] == list(base[i][: base_n[i]]), lookup
  assert chunks[4] < chunks[0]
