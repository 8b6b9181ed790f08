"""Sharded inference on simulated CPU devices: greedy output on a mesh (tensor-parallel weights and
KV cache, data-parallel rows) equals one device, plain, Medusa, Hydra and an EAGLE drafter; a Llama-3-8B's weights
split 8 ways; a mesh that does not fit is one line. Each case runs in a subprocess, where
`XLA_FLAGS` can still set the device count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT


def _run(script: str, devices: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
  proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                        env=env, timeout=900, cwd=ROOT, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


TINY_MESHES = r"""
import dataclasses, json, sys
import jax, numpy as np
from helpers import random_eagle, random_heads, random_prompts
from medusa_jax.decode.engine import Engine
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.model.config import preset
from medusa_jax.model.sharding import parse_mesh
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model

assert len(jax.devices()) == 8
config = dataclasses.replace(preset("tiny"), num_kv_heads=4)  # 4 query and 4 kv heads: tensor=4 divides
model = random_model(config, seed=3)
prompts = random_prompts(1, [5, 17, 9, 30])
out = {}
for head_type in ("medusa", "hydra", "eagle"):
  if head_type == "eagle":
    heads, ids = random_eagle(model)
    drafting = dict(draft_vocab=ids)
  else:
    heads = random_heads(model, HeadsConfig(4, 1, True, head_type), scale=0.3)
    drafting = dict(tree="mc_sim_7b_63")
  for mesh in (None, "tensor=4", "data=2,tensor=2", "data=2,fsdp=2,tensor=2"):
    devices = jax.devices()[:8 if mesh and "fsdp" in mesh else 4 if mesh and "data" in mesh else
                            int(mesh.split("=")[1]) if mesh else 1]
    engine = Engine(model, ByteTokenizer(), heads=heads, max_cache_len=512,
                    mesh=parse_mesh(mesh, devices) if mesh else None, **drafting)
    for mode in ("baseline", "medusa", "gated") if head_type == "medusa" else ("baseline", "medusa"):
      settings = dict(mode="medusa", lookup=3, min_ngram=2) if mode == "gated" else dict(mode=mode)
      r = engine.generate_ids(prompts, max_new_tokens=40, **settings)
      out[f"{head_type}|{mesh}|{mode}"] = [r.tokens.tolist(), r.num_tokens.tolist()]
    leaves = jax.tree.leaves(engine.state)  # bytes on the first device / all bytes
    out[f"{head_type}|{mesh}|share"] = (sum(l.addressable_shards[0].data.nbytes for l in leaves)
                                        / sum(l.nbytes for l in leaves))
print(json.dumps(out))
"""


def test_tiny_greedy_on_meshes_equals_one_device():
  """tensor=4, data=2 x tensor=2 and data=2 x fsdp=2 x tensor=2 at batch 4 (mixed prompt
  lengths): the tokens of one device, plain and Medusa (Medusa and Hydra heads, an EAGLE drafter;
  Medusa also with the gated lookup chain), with the weights split over the devices."""
  out = json.loads(_run(TINY_MESHES, 8).stdout.strip().splitlines()[-1])
  assert out["medusa|tensor=4|share"] < 0.35 and out["medusa|None|share"] == 1.0  # weights split
  for key, value in out.items():
    head_type, mesh, mode = key.split("|")
    if mode == "share":
      continue
    one = out[f"{head_type}|None|{mode}"]
    np.testing.assert_array_equal(value[1], one[1], err_msg=key)
    np.testing.assert_array_equal(value[0], one[0], err_msg=key)
    assert value == out[f"{head_type}|{mesh}|baseline"], key  # lossless


LLAMA3_8B = r"""
import jax, json
import numpy as np
from flax import nnx
from medusa_jax.model.config import preset
from medusa_jax.model.llama import Llama
from medusa_jax.model.sharding import parse_mesh, state_shardings

