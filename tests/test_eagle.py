"""The EAGLE-style drafter: its training-time test against the decoding chain it stands for, its
expansion against a hand-run greedy chain, the ranked tree against a hand-worked one, greedy output
against plain greedy decoding, an always-right drafter filling every step, its directory against
an independent PyTorch forward of the EAGLE-3 layout, and training (loss, resume)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
  check_oracle_fills_every_step,
  decode_in_chunks,
  oracle_eagle,
  permutation_chain,
  permutation_model,
  random_eagle,
  random_prompts,
)

from medusa_jax.decode.engine import Engine
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.dynamic_tree import ranked_tree
from medusa_jax.medusa.eagle import ttt_outputs
from medusa_jax.medusa.tree import Tree
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model


@pytest.fixture(scope="module")
def tiny():
  model = random_model(preset("tiny"), seed=1)
  head, ids = random_eagle(model)
  return model, head, ids


def _taps(model, head, tokens):
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return model.forward(tokens, positions, taps=head.config.taps).taps


def test_training_time_test_is_the_decoding_chain(tiny):
  """Step j's output at t equals what decoding computes j levels past an accepted prefix ending at
  t - j: the real entries through t - j written to the drafter's cache, then j entries written one
  by one, each reading the previous output and the next (teacher) token."""
  model, head, _ = tiny
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 500, size=(2, 14)), jnp.int32)
  taps = _taps(model, head, tokens)
  outs = ttt_outputs(head, model, taps, tokens, 3)
  for t, j in [(12, 0), (6, 1), (9, 2)]:
    cache = head.empty_cache(2, 32, jnp.float32, None)
    real = t - j + 1  # entries 0..t-j
    out, cache = head.chunk(model, head.fuse(taps[:, :real]), tokens[:, 1:real + 1], cache)
    cache, feat = cache.advance(jnp.full((2,), real)), out[:, -1:]
    for i in range(1, j + 1):
      feat, cache = head.chunk(model, feat, tokens[:, t - j + i + 1][:, None], cache)
      cache = cache.advance(jnp.ones((2,), jnp.int32))
    np.testing.assert_allclose(outs[j][:, t], feat[:, 0], rtol=2e-5, atol=2e-5, err_msg=f"t={t} j={j}")


def test_expansion_of_one_beam_is_the_greedy_chain(tiny):
  """`expand` with one beam: each level's token is the drafter's argmax after the previous one,
  each entry attending to the cache and its ancestors, as entries written one by one do."""
  model, head, ids = tiny
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 500, size=(2, 9)), jnp.int32)
  taps = _taps(model, head, tokens)
  cache = head.empty_cache(2, 32, jnp.float32, None)
  out, cache = head.chunk(model, head.fuse(taps[:, :8]), tokens[:, 1:9], cache)
  cache = cache.advance(jnp.full((2,), 8))
  feat = out[:, -1]
  drafted = head.expand(model, feat, cache, jnp.asarray(ids), 1, 4)
  want_tokens, want_scores, total = [], [], 0.0
  for level in range(4):
    logp = jax.nn.log_softmax(head.logits(feat), axis=-1)
    best = jnp.argmax(logp, axis=-1)
    token = jnp.asarray(ids)[best]
    total = total + jnp.take_along_axis(logp, best[:, None], axis=1)[:, 0]
    want_tokens.append(token)
    want_scores.append(total)
    out, cache = head.chunk(model, feat[:, None], token[:, None], cache)
    cache, feat = cache.advance(jnp.ones((2,), jnp.int32)), out[:, 0]
  np.testing.assert_array_equal(drafted.tokens, jnp.stack(want_tokens, 1))
  np.testing.assert_allclose(drafted.scores, jnp.stack(want_scores, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(drafted.parents, [[-1, 0, 1, 2]] * 2)
  np.testing.assert_array_equal(drafted.depths, [1, 2, 3, 4])


def test_ranked_tree_is_the_hand_worked_tree():
  """Two beams, two levels: candidates 10 (-0.1), 11 (-1.0); children of 10: 20 (-0.3), 21 (-2.0);
  of 11: 22 (-1.2), 23 (-1.5). The best three are 10, 20, 11: the tree [[0], [1], [0, 0]], whose
  static buffers are known."""
  tokens = jnp.asarray([[10, 11, 20, 21, 22, 23]])
  parents = jnp.asarray([[-1, -1, 0, 0, 1, 1]])
  scores = jnp.asarray([[-0.1, -1.0, -0.3, -2.0, -1.2, -1.5]])
  got_tokens, got = ranked_tree(jnp.asarray([7]), tokens, parents, scores, np.asarray([1, 1, 2, 2, 2, 2]), 4)
  np.testing.assert_array_equal(got_tokens, [[7, 10, 11, 20]])
  want = Tree([[0], [1], [0, 0]]).arrays(1)
  for name in ("depths", "mask", "parents", "earlier_siblings"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
  np.testing.assert_array_equal(got.retrieve[0, 1:], [[0, 1, 0], [0, 2, 0], [0, 1, 3]])
  np.testing.assert_array_equal(got.retrieve_mask[0, 1:], [[1, 1, 0], [1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("settings", [dict(), dict(draft_beams=2, draft_depth=4, tree_budget=7)])
def test_greedy_output_equals_the_baseline(tiny, settings):
  """Random prompts of different lengths in one batch, the drafter's default tree (3 beams, 3
  levels, 8 nodes) and another."""
  model, head, ids = tiny
  engine = Engine(model, ByteTokenizer(), heads=head, draft_vocab=ids, max_cache_len=512)
  prompts = random_prompts(4, [5, 23, 11])
  base = engine.generate_ids(prompts, max_new_tokens=40, mode="baseline")
  out = engine.generate_ids(prompts, max_new_tokens=40, mode="medusa", **settings)
  np.testing.assert_array_equal(out.tokens, base.tokens)
  np.testing.assert_array_equal(out.num_tokens, base.num_tokens)


def test_an_always_right_drafter_fills_every_step():
  """On the permutation model, a drafter that is always right: each step emits depth + 1 tokens,
  greedy, lossless sampling and typical acceptance alike."""
  model, sigma = permutation_model()
  head = oracle_eagle(model, sigma, jnp.eye(64)[sigma], width=2, depth=4, budget=6)
  engine = Engine(model, ByteTokenizer(), heads=head, draft_vocab=np.arange(64), max_cache_len=512)
  check_oracle_fills_every_step(engine, sigma, 4)


def test_bad_settings_are_one_line_errors(tiny):
  model, head, ids = tiny
  engine = Engine(model, ByteTokenizer(), heads=head, draft_vocab=ids, max_cache_len=512)
  with pytest.raises(MedusaError, match="tree_budget 30 must be in 2..13"):
    engine.generate_ids([[3, 4]], max_new_tokens=4, mode="medusa", draft_beams=3, draft_depth=2, tree_budget=30)
  with pytest.raises(MedusaError, match="beam_heads drafts with Medusa or Hydra heads"):
    engine.generate_ids([[3, 4]], max_new_tokens=4, mode="beam", num_beams=2, beam_heads=True)
  with pytest.raises(MedusaError, match="grows its tree each step"):
    engine.set_tree([[0]])
  with pytest.raises(MedusaError, match="needs its 256 drafting token ids"):
    Engine(model, ByteTokenizer(), heads=head, draft_vocab=ids[:5])


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
def test_directory_round_trip_and_an_independent_pytorch_forward(tiny, tmp_path, layout):
  """Written in the EAGLE-3 reference's layout or the speculators one and read back, the drafter
  drafts the same; a PyTorch forward written from the layout's definition (fc, the two input
  norms, attention over [embed ; fused] with RoPE, SwiGLU, final norm, lm_head over d2t's ids)
  gives our logits."""
  import torch
  from safetensors.torch import load_file

  from medusa_jax.formats import eagle as eagle_format
  from medusa_jax.formats.layout import read_draft_ids, read_heads

  model, head, ids = tiny
  shuffled = np.random.default_rng(0).permutation(ids).astype(np.int32)  # frequency order, not sorted
  eagle_format.write(str(tmp_path / "eagle"), head, shuffled, model, base_model="random:tiny", layout=layout)
  back = read_heads(str(tmp_path / "eagle"), model)
  back_ids = read_draft_ids(str(tmp_path / "eagle"), None)
  np.testing.assert_array_equal(np.sort(back_ids), np.sort(ids))

  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 500, size=(1, 10)), jnp.int32)
  taps = _taps(model, head, tokens)
  positions = jnp.arange(10)[None]
  mask = jnp.tril(jnp.ones((1, 10, 10), bool))
  ours = head.logits(head.layer(head.fuse(taps), model.embed(tokens), positions, mask)[0])[0]  # columns: shuffled
  again = back.logits(back.layer(back.fuse(taps), model.embed(tokens), positions, mask)[0])[0]  # columns: back_ids
  np.testing.assert_allclose(np.asarray(again)[:, np.argsort(back_ids)], np.asarray(ours)[:, np.argsort(shuffled)],
                             rtol=1e-5, atol=1e-5)

  w = load_file(str(tmp_path / "eagle" / "model.safetensors"))
  layer = eagle_format.LAYOUTS[layout]
  w = {k.replace(layer, "midlayer"): v for k, v in w.items()}
  c = model.config
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731

  def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps) * weight

  def rope(x):  # [T, heads, d], rotate_half convention
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    ang = torch.arange(10, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

  fused = t(taps[0]) @ w["fc.weight"].T
  emb = t(model.embed.embedding[...])[torch.tensor(np.asarray(tokens[0]))]
  x = torch.cat([rms(emb, w["midlayer.input_layernorm.weight"]), rms(fused, w["midlayer.hidden_norm.weight"])], -1)
  q = rope((x @ w["midlayer.self_attn.q_proj.weight"].T).view(10, c.num_heads, c.head_dim))
  k = rope((x @ w["midlayer.self_attn.k_proj.weight"].T).view(10, c.num_kv_heads, c.head_dim))
  v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(10, c.num_kv_heads, c.head_dim)
  group = c.num_heads // c.num_kv_heads
  k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
  scores = torch.einsum("thd,shd->hts", q, k) / c.head_dim ** 0.5
  scores = scores.masked_fill(~torch.tril(torch.ones(10, 10, dtype=torch.bool)), float("-inf"))
  attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(10, -1)
  h = fused + attn @ w["midlayer.self_attn.o_proj.weight"].T
  m = rms(h, w["midlayer.post_attention_layernorm.weight"])
  gate, up = m @ w["midlayer.mlp.gate_proj.weight"].T, m @ w["midlayer.mlp.up_proj.weight"].T
  out = h + (torch.nn.functional.silu(gate) * up) @ w["midlayer.mlp.down_proj.weight"].T
  logits = rms(out, w["norm.weight"]) @ w["lm_head.weight"].T  # columns: ids ascending
  draft_ids = (torch.arange(len(w["d2t"])) + w["d2t"]).numpy()
  np.testing.assert_array_equal(draft_ids, np.sort(ids))
  np.testing.assert_allclose(logits.numpy(), np.asarray(ours)[:, np.argsort(shuffled)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["DP", "DPP"])
def test_server_chunks_keep_the_drafter_through_plain_chunks(tiny, pattern):
  """In the server's slots a plain chunk's steps hand the drafter their features: greedy rows equal
  the baseline, and the always-right drafter accepts every level of every step of every drafted
  chunk after one plain chunk (DP) or two in a row (DPP: more plain steps than its backlog holds,
  written as they come), which holds only if its entries for the plain steps are right."""
  model, head, ids = tiny
  engine = Engine(model, ByteTokenizer(), heads=head, draft_vocab=ids, max_cache_len=512)
  prompts = random_prompts(5, [20, 34])
  base = engine.generate_ids(prompts, max_new_tokens=48, mode="baseline")
  out, _, _ = decode_in_chunks(engine, prompts, "medusa", pattern=pattern)
  for i in range(2):
    assert out[i] == list(base.tokens[i][: base.num_tokens[i]])

  permutation, sigma = permutation_model()
  depth = 3
  oracle = oracle_eagle(permutation, sigma, jnp.eye(64)[sigma], width=2, depth=depth, budget=5)
  engine = Engine(permutation, ByteTokenizer(), heads=oracle, draft_vocab=np.arange(64), max_cache_len=512)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  prompts = [[int(t) % 64 for t in p] for p in prompts]
  out, _, drafted = decode_in_chunks(engine, prompts, "medusa", pattern=pattern)
  for p, row in zip(prompts, out):
    assert row == permutation_chain(sigma, p[-1], 48)
  for counts, left in drafted:  # 2 steps of depth + 1 tokens, or what is left of the budget
    np.testing.assert_array_equal(counts, np.minimum(2 * (depth + 1), np.maximum(left, 0)))


def test_export_cli_converts_between_layouts(tmp_path):
  """`infer/export_hf.py --format speculators` on an EAGLE drafter directory: the exported
  drafter reads back with the same weights and drafting vocabulary; Medusa formats refuse it."""
  import os
  import subprocess
  import sys

  from helpers import ROOT, write_tiny_eagle

  from medusa_jax.formats.layout import read_draft_ids, read_heads

  write_tiny_eagle(tmp_path / "eagle3")
  cmd = [sys.executable, os.path.join(ROOT, "infer", "export_hf.py"), "--model", "random:tiny", "--heads",
         str(tmp_path / "eagle3"), "--out"]
  subprocess.run(cmd + [str(tmp_path / "spec"), "--format", "speculators"], check=True, timeout=300)
  model = random_model(preset("tiny"), seed=0)
  a, b = (read_heads(str(tmp_path / d), model) for d in ("eagle3", "spec"))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(a), nnx.state(b))
  np.testing.assert_array_equal(read_draft_ids(str(tmp_path / "eagle3"), None), read_draft_ids(str(tmp_path / "spec"), None))
  proc = subprocess.run(cmd + [str(tmp_path / "m"), "--format", "medusa"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "an EAGLE drafter exports as eagle3 or speculators" in proc.stderr
  assert not (tmp_path / "m").exists()
