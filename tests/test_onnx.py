"""The ONNX export on onnxruntime against the JAX model: logits of a prefill and of a cached tree
step, the heads' logits, and greedy tokens (plain and Medusa) against the JAX engine's."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_heads

from medusa_jax.decode.engine import Engine
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.medusa.tree import get_tree
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model

pytest.importorskip("onnxruntime")

TREE = get_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])


@pytest.fixture(scope="module", params=["whole", "draft"])
def exported(request, tmp_path_factory):
  """A tiny random model with random Medusa heads (whole vocabulary, or 200 drafting ids) as a
  JAX engine and as an exported ONNX directory on onnxruntime."""
  from medusa_jax.onnx.export import export_onnx
  from medusa_jax.onnx.runner import OnnxDecoder

  model = random_model(preset("tiny"), seed=3)
  heads = random_heads(model, HeadsConfig(4, 2, False), scale=0.5)
  engine = Engine(model, ByteTokenizer(), heads=heads, tree=TREE, max_cache_len=256)
  engine.eos_ids = jnp.asarray([-1], jnp.int32)
  draft = None
  if request.param == "draft":
    ids = np.random.default_rng(0).permutation(np.arange(3, 512))[:200]
    engine.set_draft_vocab(ids)
    draft = engine.draft
  out = tmp_path_factory.mktemp("onnx") / "model"
  export_onnx(str(out), model, None, heads=heads, draft=draft, tree=TREE, eos_ids=(-1,))
  return engine, OnnxDecoder(str(out)), draft


def test_logits_match_jax_for_a_prefill_and_a_cached_tree_step(exported):
  from medusa_jax.model.kv_cache import KVCache

  engine, decoder, draft = exported
  model = engine.model
  rng = np.random.default_rng(1)
  prompt = rng.integers(3, 500, size=(1, 13))
  nodes = rng.integers(3, 500, size=(1, TREE.size))
  logits, cache, medusa = decoder.forward(prompt, np.arange(13)[None], np.ones((1, 13), bool),
                                          decoder.empty_past(1))
  ref, hidden, _ = model(jnp.asarray(prompt), jnp.arange(13)[None])
  np.testing.assert_allclose(logits, np.asarray(ref), rtol=1e-4, atol=1e-4)
  feats = engine.heads.hidden(hidden)
  ref_heads = np.asarray(engine.heads.logits(feats, model) if draft is None else draft.logits(feats))
  if draft is None:
    np.testing.assert_allclose(medusa, ref_heads, rtol=1e-4, atol=1e-4)
  else:  # the drafting ids' logits; -1e9 elsewhere
    ids = np.asarray(draft.ids)
    np.testing.assert_allclose(medusa[..., ids], ref_heads, rtol=1e-4, atol=1e-4)
    assert (np.delete(medusa, ids, axis=-1) == -1e9).all()

  # a tree step after the prompt against the JAX cache's tree forward
  tree_mask = np.concatenate([np.ones((1, TREE.size, 13), bool), TREE.mask[None]], axis=2)
  step, _, _ = decoder.forward(nodes, 13 + TREE.depths[None], np.ones((1, 13 + TREE.size), bool), cache, tree_mask)
  kv = KVCache.init(model.config, 1, 64, jnp.float32)
  _, _, kv = model(jnp.asarray(prompt), jnp.arange(13)[None], kv)
  kv = kv.advance(jnp.asarray([13]))
  ref_step, _, _ = model(jnp.asarray(nodes), 13 + jnp.asarray(TREE.depths)[None], kv, chunk_mask=jnp.asarray(TREE.mask))
  np.testing.assert_allclose(step, np.asarray(ref_step), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lengths", [[11], [5, 17]])
@pytest.mark.parametrize("mode", ["baseline", "medusa"])
def test_greedy_tokens_match_jax(exported, lengths, mode):
  engine, decoder, _ = exported
  rng = np.random.default_rng(len(lengths))
  prompts = [list(rng.integers(3, 500, size=n)) for n in lengths]
  ref, ref_n, ref_steps, _ = engine.generate_ids(prompts, max_new_tokens=24, mode=mode)
  out, n, steps, _ = decoder.generate_ids(prompts, 24, mode)
  np.testing.assert_array_equal(n, ref_n)
  np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(steps, ref_steps)  # the same trees, the same acceptance


def test_bad_directories_are_one_line_errors(exported, tmp_path):
  from medusa_jax.errors import MedusaError
  from medusa_jax.medusa.heads import MedusaHeads
  from medusa_jax.onnx.export import export_onnx
  from medusa_jax.onnx.runner import OnnxDecoder

  with pytest.raises(MedusaError, match="not an exported ONNX model"):
    OnnxDecoder(str(tmp_path))
  engine, decoder, _ = exported
  broken = tmp_path / "broken"
  export_onnx(str(broken), engine.model, None, eos_ids=(-1,))
  (broken / "model.onnx.data").write_bytes(b"\0" * 100)  # truncated weights
  with pytest.raises(MedusaError, match="cannot load the ONNX model"):
    OnnxDecoder(str(broken))
  with pytest.raises(MedusaError, match="exists"):
    export_onnx(str(broken), engine.model, None)
  other = MedusaHeads.for_model(random_model(preset("tiny"), seed=1), HeadsConfig(2, 1, True, "hydra"))
  with pytest.raises(MedusaError, match="Hydra heads"):
    export_onnx(str(tmp_path / "hydra"), engine.model, None, heads=other, tree=TREE)
  assert not (tmp_path / "hydra").exists()
  wide = MedusaHeads.for_model(random_model(dataclasses.replace(preset("tiny"), hidden_size=32), seed=1),
                               HeadsConfig(2, 1, True))
  with pytest.raises(MedusaError, match="heads do not match"):
    export_onnx(str(tmp_path / "wide"), engine.model, None, heads=wide, tree=TREE)
  export_onnx(str(tmp_path / "plain"), engine.model, None)
  with pytest.raises(MedusaError, match="without Medusa heads"):
    OnnxDecoder(str(tmp_path / "plain")).generate_ids([[3]], 4, "medusa")


@pytest.mark.slow
def test_embedded_model_onnx_decoding_equals_jax(tmp_path):
  """The embedded model with its Medusa-type heads through the command-line tools: the same greedy
  tokens as the JAX engine, plain and Medusa."""
  import json
  import subprocess
  import sys

  from helpers import ROOT

  import medusa_jax

  out = tmp_path / "onnx"
  subprocess.run([sys.executable, f"{ROOT}/infer/export_onnx.py", "--out", str(out)], check=True,
                 capture_output=True)
  prompts = ["What is the capital of France?", "Write a haiku about the sea."]
  engine = medusa_jax.load(heads=medusa_jax.weights.specs.default_heads(
      medusa_jax.weights.specs.EMBEDDED_MODEL, medusa_type=True))
  for mode in ("baseline", "medusa"):
    proc = subprocess.run([sys.executable, f"{ROOT}/infer/onnx_generate.py", "--model", str(out), "--mode", mode,
                           "--max-new-tokens", "32", "--json", *sum((["--prompt", p] for p in prompts), [])],
                          check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = engine.generate(prompts, mode=mode, max_new_tokens=32, lookup=0)
    assert [r["token_ids"] for r in rows] == [e.token_ids for e in expected]
    if mode == "medusa":
      assert sum(r["new_tokens"] for r in rows) > 1.3 * sum(r["steps"] for r in rows)


def test_onnxruntime_genai_runs_the_plain_export(tmp_path):
  """onnxruntime-genai's own greedy search over the exported graph gives the JAX engine's tokens."""
  og = pytest.importorskip("onnxruntime_genai")
  from medusa_jax.onnx.export import export_onnx

  model = random_model(preset("tiny"), seed=3)
  engine = Engine(model, ByteTokenizer(), max_cache_len=256)
  export_onnx(str(tmp_path / "m"), model, None, eos_ids=model.config.eos_token_ids,
              pad_id=model.config.pad_token_id)
  prompt = list(np.random.default_rng(2).integers(3, 500, size=9))
  ref, n, _, _ = engine.generate_ids([prompt], max_new_tokens=20, mode="baseline")
  onnx_model = og.Model(str(tmp_path / "m"))
  params = og.GeneratorParams(onnx_model)
  params.set_search_options(max_length=len(prompt) + 20, do_sample=False)
  generator = og.Generator(onnx_model, params)
  generator.append_tokens(np.asarray([prompt], np.int32))
  out = []
  while not generator.is_done():
    generator.generate_next_token()
    out.append(int(generator.get_next_tokens()[0]))
  assert out == [int(t) for t in ref[0, :n[0]]]


def test_float16_weights_halve_the_file_and_keep_the_logits(tmp_path):
  """`dtype="float16"` stores the weights in half precision (computed in float32): about half the
  bytes, logits within half precision's rounding of the JAX float32 ones."""
  from medusa_jax.onnx.export import export_onnx
  from medusa_jax.onnx.runner import OnnxDecoder

  model = random_model(preset("tiny"), seed=3)
  sizes, logits = {}, {}
  prompt = np.random.default_rng(4).integers(3, 500, size=(1, 9))
  for dtype in ("float32", "float16"):
    export_onnx(str(tmp_path / dtype), model, None, dtype=dtype)
    sizes[dtype] = (tmp_path / dtype / "model.onnx.data").stat().st_size
    decoder = OnnxDecoder(str(tmp_path / dtype))
    logits[dtype] = decoder.forward(prompt, np.arange(9)[None], np.ones((1, 9), bool), decoder.empty_past(1))[0]
  assert 0.5 < sizes["float16"] / sizes["float32"] < 0.62  # the float32 rotary tables stay
  ref = np.asarray(model(jnp.asarray(prompt), jnp.arange(9)[None])[0])
  np.testing.assert_allclose(logits["float32"], ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits["float16"], ref, atol=3e-3 * np.abs(ref).max())
