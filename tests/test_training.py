"""Head training: the loss falls, the backbone stays frozen (Medusa-1) or trains with an L_LM that
matches full-logit NumPy (Medusa-2), kill-and-resume equals an uninterrupted run, 8 simulated
devices give the losses of one, bad input gives one clear line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, random_heads

from medusa_jax import MedusaError
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads, head_targets
from medusa_jax.model.config import preset
from medusa_jax.training.batches import PositionBatch, SequenceBatch
from medusa_jax.training.checkpoints import trained_model
from medusa_jax.training.config import TrainConfig, load_config
from medusa_jax.training.hidden_cache import cache_positions, with_soft_targets
from medusa_jax.training.loop import setup, train
from medusa_jax.training.losses import heads_loss, lm_loss
from medusa_jax.training.optimizer import make_optimizer
from medusa_jax.training.step import make_train_step
from medusa_jax.training.targets import (
  backbone_hidden,
  position_targets,
  teacher_distribution,
)
from medusa_jax.weights.specs import random_model

TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _config(tmp_path, *overrides):
  data = os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json")
  return load_config(TINY, [f"output_dir={tmp_path}", f"data={data}", *overrides])


def _metrics(path, split="train"):
  with open(os.path.join(path, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def test_eagle_drafter_learns_the_targets_distribution_and_reloads(tmp_path):
  """An EAGLE drafter's training-time test learns the target's distribution at every step j: on a
  target made peaked (lm_head x 30) its top-1 agreement on one batch of answers climbs from chance
  to most of them. A run directory reads back as the drafter of its last checkpoint, over the whole
  vocabulary (no `draft_vocab`), and drafts."""
  import medusa_jax
  from medusa_jax.formats.layout import read_draft_ids, read_heads
  from medusa_jax.medusa.eagle import EagleHead
  from medusa_jax.training.batches import rows
  from medusa_jax.training.distributed import global_batch

  run = setup(_config(tmp_path, "heads.head_type=eagle", "max_steps=60"))
  base = nnx.merge(run.base_graphdef, run.base_state)
  base.lm_head.kernel[...] = base.lm_head.kernel[...] * 30
  peaked = nnx.state(base)
  batch = global_batch(rows(run.data[0], np.arange(8)), run.mesh)
  params, opt_state, seen = run.params, run.opt_state, []
  for _ in range(60):
    params, opt_state, m = run.step(params, opt_state, peaked, batch)
    seen.append(np.asarray(m.top1) / np.asarray(m.count))
  assert (seen[0] < 0.1).all() and (seen[-1] > 0.6).all(), (seen[0], seen[-1])

  train(_config(tmp_path, "heads.head_type=eagle", "max_steps=2", "eval_every=0", "log_every=1"), progress=False)
  head = read_heads(str(tmp_path), random_model(preset("tiny"), seed=0))
  assert isinstance(head, EagleHead) and head.config.draft_vocab_size == 512  # the whole vocabulary
  assert read_draft_ids(str(tmp_path), None) is None
  engine = medusa_jax.load("random:tiny", heads=str(tmp_path))
  assert engine.plan(mode="medusa").drafter.tree.size == head.config.budget


def test_loss_falls_on_tiny(tmp_path):
  train(_config(tmp_path, "max_steps=30", "log_every=5", "eval_every=0"), progress=False)
  losses = [r["loss"] for r in _metrics(tmp_path)]
  assert losses[-1] < 0.6 * losses[0], losses


def test_head_targets_shift_by_k_plus_2():
  tokens = jnp.arange(10)[None]
  mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 0, 0]], bool)
  targets, valid = head_targets(tokens, mask, 2)
  assert targets[0, :8, 0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9]  # head 0 predicts t + 2
  assert valid[0, :, 0].tolist() == [0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
  assert targets[0, :7, 1].tolist() == [3, 4, 5, 6, 7, 8, 9]     # head 1 predicts t + 3
  assert valid[0, :, 1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]


def test_medusa1_step_leaves_backbone_unchanged_and_moves_heads(tmp_path):
  cfg = _config(tmp_path)
  base = random_model(preset("tiny"), seed=0)
  heads = MedusaHeads.for_model(base, HeadsConfig(2, 1, True))
  hg, hs = nnx.split(heads)
  bg, bs = nnx.split(base)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(bs))
  opt = make_optimizer(cfg)
  params = {"heads": nnx.to_pure_dict(hs)}
  step, _ = make_train_step(hg, bg, opt, cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, (4, 32)))
  batch = SequenceBatch(tokens, jnp.ones((4, 32), bool))
  new, state, _ = step(params, opt.init(params), bs, batch)
  new, _, _ = step(new, state, bs, batch)  # warm-up starts at lr 0
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(bs))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, new)
  assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.parametrize("head_type", ["medusa", "hydra"])
def test_cached_positions_give_the_sequence_loss(tmp_path, head_type):
  """Dropping prompt and padding positions (cache_hidden) leaves the loss and its gradient as they
  are (for Hydra heads, the cached next tokens are the sequence's)."""
  cfg = _config(tmp_path, "num_heads=3", f"heads.head_type={head_type}")
  base = random_model(preset("tiny"), seed=0)
  heads = random_heads(base, HeadsConfig(3, 1, False, head_type), seed=1)  # every head differs
  hg, hs = nnx.split(heads)
  bg, bs = nnx.split(base)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 500, (4, 160)).astype(np.int32)  # rows run trimmed to 64 columns
  mask = np.zeros((4, 160), bool)
  mask[:, 10:20] = True
  mask[2, 25:30] = True
  cached = cache_positions(bg, bs, tokens, mask, 3, batch_size=2)
  assert len(cached.hidden) == 4 * 12 + 7 and cached.valid.any(-1).all()
  opt = make_optimizer(cfg)
  params = {"heads": nnx.to_pure_dict(hs)}
  _, evaluate = make_train_step(hg, bg, opt, cfg)
  seq = evaluate(params, bs, SequenceBatch(jnp.asarray(tokens), jnp.asarray(mask)))
  pos = evaluate(params, bs, jax.tree.map(jnp.asarray, cached))
  np.testing.assert_allclose(pos.loss, seq.loss, rtol=1e-5)
  np.testing.assert_array_equal(pos.count, seq.count)
  np.testing.assert_array_equal(pos.top1, seq.top1)


