"""infer/bench_step.py (`medusa_jax.cli.bench_step`) and `step_timing.bytes_per_step`: the bytes a decode step must read, counted by hand, and the CLI's table."""

from __future__ import annotations

import json

import pytest
from flax import nnx

from medusa_jax.cli import bench_step
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
from medusa_jax.model.config import preset
from medusa_jax.tuning.step_timing import bytes_per_step
from medusa_jax.weights.specs import random_model


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m"])  # untied / tied embeddings
def test_bytes_per_step_by_hand(name):
  c = preset(name)
  e, v, q, kv = c.hidden_size, c.vocab_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = e * q + 2 * e * kv + q * e + 3 * e * c.intermediate_size + 2 * e  # q, k, v, o, MLP, 2 norms
  table = 0 if c.tie_embeddings else 3 * e  # untied: the 3 rows looked up; tied: read as the lm_head
  weights = c.num_layers * layer + e + table + v * e                         # + final norm, lm_head
  blocks = 4 * (e * e + e)                                                   # 4 heads x 1 ResBlock
  kv_cache = 2 * c.num_layers * 3 * 100 * kv                                 # batch 3, 100 cached tokens
  model = random_model(c)
  heads = MedusaHeads.for_model(model, HeadsConfig(4, 1, share_lm_head=True))
  state, heads_state = nnx.state(model), nnx.state(heads)
  assert bytes_per_step(state, None, c, batch=3, context=100, cache_itemsize=4) == 4 * (weights + kv_cache)
  assert bytes_per_step(state, heads_state, c, batch=3, context=100, cache_itemsize=2) == (
      4 * (weights + blocks) + 2 * kv_cache)


def test_bench_step_cli(capsys):
  bench_step.main(["--model", "random:tiny", "--dtype", "float32", "--trees", "0", "4", "chain2",
                   "--batch", "1", "2", "--context", "60", "--repeats", "2", "--peak-gbps", "10", "--json"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["batch"], r["tree"], r["tokens_per_row"]) for r in rows] == [
      (b, t, n) for b in (1, 2) for t, n in (("0", 1), ("4", 5), ("chain2", 3))]
  for r in rows:
    assert r["ms_per_step"] > 0 and r["floor_ms"] == pytest.approx(r["gb_read"] / 10 * 1e3, rel=1e-3, abs=1e-3)
    assert r["percent_of_floor"] == pytest.approx(100 * r["floor_ms"] / r["ms_per_step"], rel=0.01, abs=0.1)
  assert [r["cost_vs_plain"] for r in rows if r["tree"] == "0"] == [1.0, 1.0]


def test_bench_step_bad_flags(capsys):
  for flags, message in [(["--batch", "0"], "--batch sizes must be at least 1, got 0"),
                         (["--repeats", "0"], "--repeats must be at least 1, got 0"),
                         (["--trees", "99"], "--trees N takes at most the 63 paths of mc_sim_7b_63"),
                         (["--trees", "nope"], "unknown tree 'nope'")]:
    with pytest.raises(SystemExit) as exit_:
      bench_step.main(["--model", "random:tiny", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[0].startswith(f"error: {message}")


def test_bench_step_defaults_run(capsys):
  bench_step.main(["--model", "random:tiny", "--dtype", "float32", "--repeats", "1", "--context", "30", "--json"])
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["tokens_per_row"] for r in rows] == [1, 5, 17, 64]