mesh = parse_mesh("tensor=8")
abstract = nnx.eval_shape(lambda: Llama(preset("llama3-8b"), dtype=jax.numpy.bfloat16,
                                        param_dtype=jax.numpy.bfloat16, rngs=nnx.Rngs(0)))
state = nnx.state(abstract)
shardings = state_shardings(state, mesh)
total = per_device = 0
for var, sharding in zip(jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                         jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))):
  value, s = var.get_value(), sharding.get_value()
  total += value.size * value.dtype.itemsize
  per_device += int(np.prod(s.shard_shape(value.shape))) * value.dtype.itemsize
print(json.dumps({"total": total, "per_device": per_device}))
"""


def test_llama3_8b_weights_split_eight_ways():
  """random:llama3-8b on an 8-device tensor mesh, abstractly (no 16 GB allocation): each device
  holds 1/8 of the parameter bytes, within 5%."""
  out = json.loads(_run(LLAMA3_8B, 8).stdout.strip().splitlines()[-1])
  assert out["total"] > 15e9  # bfloat16 8B
  assert abs(out["per_device"] * 8 / out["total"] - 1) < 0.05, out


def test_server_on_a_tensor_mesh_answers_like_one_device(tmp_path):
  """`infer/serve.py --mesh tensor=2` on 2 simulated devices: concurrent greedy requests get what
  `Engine.generate` gives each alone on one device."""
  import concurrent.futures
  import signal

  import openai
  from helpers import random_heads, start_server

  import medusa_jax
  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.medusa.heads import HeadsConfig
  from medusa_jax.model.config import preset
  from medusa_jax.weights.specs import random_model

  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  heads = str(tmp_path / "heads")
  medusa_format.write(heads, random_heads(base, HeadsConfig(4, 1, True, "hydra"), scale=0.3), base,
                      base_model="random:tiny", lm_head_copies=False)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  proc, url = start_server(tmp_path, "--model", "random:tiny", "--heads", heads, "--max-batch", "2",
                     "--max-context", "128", "--mesh", "tensor=2", env=env)
  try:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompts = [f"question {i}: " + "y" * (5 * i) for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      texts = list(pool.map(lambda p: client.chat.completions.create(
          model="random:tiny", messages=[{"role": "user", "content": p}], max_tokens=24,
          temperature=0).choices[0].message.content, prompts))
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
  engine = medusa_jax.load("random:tiny", heads=None)
  assert texts == [engine.generate(p, max_new_tokens=24).text for p in prompts]


@pytest.mark.parametrize("mesh, devices, message", [
    ("tensor=3", 3, "mesh tensor=3 does not divide the model's 4 attention heads"),
    ("tensor=2", 1, "2 devices, but 1 are available"),
    ("tensor=two", 1, "a mesh is AXIS=N"),
])
def test_mesh_that_does_not_fit_is_one_line(mesh, devices, message):
  proc = _run("from medusa_jax.cli.generate import main; main()", devices, "--model", "random:tiny",
              "--heads", "none", "--max-new-tokens", "4", "--mesh", mesh, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().split('error: ', 1)[1]}"]
  assert message in proc.stderr


EMBEDDED = r"""
import json, sys
import medusa_jax

engine = medusa_jax.load(mesh=sys.argv[1] or None)
prompts = [engine.encode(p) for p in ("Name three primes.", "Why is the sky blue?")]
print(json.dumps({mode: engine.generate_ids(prompts, max_new_tokens=48, mode=mode).tokens.tolist()
                  for mode in ("baseline", "medusa")}))
"""


@pytest.mark.slow
def test_embedded_model_tensor_3_equals_one_device():
  """SmolLM2-135M (9 query / 3 kv heads) on a `tensor=3` mesh of 3 simulated devices gives the
  one-device greedy tokens, plain and with the shipped heads."""
  one, three = (json.loads(_run(EMBEDDED, n, mesh).stdout.strip().splitlines()[-1])
                for n, mesh in ((1, ""), (3, "tensor=3")))
  assert three["baseline"] == one["baseline"]
  assert three["medusa"] == one["medusa"] == one["baseline"]
