"""infer/benchmark.py end to end on a tiny random model with random heads (multi-turn, categories)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, write_tiny_eagle, write_tiny_heads

from medusa_jax.medusa.tree import get_tree


def test_benchmark_cli(tmp_path):
  """Also an EAGLE drafter beside the heads in the same run (`medusa:heads=DIR`)."""
  write_tiny_heads(tmp_path / "heads")
  write_tiny_eagle(tmp_path / "eagle")
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"turns": ["hello there", "and again"], "category": "chat"}\n'
                     '{"turns": ["what is two plus two"], "category": "math"}\n'
                     '{"turns": ["name a colour"], "category": "math"}\n')
  out = tmp_path / "r.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer", "benchmark.py"), "--prompts",
                         str(prompts), "--model", "random:tiny", "--heads", str(tmp_path / "heads"),
                         "--tree", "chain3", "--max-new-tokens", "12", "--batch-size", "2",
                         "--modes", "medusa", "lookup", "hybrid", "hybrid:min_ngram=2",
                         f"medusa:heads={tmp_path / 'eagle'},tree_budget=5", "--lookup", "3",
                         "--out", str(out), "--plot", str(tmp_path / "p.png")],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  r = json.loads(out.read_text())
  assert set(r["categories"]) == {"chat", "math"}
  for s in [r["overall"], *r["categories"].values()]:
    assert set(s) >= {"mean_accepted_tokens", "baseline_tokens_per_second",
                      "medusa_tokens_per_second", "speedup", "identical_fraction"}
  assert r["overall"]["identical_fraction"] == 1.0  # greedy Medusa is lossless
  o = r["overall"]  # speedup = tokens per step / (Medusa step time / baseline step time)
  assert o["speedup"] == pytest.approx(o["mean_accepted_tokens"] / o["step_cost_ratio"], rel=1e-9)
  assert len(r["prompts"]) == 4 and (tmp_path / "p.png").stat().st_size > 0
  assert "overall" in proc.stdout
  eagle = f"medusa:heads={tmp_path / 'eagle'},tree_budget=5"
  assert set(r["modes"]) == {"medusa", "lookup", "hybrid", "hybrid:min_ngram=2", eagle}
  assert r["modes"]["medusa"]["overall"] == o
  assert r["modes"][eagle]["overall"]["identical_fraction"] == 1.0
  for m in r["modes"].values():  # every drafter is lossless under greedy decoding
    assert m["overall"]["identical_fraction"] == 1.0
  assert "[hybrid]" in proc.stdout


def _accuracy_run(tmp_path, num_heads: int, *flags: str) -> tuple[dict, dict]:
  """Runs the benchmark CLI with --heads-accuracy on random:tiny with random heads; returns (the
  --out JSON, the --save-tree JSON)."""
  write_tiny_heads(tmp_path / "heads", num_heads)
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"turns": ["hello there"], "category": "chat"}\n'
                     '{"turns": ["left out by --categories"], "category": "other"}\n')
  out, tree_file = tmp_path / "r.json", tmp_path / "tree.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer", "benchmark.py"), "--prompts",
                         str(prompts), "--categories", "chat", "--model", "random:tiny", "--heads", str(tmp_path / "heads"),
                         "--heads-accuracy", "--save-tree", str(tree_file), "--out", str(out), *flags],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  return json.loads(out.read_text()), json.loads(tree_file.read_text())


def test_benchmark_heads_accuracy_builds_and_saves_a_tree(tmp_path):
  r, saved = _accuracy_run(tmp_path, 3, "--max-new-tokens", "16", "--topk", "4", "--tree-nodes", "6")
  acc = r["heads_accuracy"]
  # one prompt (`--categories chat`), 16 tokens
  assert len(acc["per_rank"]) == 3 and len(acc["per_rank"][0]) == 4 and acc["positions"] == 15
  expected = [acc["expected_tokens_per_step"][str(n)] for n in (1, 2, 4, 6, 8)]
  assert expected[0] >= 1 and expected == sorted(expected)  # a bigger best tree never predicts less
  assert saved["paths"] == r["tree"] and len(r["tree"]) == 6 and r["tree_size"] == 7
  assert r["overall"]["identical_fraction"] == 1.0
  assert get_tree(str(tmp_path / "tree.json"), num_heads=3).paths == tuple(tuple(p) for p in saved["paths"])


def test_benchmark_tree_nodes_auto_picks_the_best_predicted_size(tmp_path):
  r, saved = _accuracy_run(tmp_path, 2, "--max-new-tokens", "8", "--topk", "3", "--tree-nodes", "auto",
                           "--accuracy-only")
  acc = r["heads_accuracy"]
  tuning = acc["tree_tuning"]
  # 2 heads, ranks below 3: 12 possible paths; sizes timed smallest first until none larger can win
  assert list(acc["expected_tokens_per_step"]) == ["1", "2", "4", "8", "12"]
  assert list(tuning) == list(acc["expected_tokens_per_step"])[: len(tuning)]
  for n, t in tuning.items():
    assert t["step_cost_ratio"] > 0
    assert t["predicted_speedup"] == pytest.approx(acc["expected_tokens_per_step"][n] / t["step_cost_ratio"], rel=1e-3)
  best = max(tuning, key=lambda n: tuning[n]["predicted_speedup"])
  assert len(saved["paths"]) == int(best)


def test_benchmark_bad_flags_one_line(tmp_path):
  for flags, message in [(["--tree-nodes", "3"], "--tree-nodes and --accuracy-only need --heads-accuracy"),
                         (["--heads-accuracy", "--topk", "0"], "--topk and --tree-nodes must be at least 1"),
                         (["--heads-accuracy", "--tree-nodes", "many"],
                          "--tree-nodes takes a number of nodes or 'auto', got 'many'")]:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "infer", "benchmark.py"), "--prompts",
                           str(tmp_path / "p.jsonl"), *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr
