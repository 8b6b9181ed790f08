"""Bad input gives one clear line (MedusaError in the API, `error: ...` and exit 2 on the CLI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

import medusa_jax
from medusa_jax import GenerationConfig, MedusaError
from medusa_jax.decode.engine import Engine
from medusa_jax.model.config import preset
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.weights.specs import random_model


def test_unknown_preset():
  with pytest.raises(MedusaError, match="unknown model preset 'nope'"):
    medusa_jax.load("random:nope")


def test_missing_model_file(tmp_path):
  with pytest.raises(MedusaError, match="model file not found"):
    medusa_jax.load(str(tmp_path / "missing.gguf"))


def test_unknown_spec():
  with pytest.raises(MedusaError, match="unknown model 'no-such-model'"):
    medusa_jax.load("no-such-model")


def test_corrupt_gguf(tmp_path):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + os.urandom(64))
  with pytest.raises(MedusaError, match="not a readable GGUF file"):
    medusa_jax.load(str(bad))


def test_corrupt_safetensors(tmp_path):
  (tmp_path / "config.json").write_text(
      '{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,'
      ' "num_attention_heads": 2}')
  (tmp_path / "model.safetensors").write_bytes(os.urandom(100))
  with pytest.raises(MedusaError, match="cannot read"):
    medusa_jax.load(str(tmp_path))


def test_prompt_longer_than_cache():
  engine = Engine(random_model(preset("tiny")), ByteTokenizer(), max_cache_len=64)
  with pytest.raises(MedusaError, match="exceeds the cache length 64"):
    engine.generate_ids([[5] * 60], max_new_tokens=10)


def test_cli_prints_one_line_and_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "infer", "generate.py"), "--model", str(tmp_path / "x.gguf")],
      capture_output=True, text=True, timeout=300,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [f"error: model file not found: {tmp_path / 'x.gguf'}"]


def test_sampling_settings_out_of_range():
  engine = Engine(random_model(preset("tiny")), ByteTokenizer(), max_cache_len=64)
  for kwargs, message in [({"temperature": -1.0}, "temperature must be >= 0"),
                          ({"temperature": 0.7, "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                          ({"top_p": 2.0}, r"top_p must be in \(0, 1\]"),
                          ({"acceptance": "exact"}, "unknown acceptance 'exact'; use lossless or typical"),
                          ({"mode": "bogus"}, "unknown mode 'bogus'"),
                          ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
                          ({"temprature": 0.5}, "unknown generation setting 'temprature'")]:
    with pytest.raises(MedusaError, match=message):
      engine.generate_ids([[5, 6]], **{"max_new_tokens": 4, **kwargs})
  with pytest.raises(MedusaError, match="top_p must be in"):
    GenerationConfig(top_p=0.0)


def test_generation_config_and_keywords_give_the_same_generation():
  """A `GenerationConfig`, the same settings as keywords, and keywords overriding a config agree."""
  engine = Engine(random_model(preset("tiny")), ByteTokenizer(), max_cache_len=64)
  config = GenerationConfig(max_new_tokens=6, temperature=0.9, top_p=0.8, seed=3)
  a = engine.generate_ids([[5, 6, 7]], config)
  b = engine.generate_ids([[5, 6, 7]], max_new_tokens=6, temperature=0.9, top_p=0.8, seed=3)
  c = engine.generate_ids([[5, 6, 7]], GenerationConfig(max_new_tokens=6), temperature=0.9, top_p=0.8,
                          seed=3)
  for x in (b, c):
    np.testing.assert_array_equal(x.tokens, a.tokens)
    np.testing.assert_array_equal(x.num_tokens, a.num_tokens)
  other_seed = engine.generate_ids([[5, 6, 7]], config, seed=4)
  assert a.tokens.shape == (1, 6) and not np.array_equal(other_seed.tokens, a.tokens)


def test_atomic_dir_refuses_a_file_and_keeps_the_old_output_on_failure(tmp_path, monkeypatch):
  from medusa_jax.atomic import atomic_dir

  (tmp_path / "file").write_text("x")
  with pytest.raises(MedusaError, match="is a file; the output is a directory"):
    with atomic_dir(str(tmp_path / "file"), force=True):
      pass
  with pytest.raises(MedusaError, match="a parent of it is a file"):
    with atomic_dir(str(tmp_path / "file" / "out"), force=True):
      pass
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "old.txt").write_text("old")
  with pytest.raises(RuntimeError):
    with atomic_dir(str(tmp_path / "out"), force=True) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").close()
      raise RuntimeError("failed half way")
  assert sorted(os.listdir(tmp_path)) == ["file", "out"] and os.listdir(tmp_path / "out") == ["old.txt"]
  rename = os.rename

  def failing_rename(src, dst):  # the new output cannot be put in place (after the old one moved aside)
    if os.path.basename(src).startswith(".tmp-"):
      raise OSError("disk full")
    rename(src, dst)

  monkeypatch.setattr(os, "rename", failing_rename)
  with pytest.raises(OSError, match="disk full"):
    with atomic_dir(str(tmp_path / "out"), force=True) as tmp:
      open(os.path.join(tmp, "new.txt"), "w").close()
  assert sorted(os.listdir(tmp_path)) == ["file", "out"] and os.listdir(tmp_path / "out") == ["old.txt"]
  monkeypatch.setattr(os, "rename", rename)
  with atomic_dir(str(tmp_path / "out"), force=True) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").close()
  assert sorted(os.listdir(tmp_path)) == ["file", "out"] and os.listdir(tmp_path / "out") == ["new.txt"]


def _cli_error(script: str, argv: list[str], capsys) -> list[str]:
  """Runs a command-line tool's `main` in-process; returns its stderr lines, asserting exit status 2."""
  spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(ROOT, script))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    module.main(argv)
  assert exit_.value.code == 2
  return capsys.readouterr().err.strip().splitlines()


def test_cli_number_and_path_flags(tmp_path, capsys):
  """Bad numbers and output paths are refused before any model loads or any file is written."""
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"turns": ["Hi"]}\n')
  bench = ["--model", "random:tiny", "--prompts", str(prompts)]
  for flags, message in [(["--max-prompts", "0"], "--max-prompts must be at least 1, got 0"),
                         (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                         (["--plot", str(tmp_path / "no" / "x.png")], f"--plot {tmp_path / 'no' / 'x.png'}: no such directory"),
                         (["--plot", str(tmp_path / "x.txt")], f"--plot {tmp_path / 'x.txt'}: write a .png, .pdf or .svg file"),
                         (["--categories", "extract", "chat"], f"{prompts} has no prompts of categories chat, extract")]:
    assert _cli_error("infer/benchmark.py", bench + flags, capsys) == [f"error: {message}"]
  out = tmp_path / "d.json"
  distill = ["--model", "random:tiny", "--prompts", str(prompts), "--out", str(out)]
  assert _cli_error("train/distill.py", distill + ["--batch-size", "0"], capsys) == [
      "error: --batch-size must be at least 1, got 0"]
  out.write_text("[{")
  [line] = _cli_error("train/distill.py", distill, capsys)
  assert line.startswith(f"error: cannot resume from {out}: ")
  assert sorted(os.listdir(tmp_path)) == ["d.json", "p.jsonl"] and out.read_text() == "[{"
  from helpers import random_heads

  from medusa_jax.formats import medusa as medusa_format
  from medusa_jax.medusa.heads import HeadsConfig

  heads, base = tmp_path / "heads", random_model(preset("tiny"), seed=0)
  medusa_format.write(str(heads), random_heads(base, HeadsConfig(2, 1, True)), base,
                      base_model="random:tiny", lm_head_copies=False)
  [line] = _cli_error("infer/generate.py", ["--model", "random:tiny", "--heads", str(heads), "--tree", "[0,"], capsys)
  assert line.startswith("error: cannot parse the tree '[0,' as a JSON list of paths")


def test_serve_flags(capsys):
  """The server refuses conflicting or bad drafting flags before it loads anything."""
  assert _cli_error("infer/serve.py", ["--model", "random:tiny", "--draft-model", "self:1", "--heads", "default"],
                    capsys) == ["error: --draft-model drafts instead of heads: leave out --heads (or pass --heads none)"]
  assert _cli_error("infer/serve.py", ["--model", "random:tiny", "--draft-model", "self:1", "--draft-tokens", "0"],
                    capsys) == ["error: --draft-tokens must be at least 1, got 0"]
  assert _cli_error("infer/serve.py", ["--model", "random:tiny", "--draft-model", "self:9"],
                    capsys) == ["error: self:9: L must be in 1..2, the model's layers"]