def test_hydra_heads_train_and_reload(tmp_path):
  """A Hydra run (cached positions) lowers its loss; the run and its exported heads directory
  reload as the same Hydra heads, which Medusa/TGI/vLLM export refuses in one line."""
  from medusa_jax.formats.layout import export, read_heads

  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY,
                         f"output_dir={out}", "heads.head_type=hydra", "cache_hidden=true",
                         "max_steps=30", "log_every=5", "eval_every=0"],
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  losses = [r["loss"] for r in _metrics(out)]
  assert losses[-1] < 0.6 * losses[0], losses
  base = random_model(preset("tiny"), seed=0)
  run, exported = read_heads(str(out), base), read_heads(str(out / "heads"), base)
  assert run.config.head_type == exported.config.head_type == "hydra"
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(run)),
               nnx.to_pure_dict(nnx.state(exported)))
  for fmt in ("medusa", "vllm"):
    with pytest.raises(MedusaError, match=f"hydra heads cannot be exported as {fmt}"):
      export(fmt, str(tmp_path / fmt), model=base, heads=run, base_name="tiny")
    assert not (tmp_path / fmt).exists()


def test_cache_hidden_training_loss_falls(tmp_path):
  train(_config(tmp_path, "cache_hidden=true", "batch_size=2", "max_steps=30", "log_every=5",
                "eval_every=10"), progress=False)
  losses = [r["loss"] for r in _metrics(tmp_path)]
  assert losses[-1] < 0.6 * losses[0], losses
  assert _metrics(tmp_path, "eval")


@pytest.mark.parametrize("draft", [False, True])
def test_teacher_targets_are_the_base_distribution_at_t_plus_k_plus_1(draft):
  """Head k's soft target at t: the top-M of the base model's softmax (over the drafting vocabulary
  when given) at position t + k + 1, renormalised, from full logits in NumPy; past the end, the
  hard target."""
  base = random_model(preset("tiny"), seed=0)
  vocab, m, num_heads = base.config.vocab_size, 4, 3
  rng = np.random.default_rng(0)
  ids = rng.permutation(vocab)[: vocab // 4].astype(np.int32) if draft else None
  tokens = jnp.asarray(rng.integers(3, vocab, (2, 20)), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  hidden = backbone_hidden(base, tokens)
  got = position_targets(hidden, tokens, mask, num_heads,
                         teacher_distribution(base, hidden, ids, m))
  got_ids = np.asarray(got.soft_ids).reshape(2, 20, num_heads, m)
  got_probs = np.asarray(got.soft_probs).reshape(2, 20, num_heads, m)
  positions = jnp.broadcast_to(jnp.arange(20), tokens.shape)
  logits = np.asarray(base(tokens, positions)[0], np.float64)  # [2, 20, vocab]
  columns = np.arange(vocab) if ids is None else ids
  for b in range(2):
    for t in range(20):
      for k in range(num_heads):
        if t + k + 1 >= 20:
          assert got_probs[b, t, k, 0] == 1.0 and got_probs[b, t, k, 1:].sum() == 0
          continue
        row = logits[b, t + k + 1, columns]
        top = np.argsort(-row, kind="stable")[:m]
        probs = np.exp(row[top] - row[top].max())
        np.testing.assert_array_equal(got_ids[b, t, k], columns[top])
        np.testing.assert_allclose(got_probs[b, t, k], probs / probs.sum(), rtol=1e-4, atol=1e-6)


def test_cached_teacher_targets_match_the_sequence_ones(tmp_path):
  """Teacher targets rebuilt from cached positions (cache_hidden) equal those computed on whole
  sequences, but where the teacher's position was not cached (before an answer's last token):
  there the hard target, with probability 1."""
  cfg = _config(tmp_path, "num_heads=3", "teacher_top_k=4", "vocab_chunk=16")
  base = random_model(preset("tiny"), seed=0)
  bg, bs = nnx.split(base)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 500, (4, 96)).astype(np.int32)
  mask = np.zeros((4, 96), bool)
  mask[:, 10:20] = True
  mask[2, 25:30] = True  # a second answer in one row
  cached = cache_positions(bg, bs, tokens, mask, 3, batch_size=2)
  soft = with_soft_targets(cfg, bg, bs, None, tokens, mask, cached, rows_per_chunk=3)
  hidden = backbone_hidden(base, jnp.asarray(tokens))
  seq = position_targets(hidden, jnp.asarray(tokens), jnp.asarray(mask), 3,
                         teacher_distribution(base, hidden, None, 4))
  kept = np.asarray(head_targets(tokens, mask, 3)[1]).any(-1).reshape(-1)
  seq_ids, seq_probs = np.asarray(seq.soft_ids)[kept], np.asarray(seq.soft_probs)[kept]
  # Position t's head k reads the teacher at t + k + 1. Among valid targets that position is
  # uncached only just before an answer's last token: 18 in every row, 28 in row 2.
  t, row = np.tile(np.arange(96), 4)[kept], np.repeat(np.arange(4), 96)[kept]
  for k in range(3):
    source = t + k + 1
    fallback = ~kept.reshape(4, 96)[row, np.minimum(source, 95)] | (source > 95)
    valid = cached.valid[:, k]
    np.testing.assert_array_equal(fallback & valid, valid & ((source == 18) | ((row == 2) & (source == 28))))
    assert (fallback & valid).sum() == 5
    np.testing.assert_array_equal(soft.soft_ids[~fallback, k], seq_ids[~fallback, k])
    np.testing.assert_allclose(soft.soft_probs[~fallback, k], seq_probs[~fallback, k], rtol=1e-5)
    np.testing.assert_array_equal(soft.soft_ids[fallback, k, 0], cached.targets[fallback, k])
    np.testing.assert_array_equal(soft.soft_probs[fallback, k], [[1, 0, 0, 0]] * fallback.sum())
  empty = with_soft_targets(cfg, bg, bs, None, tokens[:0], mask[:0],
                            jax.tree.map(lambda v: v[:0], cached))  # a split without answers
  assert empty.soft_ids.shape == empty.soft_probs.shape == (0, 3, 4)


def test_soft_loss_is_the_cross_entropy_against_the_teacher():
  """heads_loss with soft targets over a drafting vocabulary: -sum_m p_m log q(id_m) in NumPy, with
  q the heads' softmax over those ids; hits still count the hard targets."""
  base = random_model(preset("tiny"), seed=0)
  heads = MedusaHeads.for_model(base, HeadsConfig(2, 1, True), seed=1)
  vocab = base.config.vocab_size
  rng = np.random.default_rng(0)
  ids = rng.permutation(vocab)[:64].astype(np.int32)
  hidden = jnp.asarray(rng.normal(size=(21, base.config.hidden_size)), jnp.float32)
  targets = ids[rng.integers(0, 64, (21, 2))]
  valid = np.ones((21, 2), bool)
  soft_ids = ids[rng.integers(0, 64, (21, 2, 3))]
  soft_probs = rng.dirichlet(np.ones(3), (21, 2)).astype(np.float32)
  hard_batch = _positions(hidden, targets, valid, rng)
  got = heads_loss(heads, base, dataclasses.replace(hard_batch, soft_ids=jnp.asarray(soft_ids),
                                                    soft_probs=jnp.asarray(soft_probs)),
                   0.5, chunk=8, draft_ids=ids)
  hard = heads_loss(heads, base, hard_batch, 0.5, chunk=8, draft_ids=ids)
  full = np.asarray(heads(hidden, base))
  column = {int(t): i for i, t in enumerate(ids)}
  for k in range(2):
    logp = _log_softmax(full[k][:, ids])
    ce = -sum(soft_probs[n, k, j] * logp[n, column[int(soft_ids[n, k, j])]]
              for n in range(21) for j in range(3))
    np.testing.assert_allclose(got.ce[k], ce, rtol=1e-4)
  np.testing.assert_array_equal(got.top1, hard.top1)
  np.testing.assert_array_equal(got.top5, hard.top5)


@pytest.mark.parametrize("cache", [False, True])
def test_teacher_distillation_trains(tmp_path, cache):
  train(_config(tmp_path, "teacher_top_k=4", f"cache_hidden={str(cache).lower()}", "batch_size=2",
                "max_steps=30", "log_every=5", "eval_every=30"), progress=False)
  losses = [r["loss"] for r in _metrics(tmp_path)]
  assert losses[-1] < 0.8 * losses[0], losses  # the CE against the teacher's distributions
  assert _metrics(tmp_path, "eval")


def _positions(hidden, targets, valid, rng):
  """A `PositionBatch` with random next tokens (what Hydra heads read with the targets)."""
  return PositionBatch(hidden, jnp.asarray(rng.integers(0, 512, len(hidden)), jnp.int32),
                       jnp.asarray(targets), jnp.asarray(valid))


@pytest.mark.parametrize("share,head_type", [(True, "medusa"), (False, "medusa"), (True, "hydra")])
def test_draft_vocab_loss_is_the_softmax_over_those_ids(share, head_type):
  """heads_loss over a drafting vocabulary equals CE and top-k computed in NumPy from the full
  logits' columns at those ids; a target outside them adds no loss and counts as a miss."""
  base = random_model(preset("tiny"), seed=0)
  heads = random_heads(base, HeadsConfig(2, 1, share, head_type), seed=1)
  vocab = base.config.vocab_size
  rng = np.random.default_rng(0)
  ids = rng.permutation(vocab)[: vocab // 3].astype(np.int32)
  hidden = jnp.asarray(rng.normal(size=(37, base.config.hidden_size)), jnp.float32)
  targets = rng.integers(0, vocab, (37, 2)).astype(np.int32)
  targets[:12, 0] = ids[rng.integers(0, len(ids), 12)]  # some targets inside the set, most outside
  targets[:20, 1] = ids[rng.integers(0, len(ids), 20)]
  valid = rng.random((37, 2)) < 0.9
  batch = _positions(hidden, targets, valid, rng)
  got = heads_loss(heads, base, batch, 0.5, chunk=8, draft_ids=ids)
  full = np.asarray(heads(hidden, base, path=batch.path))  # [2, 37, vocab]
  column = {int(t): i for i, t in enumerate(ids)}
  loss = 0.0
  for k in range(2):
    logits = full[k][:, ids]
    logp = _log_softmax(logits)
    ce, hits1, hits5, scored = 0.0, 0, 0, 0
    for n in range(37):
      if not valid[n, k] or int(targets[n, k]) not in column:
        continue
      c = column[int(targets[n, k])]
      rank = int(np.sum(logits[n] > logits[n, c]))
      ce, hits1, hits5, scored = ce - logp[n, c], hits1 + (rank < 1), hits5 + (rank < 5), scored + 1
    np.testing.assert_allclose(got.ce[k], ce, rtol=1e-4)
    assert (got.top1[k], got.top5[k], got.scored[k], got.count[k]) == (hits1, hits5, scored, valid[:, k].sum())
    loss += 0.5 ** k * ce / scored
  np.testing.assert_allclose(got.loss, loss, rtol=1e-4)


def test_draft_vocab_training_uses_the_most_frequent_answer_tokens(tmp_path):
  """`draft_vocab=N`: the training answers' N most frequent tokens (counted by hand here) are the
  heads' softmax, and the loss falls."""
  import collections

  cfg = _config(tmp_path, "draft_vocab=10", "max_steps=30", "log_every=5", "eval_every=0")
  run = setup(cfg)
  tokens, mask = run.data[0].tokens, run.data[0].mask
  counts = collections.Counter(int(t) for t in tokens[mask])
  assert len(counts) > 10
  assert run.draft_ids.tolist() == sorted(counts, key=lambda t: (-counts[t], t))[:10]
  train(cfg, progress=False)
  losses = [r["loss"] for r in _metrics(tmp_path)]
  assert losses[-1] < 0.8 * losses[0], losses  # 10 classes: a lower floor than the whole vocabulary


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_lm_loss_matches_full_logits(kind):
  """Medusa-2's chunked L_LM equals KL / CE computed in NumPy from both models' full logits, over
  the positions whose next token is an assistant token."""
  teacher = random_model(preset("tiny"), seed=0)
  model = random_model(preset("tiny"), seed=1)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 500, (2, 24)))
  mask = np.zeros((2, 24), bool)
  mask[0, 5:12] = mask[1, 15:24] = True
  positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
  p_logits, p_hidden, _ = teacher(tokens, positions)
  q_logits, q_hidden, _ = model(tokens, positions)
  total, count = lm_loss(model, teacher, q_hidden, p_hidden, tokens, jnp.asarray(mask), kind, chunk=7)
  logp, logq = _log_softmax(np.asarray(p_logits, np.float64)), _log_softmax(np.asarray(q_logits, np.float64))
  tok = np.asarray(tokens)
  expected = []
  for b in range(2):
    for t in range(23):
      if mask[b, t + 1]:
        expected.append(np.sum(np.exp(logp[b, t]) * (logp[b, t] - logq[b, t])) if kind == "kl"
                        else -logq[b, t, tok[b, t + 1]])
  assert int(count) == len(expected) == 7 + 9
  np.testing.assert_allclose(float(total), np.sum(expected), rtol=1e-4)


