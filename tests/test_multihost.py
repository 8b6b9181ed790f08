"""Multi-host training through jax.distributed: two local processes with 4 simulated CPU devices
each reproduce one process with 8 devices on `configs/tiny.yaml`, and a run killed after a
checkpoint resumes to the same losses. The processes are started by the test itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT

TINY = os.path.join(ROOT, "configs", "tiny.yaml")
DATA = os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json")
COMMON = [f"data={DATA}", "max_steps=8", "log_every=2", "eval_every=4", "save_every=4",
          "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _launch(out, *extra: str, processes: int = 2) -> list[subprocess.Popen]:
  port = _port()
  return [subprocess.Popen([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY,
                            f"output_dir={out}", *COMMON, *extra, "--coordinator", f"127.0.0.1:{port}",
                            "--num-processes", str(processes), "--process-id", str(i)],
                           env=_env(8 // processes), stdout=subprocess.DEVNULL,
                           stderr=open(f"{out}.{i}.log", "w"))
          for i in range(processes)]


def _wait(procs, timeout=600):
  for p in procs:
    assert p.wait(timeout=timeout) == 0


def _losses(out) -> dict:
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return {(r["split"], r["step"]): r["loss"] for r in map(json.loads, f)}  # the last of each


def _one_process(out, *extra: str) -> dict:
  subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY, f"output_dir={out}",
                  *COMMON, *extra], env=_env(8), check=True, timeout=600, capture_output=True)
  return _losses(out)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  return _one_process(tmp_path_factory.mktemp("one") / "run")


@pytest.mark.parametrize("extra", [[], ["cache_hidden=true", "cache.dir={tmp}/cache"]])
def test_two_processes_reproduce_one(tmp_path, extra):
  """The losses of one process on 8 devices; with the hidden-state cache each process keeps its
  own (`cache.dir/process-{i}`)."""
  extra = [e.format(tmp=tmp_path) for e in extra]
  one = _one_process(tmp_path / "one", *extra)
  out = tmp_path / "two"
  _wait(_launch(out, *extra))
  two = _losses(out)
  assert two.keys() == one.keys() and len(two) == 6
  for key in two:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=str(key))
  assert (out / "heads" / "config.json").exists()  # written once, by process 0
  if extra:  # beside the one-process run's own cache
    for i in range(2):
      assert [n[:10] for n in os.listdir(tmp_path / "cache" / f"process-{i}")] == ["positions-"]


def test_killed_two_process_run_resumes_to_the_same_losses(tmp_path, one_process):
  out = tmp_path / "killed"
  procs = _launch(out)
  deadline = time.time() + 600
  while not (out / "checkpoints" / "4").is_dir():  # orbax renames a checkpoint into place when whole
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  for p in procs:
    p.send_signal(signal.SIGKILL)
    p.wait()
  _wait(_launch(out))
  resumed = _losses(out)
  for key in [("train", 6), ("train", 8), ("eval", 8)]:
    np.testing.assert_allclose(resumed[key], one_process[key], rtol=1e-5, err_msg=str(key))


def test_process_flags_go_together():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "train_heads.py"), TINY,
                         "--num-processes", "2"], capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: --coordinator, --num-processes and --process-id go together"
