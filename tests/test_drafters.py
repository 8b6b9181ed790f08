"""Drafters behind the shared verifier: prompt lookup on hand-built sequences, the grafted
Medusa + lookup tree's buffers, and greedy output identical to plain greedy decoding."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import decode_in_chunks, random_heads

from medusa_jax.decode.drafters import (
  GatedHybrid,
  HeadsDrafter,
  HybridDrafter,
  LookupDrafter,
  ModelDrafter,
  cheaper_drafters,
)
from medusa_jax.decode.engine import Engine
from medusa_jax.decode.lookup import lookup_continuation
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.tree import MC_SIM_7B_63, Tree
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model


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
                                      dict(mode="medusa", lookup=5, ngram=2, min_ngram=0),
                                      dict(mode="medusa", lookup=4, ngram=3, min_ngram=2)])
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


def test_gated_chain_runs_the_heads_tree_without_a_long_enough_match(tiny):
  """`min_ngram`: steps with no earlier occurrence of the last n >= min_ngram tokens verify the
  heads' tree alone. Never matched (min_ngram beyond any repeat): the heads' steps exactly; always
  matched (the tiny model loops, so its text repeats): the hybrid's steps exactly."""
  prompts = _prompts([9, 30])

  def steps(**settings):
    out, n, steps, _ = tiny.generate_ids(prompts, max_new_tokens=40, mode="medusa", **settings)
    return out, steps

  heads, hybrid = steps(lookup=0), steps(lookup=3, ngram=1, min_ngram=0)
  never, always = steps(lookup=3, ngram=1, min_ngram=100), steps(lookup=3, ngram=1, min_ngram=1)
  for out, _ in (hybrid, never, always):
    np.testing.assert_array_equal(out, heads[0])
  np.testing.assert_array_equal(never[1], heads[1])
  np.testing.assert_array_equal(always[1], hybrid[1])
  assert (hybrid[1] < heads[1]).any()  # the chain is worth something here


