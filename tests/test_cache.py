"""The persistent compilation cache: a second process reads the programs the first compiled
(counted by JAX's own cache-hit events) and gives the same tokens; the switch turns it off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT

SCRIPT = """
import json, jax.monitoring
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
jax.monitoring.register_event_duration_secs_listener(lambda name, *_, **__: events.append(name))
import medusa_jax
engine = medusa_jax.load("random:tiny", heads=None)
out = engine.generate_ids([[5, 6, 7, 8]], max_new_tokens=6, temperature=0.7)
print(json.dumps({"tokens": out.tokens.tolist(),
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(tmp_path, **env):
  env = {**os.environ, "MEDUSA_JAX_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu", **env}
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_the_compiled_programs(tmp_path):
  first = _run(tmp_path)
  assert first["misses"] > 0 and first["hits"] == 0
  assert os.listdir(tmp_path / "jax")
  second = _run(tmp_path)
  assert second["misses"] == 0 and second["hits"] == first["misses"]  # every program read from disk
  assert second["tokens"] == first["tokens"]


def test_the_switch_turns_it_off(tmp_path):
  off = _run(tmp_path, MEDUSA_JAX_COMPILATION_CACHE="0")
  assert off["misses"] == off["hits"] == 0 and not (tmp_path / "jax").exists()