def test_medusa2_trains_backbone_and_heads(tmp_path):
  """Joint training: L_LM starts at 0 (the model is the frozen original), the heads' loss falls,
  the backbone moves, and the checkpoint restores the trained backbone."""
  cfg = _config(tmp_path, "method=medusa2", "max_steps=30", "log_every=1", "eval_every=10",
                "backbone_learning_rate=1e-3", "heads_weight=1.0")
  train(cfg, progress=False)
  rows = _metrics(tmp_path)
  assert rows[0]["lm_loss"] == pytest.approx(0.0, abs=1e-6)
  assert rows[-1]["lm_loss"] > 0 and "lm_loss" in _metrics(tmp_path, "eval")[-1]
  assert rows[-1]["head_loss"][0] < 0.6 * rows[0]["head_loss"][0], (rows[0], rows[-1])
  original = random_model(preset("tiny"), seed=cfg.seed)
  trained, _ = trained_model(cfg, random_model(preset("tiny"), seed=cfg.seed))
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), nnx.to_pure_dict(nnx.state(trained)),
                       nnx.to_pure_dict(nnx.state(original)))
  assert min(jax.tree.leaves(moved)) > 0


def test_hidden_cache_dir_is_reused(tmp_path, monkeypatch):
  """A second run on the same data reads the stored hidden states (never recomputes them) and
  trains exactly as the first."""
  import medusa_jax.training.hidden_cache as hidden_cache

  common = ["cache_hidden=true", "batch_size=2", "max_steps=4", "log_every=2", "eval_every=4",
            f"hidden_cache_dir={tmp_path / 'cache'}"]
  train(_config(tmp_path / "a", *common), progress=False)
  folder, = (tmp_path / "cache").iterdir()
  assert len(list(folder.glob("*.npz"))) == 2  # train and eval rows

  def recompute(*args, **kwargs):
    raise AssertionError("hidden states recomputed")

  monkeypatch.setattr(hidden_cache, "_row_positions", recompute)
  train(_config(tmp_path / "b", *common), progress=False)
  assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
  assert _metrics(tmp_path / "b", "eval") == _metrics(tmp_path / "a", "eval")