@pytest.mark.parametrize("bad,match", [(dict(draft_tokens=0), "draft_tokens"), (dict(ngram=0), "ngram"),
                                       (dict(min_ngram=-1), "min_ngram"),
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


DRAFT_TREE = "[[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]"  # depth 3: the chain of k = 3 and more


@pytest.mark.parametrize("lengths", [[23], [9, 30, 15, 44]])
@pytest.mark.parametrize("draft,k,tree", [("self:1", 3, None), ("other", 4, None), ("same", 2, None),
                                          ("self:1", 3, DRAFT_TREE), ("other", 3, DRAFT_TREE),
                                          ("same", 3, DRAFT_TREE)])
def test_draft_model_greedy_equals_the_baseline(tiny_draft, lengths, draft, k, tree):
  tiny_draft.set_draft_model(random_model(preset("tiny"), seed={"other": 9, "same": 3}[draft])
                             if draft != "self:1" else draft, ByteTokenizer())
  prompts = _prompts(lengths)
  base, base_n, _, _ = tiny_draft.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out, n, steps, _ = tiny_draft.generate_ids(prompts, max_new_tokens=40, mode="draft", draft_tokens=k,
                                             draft_tree=tree)
  np.testing.assert_array_equal(n, base_n)
  np.testing.assert_array_equal(out, base)
  if draft == "same":  # the target drafting for itself: every step accepts k (the tree's depth) and adds one
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


def test_draft_model_sampling_has_the_targets_distribution(monkeypatch):
  """Speculative sampling with a draft model, a chain sampled from its distributions and a tree of
  its top-k tokens, on a model whose attention matters: every sampled token is scored against the
  target's exact distribution given everything before it (one teacher-forced forward over prompt +
  output; `tests/helpers.py`). 1,024 different prompts of mixed lengths, 16 tokens each,
  several steps per row. The same check passes plain sampling and fails when either acceptance
  probability is 3% too high."""
  import jax
  from flax import nnx
  from helpers import deviation

  from medusa_jax.decode import acceptance
  from medusa_jax.decode.sampling import SamplingParams, sampling_logits

  rows, n = 2048, 16
  target = random_model(preset("tiny"), seed=0)
  target.lm_head.kernel[...] = target.lm_head.kernel[...] * 50  # peaked: most likely tokens ~0.85
  draft = random_model(preset("tiny"), seed=0)
  draft.lm_head.kernel[...] = target.lm_head.kernel[...] * 1.4  # the target, overconfident: p / q < 1 often
  graphdef = nnx.graphdef(target)
  sampling = SamplingParams(temperature=0.9, top_p=1.0)  # top-p sorts the vocabulary at every node: slow here
  prompts = _prompts(np.random.default_rng(2).integers(4, 24, size=rows).tolist())
  lens = np.asarray([len(p) for p in prompts])

  def run(**settings):  # a new engine each time: it keeps what it compiled
    engine = Engine(target, ByteTokenizer(), max_cache_len=64)
    engine.eos_ids = jnp.asarray([-1], jnp.int32)
    engine.set_draft_model(draft)
    out, counts, steps, _ = engine.generate_ids(prompts, max_new_tokens=n, temperature=sampling.temperature,
                                                top_p=sampling.top_p, seed=2, **settings)
    assert (counts == n).all()
    return out, counts.sum() / steps.sum()

  def scored(out):  # the target's and the draft's distributions of each sampled token `[rows * n, V]`
    seqs = np.zeros((rows, lens.max() + n), np.int32)
    for i, (p, o) in enumerate(zip(prompts, out)):
      seqs[i, :len(p) + n] = list(p) + list(o)
    at = lens[:, None] - 1 + np.arange(n)[None, :]  # the positions predicting each output token

    return [np.asarray(forward(nnx.state(model), seqs, at), np.float64).reshape(rows * n, -1)
            for model in (target, draft)]

  @jax.jit
  def forward(state, seqs, at):
    logits = nnx.merge(graphdef, state)(seqs, jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape))[0]
    return jax.nn.softmax(sampling_logits(jnp.take_along_axis(logits, at[..., None], axis=1), sampling))

  def check(out, drafts):
    p, q = scored(out)
    over = q > p if drafts == "chain" else q == q.max(axis=1, keepdims=True)  # sampled / top-1 drafts
    return deviation(p, out.ravel(), over, np.repeat(np.arange(rows), n))

  assert check(run(mode="baseline")[0], "chain") < 4  # the check is fair to plain sampling
  for drafts, settings in [("chain", dict(draft_tokens=3)), ("tree", dict(draft_tree=DRAFT_TREE))]:
    out, tokens_per_step = run(mode="draft", **settings)
    assert tokens_per_step > 1.5  # drafts are accepted
    assert check(out, drafts) < 4, drafts

  for drafts, name, settings in [("chain", "draft_ratio_acceptance", dict(draft_tokens=3)),
                                 ("tree", "lossless_acceptance", dict(draft_tree=DRAFT_TREE))]:
    exact = getattr(acceptance, name)
    with monkeypatch.context() as patch:
      patch.setattr(acceptance, name, lambda tokens, probs, *a, exact=exact: exact(tokens, probs * 1.03, *a))
      jax.clear_caches()
      assert check(run(mode="draft", **settings)[0], drafts) > 4, name
  jax.clear_caches()


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
  assert engine.lookup == 3 and engine.plan(mode="medusa").drafter.tree.size == 7
  assert engine.plan(mode="medusa", lookup=0).drafter.tree.size == 4
  prompts = _prompts([20, 31])
  base_out = engine.generate_ids(prompts, max_new_tokens=24, mode="baseline")[0]
  np.testing.assert_array_equal(engine.generate_ids(prompts, max_new_tokens=24)[0], base_out)
  assert medusa_jax.load("random:tiny", heads=str(heads_dir), tree="chain2").lookup == 0
  (heads_dir / "tree.json").write_text(json.dumps({"paths": [[0]], "lookup": -2}))
  with pytest.raises(MedusaError, match='"lookup" must be'):
    medusa_jax.load("random:tiny", heads=str(heads_dir))


def test_cheaper_drafters_verify_fewer_tokens():
  """The server's cheaper choices, worked by hand: under heads with a grafted chain (always or
  gated), the heads' tree alone, and before it their top guess (a root and one node) when the tree
  has 16 nodes or more; none under a small tree alone, prompt lookup or a draft model."""
  graphdef = object()
  top = HeadsDrafter(graphdef, Tree([[0]]))
  small, large = HeadsDrafter(graphdef, Tree([[0], [0, 0], [1]])), HeadsDrafter(graphdef, Tree(MC_SIM_7B_63))
  for heads, want in [(small, (small,)), (large, (top, large))]:
    hybrid = HybridDrafter(heads, LookupDrafter(3))
    assert cheaper_drafters(hybrid) == cheaper_drafters(GatedHybrid(hybrid, 2)) == want
  assert [d.tree.size for d in (top, small, large)] == [2, 4, 64]
  assert cheaper_drafters(large) == (top,)
  assert cheaper_drafters(small) == cheaper_drafters(top) == ()
  assert cheaper_drafters(LookupDrafter(4)) == cheaper_drafters(ModelDrafter(None, 4, 1)) == ()


def test_server_chunks_graft_lookup_and_stay_lossless(tiny):
  """The server's slots (`serve/slots.py`) keep each row's tokens, so a chunk drafts with prompt
  lookup too, grafted onto the heads' tree (always or gated) or alone: two greedy rows decoded in
  chunks give the baseline's tokens, and the chain is accepted on repetitive text (fewer chunks
  than the heads alone). Chunks taking turns over the server's cheaper choices (the heads' top
  guess alone, the heads' tree without the chain) stay lossless too."""
  prompts = _prompts([20, 34])
  base, base_n, _, _ = tiny.generate_ids(prompts, max_new_tokens=48, mode="baseline")

  def decode(mode, **settings):
    out, chunks, _ = decode_in_chunks(tiny, prompts, mode, **settings)
    for i in range(2):
      assert out[i] == list(base[i][: base_n[i]]), (mode, settings)
    return chunks

  heads = decode("medusa", lookup=0)
  assert decode("medusa", lookup=4, min_ngram=0) < heads
  assert decode("medusa", lookup=4, min_ngram=2) < heads
  assert decode("lookup", draft_tokens=4) < heads
  assert decode("medusa", lookup=4, plain_every=2) < heads
  decode("medusa", lookup=4, min_ngram=2, cheaper=True)
  tree, tiny.tree = tiny.tree, Tree(MC_SIM_7B_63)  # 63 nodes: the heads' top guess joins the turns
  try:
    decode("medusa", lookup=4, min_ngram=2, cheaper=True)
  finally:
    tiny.tree = tree


@pytest.mark.parametrize("draft,tree", [("other", None), ("same", None), ("same", DRAFT_TREE), ("other", DRAFT_TREE)])
def test_server_chunks_draft_with_a_model_that_catches_up_after_plain_chunks(tiny_draft, draft, tree):
  """A draft model in the server's slots keeps its own KV cache rows; a plain chunk (every other
  one here) writes its tokens there in one forward at its end. Greedy rows equal the baseline, and
  the target drafting for itself accepts every drafted token in every step of every drafted
  chunk, which holds only if its cache is right after each plain chunk."""
  tiny_draft.set_draft_model(random_model(preset("tiny"), seed={"other": 9, "same": 3}[draft]), ByteTokenizer())
  prompts = _prompts([20, 34])
  base, base_n, _, _ = tiny_draft.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  out, _, drafted = decode_in_chunks(tiny_draft, prompts, "draft", plain_every=2, draft_tokens=3, draft_tree=tree)
  for i in range(2):
    assert out[i] == list(base[i][: base_n[i]])
  if draft == "same":  # 2 steps of 3 drafted + 1 bonus, or what is left of the budget
    for counts, left in drafted:
      np.testing.assert_array_equal(counts, np.minimum(8, np.maximum(left, 0)))


@pytest.mark.parametrize("settings", [dict(mode="baseline"), dict(mode="medusa"), dict(mode="medusa", acceptance="typical"),
                                      dict(mode="draft", draft_tokens=2), dict(mode="lookup")])
def test_new_temperatures_compile_nothing(tiny, settings):
  """Sampling settings are arrays of the compiled programs: after a first generation at
  temperature 0.5, generations at 0.7 and 0.9 (and another top-p) run without one XLA compile,
  for plain decoding, every drafter and both acceptance rules, and their samples differ."""
  import jax.monitoring

  tiny.set_draft_model("self:1")
  compiles = []

  def count(event, *_, **__):
    if event == "/jax/core/compile/backend_compile_duration":  # every XLA compilation
      compiles.append(event)

  prompts = _prompts([12, 17])
  first = tiny.generate_ids(prompts, max_new_tokens=12, temperature=0.5, **settings).tokens
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    later = [tiny.generate_ids(prompts, max_new_tokens=12, temperature=t, top_p=p, seed=1, **settings).tokens
             for t, p in ((0.7, 1.0), (0.9, 0.9))]
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
    tiny.set_draft_model(None)
  assert compiles == []
  assert any((first != out).any() for out in later)
