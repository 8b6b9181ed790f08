"""Heads directories: save -> load is exact; bad directories give one clear error."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from helpers import random_heads

from medusa_jax import MedusaError
from medusa_jax.formats.medusa import WEIGHTS, read, to_tensors, write
from medusa_jax.medusa.heads import HeadsConfig
from medusa_jax.model.config import preset
from medusa_jax.weights.specs import random_model


@pytest.fixture(scope="module")
def model():
  return random_model(preset("tiny"), seed=11)


@pytest.mark.parametrize("config", [HeadsConfig(3, 2, False), HeadsConfig(2, 1, True),
                                    HeadsConfig(2, 1, True, "hydra")])
def test_save_load_roundtrip_is_exact(tmp_path, model, config):
  heads = random_heads(model, config, seed=4)
  out = tmp_path / "heads"
  write(str(out), heads, model, base_model="tiny", lm_head_copies=False)
  again = read(str(out), model)
  assert again.config == config
  a = to_tensors(heads)
  b = to_tensors(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(MedusaError, match="exists"):
    write(str(out), heads, model, base_model="tiny", lm_head_copies=False)
  umask = os.umask(0)
  os.umask(umask)  # the usual permissions, not mkdtemp's private 0700
  assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
  assert ((out / "config.json").stat().st_mode & 0o777) == 0o666 & ~umask


def test_mismatched_hidden_size(tmp_path, model):
  heads = random_heads(model, HeadsConfig(2, 1, True))
  write(str(tmp_path / "h"), heads, model, base_model="tiny", lm_head_copies=False)
  other = random_model(preset("smollm2-135m").__class__(**{**preset("tiny").__dict__, "hidden_size": 32}))
  with pytest.raises(MedusaError, match="hidden_size 64 but the base model has 32"):
    read(str(tmp_path / "h"), other)


def test_missing_and_corrupt(tmp_path, model):
  with pytest.raises(MedusaError, match="heads directory not found"):
    read(str(tmp_path / "nope"), model)
  d = tmp_path / "bad"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
  (d / WEIGHTS).write_bytes(os.urandom(64))
  with pytest.raises(MedusaError, match="cannot read"):
    read(str(d), model)


def test_missing_tensor(tmp_path, model):
  from safetensors.numpy import load_file, save_file

  heads = random_heads(model, HeadsConfig(2, 1, False))
  write(str(tmp_path / "h"), heads, model, base_model="tiny", lm_head_copies=False)
  tensors = load_file(str(tmp_path / "h" / WEIGHTS))
  del tensors["1.0.linear.bias"]
  save_file(tensors, str(tmp_path / "h" / WEIGHTS))
  with pytest.raises(MedusaError, match="missing the tensor '1.0.linear.bias'"):
    read(str(tmp_path / "h"), model)


def test_load_with_fewer_heads_cuts_the_default_tree(tmp_path):
  import medusa_jax

  base = random_model(preset("tiny"), seed=0)  # what random:tiny loads
  write(str(tmp_path / "h"), random_heads(base, HeadsConfig(2, 1, True)), base, base_model="random:tiny",
        lm_head_copies=False)
  engine = medusa_jax.load("random:tiny", heads=str(tmp_path / "h"))
  assert engine.tree.depth == 2 and engine.tree.size == 1 + 10 + 28
  assert engine.plan().mode == "medusa"