def test_hidden_cache_dir_computes_only_new_rows(tmp_path, monkeypatch):
  """Grown data: rows stored by an earlier run are read back, only the new conversations run
  through the backbone, and the positions equal a fresh computation of all rows."""
  import medusa_jax.training.hidden_cache as hidden_cache
  import medusa_jax.training.loop as loop

  with open(os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json")) as f:
    convs = json.load(f)
  first, grown = tmp_path / "first.json", tmp_path / "grown.json"
  first.write_text(json.dumps(convs[:40]))
  grown.write_text(json.dumps(convs))
  cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", f"data={first}", "cache_hidden=true",
                           "eval_fraction=0", f"hidden_cache_dir={tmp_path / 'cache'}"])
  run = loop.setup(cfg)
  tokens, mask = run.data[0].tokens, run.data[0].mask
  hidden_cache.stored_positions(cfg, run.base_graphdef, run.base_state, tokens, mask)
  computed = []
  real = hidden_cache._row_positions

  def counting(graphdef, state, t, m, *args, **kwargs):
    computed.append(len(t))
    return real(graphdef, state, t, m, *args, **kwargs)

  monkeypatch.setattr(hidden_cache, "_row_positions", counting)
  folder, = (tmp_path / "cache").iterdir()
  (folder / "killed.tmp.npz").write_bytes(b"half-written")  # a killed run's partial shard is ignored
  cfg.data.files = [str(grown)]
  grown_rows = loop.prepare_data(cfg, run.loaded.tokenizer, 0)[0]
  tokens, mask = grown_rows.tokens, grown_rows.mask
  got = hidden_cache.stored_positions(cfg, run.base_graphdef, run.base_state, tokens, mask)
  assert computed == [24]
  want = cache_positions(run.base_graphdef, run.base_state, tokens, mask, cfg.heads.num_heads, 4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_hidden_cache_dir_serves_other_head_counts(tmp_path, monkeypatch):
  """A head-count sweep: a run with 3 heads reads back what a 2-head run stored (nothing runs
  through the backbone again) and gets the positions a fresh 3-head computation gives."""
  import medusa_jax.training.hidden_cache as hidden_cache
  import medusa_jax.training.loop as loop

  cfg = load_config(TINY, [f"output_dir={tmp_path / 'run'}", "cache_hidden=true", "eval_fraction=0",
                           f"hidden_cache_dir={tmp_path / 'cache'}", "num_heads=2"])
  run = loop.setup(cfg)
  tokens, mask = run.data[0].tokens, run.data[0].mask
  hidden_cache.stored_positions(cfg, run.base_graphdef, run.base_state, tokens, mask)
  wants = {h: cache_positions(run.base_graphdef, run.base_state, tokens, mask, h, 4) for h in (3, 1)}
  monkeypatch.setattr(hidden_cache, "_row_positions", lambda *a, **k: pytest.fail("recomputed"))
  for heads, want in wants.items():
    cfg.heads.num_heads = heads
    got = hidden_cache.stored_positions(cfg, run.base_graphdef, run.base_state, tokens, mask)
    assert got.targets.shape == want.targets.shape and got.targets.shape[1] == heads
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("method", ["medusa1", "medusa2", "medusa1 heads.head_type=eagle"])
def test_kill_and_resume_matches_uninterrupted(tmp_path, method):
  full, part = tmp_path / "full", tmp_path / "part"
  common = ["log_every=2", "save_every=6", "eval_every=0", "max_steps=12", f"method={method.split()[0]}",
            *method.split()[1:]]
  train(_config(full, *common), progress=False)
  train(_config(part, *common), progress=False, stop_at=6)  # "killed" after the step-6 checkpoint
  train(_config(part, *common), progress=False)                      # resumed
  a = {r["step"]: r for r in _metrics(full)}
  b = {r["step"]: r for r in _metrics(part)}
  for s in (8, 10, 12):
    np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-5)
    np.testing.assert_allclose(b[s]["top1"], a[s]["top1"], atol=1e-6)


def test_resuming_with_other_shapes_is_one_error(tmp_path):
  """An output_dir whose checkpoints hold other shapes (here 3 heads, asked for 2) is refused by
  name before orbax reads anything; the run is left as it was."""
  common = ["log_every=2", "save_every=2", "eval_every=0", "max_steps=2"]
  train(_config(tmp_path, *common), progress=False)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(MedusaError, match=r"do not fit this base model and config: params\['heads'\]\['blocks'\]\[2\].* "
                                        r"is \[64\] there, absent here"):
    train(_config(tmp_path, *common, "num_heads=2", "max_steps=4"), progress=False)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.parametrize("method", ["medusa1", "medusa2", "medusa1 cache_hidden=true teacher_top_k=4",
                                    "medusa1 heads.head_type=eagle"])
def test_eight_simulated_devices_match_one(tmp_path, method):
  """mesh data=2, fsdp=2, tensor=2 on 8 simulated CPU devices gives the one-device losses (Medusa-2:
  the backbone and its optimizer state are sharded too; teacher targets: their batches too; an
  EAGLE drafter's attention heads over tensor like the backbone's)."""
  script = (
      "import sys; sys.path.insert(0, %r)\n"
      "from medusa_jax.training.config import TrainConfig, load_config\n"
      "from medusa_jax.training.loop import train\n"
      "import jax; assert len(jax.devices()) == 8\n"
      "train(load_config(%r, sys.argv[1:]), progress=False)\n" % (ROOT, TINY))
  data = os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json")
  common = [f"data={data}", "max_steps=8", "log_every=2", "eval_every=0", "save_every=100",
            f"method={method.split()[0]}", *method.split()[1:]]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  subprocess.run([sys.executable, "-c", script, f"output_dir={tmp_path / 'mesh'}", *common,
                  "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], check=True, env=env, timeout=600)
  train(_config(tmp_path / "single", *common), progress=False)
  sharded, single = _metrics(tmp_path / "mesh"), _metrics(tmp_path / "single")
  assert [r["step"] for r in sharded] == [r["step"] for r in single]
  for a, b in zip(sharded, single):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-4)


@pytest.mark.parametrize("overrides, message", [
    (["nope=1"], "unknown config key 'nope'"),
    (["mesh.pipeline=2"], "unknown config key 'mesh.pipeline'"),
    (["max_steps=abc"], "needs a number"),
    (["num_heads=2.5"], "'num_heads' needs a whole number, got 2.5"),
    (["mesh.data=2"], "but 1 are available"),
    (["mesh.data=3"], "must divide by mesh.data x mesh.fsdp"),
    (["data=/no/such/file.json"], "data file not found"),
    (["method=medusa3"], "'method' must be one of medusa1, medusa2"),
    (["method=medusa2", "lm_loss=mse"], "'medusa2.lm_loss' must be one of kl, ce"),
    (["method=medusa2", "cache_hidden=true"], "cache_hidden needs method medusa1"),
    (["draft_vocab=-1"], "draft_vocab must be >= 0"),
    (["data=[]", "draft_vocab=8"], "draft_vocab needs training data"),
    (["teacher_top_k=-1"], "teacher_top_k must be >= 0"),
    (["method=medusa2", "teacher_top_k=4"], "teacher_top_k needs method medusa1"),
    (["draft_vocab=8", "teacher_top_k=16"], "teacher_top_k 16 exceeds the heads' 8-token vocabulary"),
    (["mesh.data=0"], "'mesh.data' must be at least 1, got 0"),
    (["log_every=0"], "'log_every' must be at least 1"),
    (["eval_every=-1"], "'eval_every' must be >= 0"),
    (["learning_rate=0"], "'optim.learning_rate' must be positive"),
    (["eval_fraction=1"], r"'data.eval_fraction' must be in \[0, 1\)"),
    (["model="], "'model.spec' must not be empty"),
    (["model.spec="], "'model.spec' must not be empty"),
    (["optim.nope=1"], "unknown config key 'optim.nope'"),
    (["heads=3"], "config key 'heads' needs a mapping"),
    (["heads.head_type=lstm"], "'heads.head_type' must be one of medusa, hydra, eagle"),
    (["heads.head_type=eagle", "heads.ttt_steps=0"], "'heads.ttt_steps' must be at least 1"),
    (["heads.head_type=eagle", "cache.hidden=true"], "an eagle drafter trains with method medusa1 on sequences"),
    (["output_dir=3"], "'output_dir' needs a string, got 3"),
    (["data=5"], "'data' needs a path or a list of paths"),
])
def test_bad_config(tmp_path, overrides, message):
  with pytest.raises(MedusaError, match=message):
    cfg = _config(tmp_path, *overrides)
    train(cfg, progress=False)


def test_empty_dataset(tmp_path):
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  with pytest.raises(MedusaError, match="holds no conversations"):
    train(_config(tmp_path / "out", f"data={empty}"), progress=False)


def test_cli_bad_key_one_line(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY,
                         "bogus.key=1"], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: unknown config key 'bogus.key'"]


def test_empty_override_clears_an_optional_path():
  cfg = load_config(os.path.join(ROOT, "configs", "smollm2-135m.yaml"), ["hidden_cache_dir=", "init_heads="])
  assert cfg.cache.dir == "" and cfg.heads.init == ""


def test_flat_names_and_sections_give_one_config(tmp_path):
  """Configs written with the earlier flat names (e.g. a run's old train_config.json) load into the
  same sections as the nested spelling."""
  flat = load_config(TINY, ["num_heads=2", "learning_rate=0.01", "cache_hidden=true", "model=random:tiny",
                            "data=a.json", "lm_loss=ce", "hidden_cache_dir=c"])
  nested = load_config(TINY, ["heads.num_heads=2", "optim.learning_rate=0.01", "cache.hidden=true",
                              "model.spec=random:tiny", "data.files=[a.json]", "medusa2.lm_loss=ce",
                              "cache.dir=c"])
  assert flat == nested and flat.heads.num_heads == 2 and flat.data.files == ["a.json"]
  assert TrainConfig.from_dict(nested.to_dict()) == nested


def test_config_file_must_be_a_mapping(tmp_path):
  bad = tmp_path / "list.yaml"
  bad.write_text("- model\n- data\n")
  with pytest.raises(MedusaError, match="must hold a mapping of config keys, got a list"):
    load_config(str(bad))


def test_medusa2_starts_from_medusa1_heads(tmp_path):
  """init_heads: the two-stage recipe (Medusa-1 heads, then joint training) starts Medusa-2 from
  exactly the saved heads; a directory of another shape is refused."""
  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.formats.layout import read_heads

  base = random_model(preset("tiny"), seed=0)
  saved = MedusaHeads.for_model(base, HeadsConfig(3, 1, False), seed=5)
  for blocks in saved.blocks:
    blocks[0].linear.kernel[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(3), blocks[0].linear.kernel.shape)
  medusa_format.write(str(tmp_path / "heads"), saved, base, base_model="random:tiny")
  init = read_heads(str(tmp_path / "heads"), base)
  run = setup(_config(tmp_path / "run", "method=medusa2"), init_heads=init)
  jax.tree.map(np.testing.assert_array_equal, run.params["heads"], nnx.to_pure_dict(nnx.state(init)))
  with pytest.raises(MedusaError, match="are 3 medusa heads x 1 layers .* asks for 2 medusa heads x 1"):
    setup(_config(tmp_path / "run", "num_heads=2"), init_heads=init)
  with pytest.raises(MedusaError, match="pass init_heads="):  # the command line reads heads.init
    setup(_config(tmp_path / "run", f"heads.init={tmp_path / 'heads'}"))


def test_cli_medusa2_writes_the_trained_backbone_and_heads(tmp_path):
  """A Medusa-2 run exports `model/` (HF Llama) and `heads/`; reloaded, they equal the checkpoint."""
  from medusa_jax.formats.layout import read_heads
  from medusa_jax.weights import specs

  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY,
                         f"output_dir={out}", "method=medusa2", "max_steps=3", "eval_every=0",
                         "backbone_learning_rate=1e-3"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cfg = load_config(TINY, [f"output_dir={out}", "method=medusa2"])
  trained, heads = trained_model(cfg, random_model(preset("tiny"), seed=cfg.seed))
  exported = specs.load(str(out / "model")).model
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(exported)),
               nnx.to_pure_dict(nnx.state(trained)))
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(read_heads(str(out / "heads"), exported))),
               nnx.to_pure_dict(nnx.state(heads)))
  original = random_model(preset("tiny"), seed=cfg.seed)
  assert not np.array_equal(exported.embed.embedding[...], original.embed.embedding[...])
