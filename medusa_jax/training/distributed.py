"""Multi-host training on JAX's multi-controller runtime: every process runs the same command on
its own devices, `jax.distributed` joins them into one set of global devices, and the mesh spans
them all.

- `initialize`: joins the processes (flags, or auto-detected on TPU pods and SLURM); on CPUs it
  turns on JAX's own CPU collectives (gloo), so simulated multi-host runs work on one machine.
- `global_batch`: each process puts only its rows of a global batch on its own devices
  (`jax.make_array_from_process_local_data`): the rows its devices hold under the batch sharding.
- `to_host`: a replicated global array's value on any process; `local_copy`: a sharded one's on
  this process's device (the hidden-state cache runs the frozen backbone per process);
  `is_main`: the one process that writes metrics, run files and exported heads.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from medusa_jax.errors import MedusaError
from medusa_jax.model.sharding import batch_sharding


def _cluster_detected() -> bool:
  """A multi-process launch that `jax.distributed.initialize()` detects by itself."""
  env = os.environ
  slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
  tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env
  return slurm or tpu_pod


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to a multi-process run: with all three of `coordinator` ("HOST:PORT" of
  process 0), `num_processes` and `process_id`, or none of them on a TPU pod or under SLURM
  (detected); otherwise nothing happens (one process). Call before anything touches a device."""
  given = [x is not None for x in (coordinator, num_processes, process_id)]
  if any(given) and not all(given):
    raise MedusaError("--coordinator, --num-processes and --process-id go together")
  if not any(given) and not _cluster_detected():
    return
  if all(given) and not 0 <= process_id < num_processes:
    raise MedusaError(f"--process-id must be in [0, {num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
  try:
    jax.distributed.initialize(coordinator, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    raise MedusaError(f"could not join the multi-process run: {str(e).splitlines()[0]}") from None


def is_main() -> bool:
  return jax.process_index() == 0


def _local_rows(sharding, shape) -> slice:
  """The rows of a `[rows, ...]` array under `sharding` that this process's devices hold."""
  spans = {(s[0].start or 0, shape[0] if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map(tuple(shape)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise MedusaError("this process's batch rows are not contiguous: order the mesh's devices by process")
  return slice(start, stop)


def global_batch(host, mesh: Mesh):
  """A host batch (NumPy leaves `[rows, ...]`, the same on every process) as global arrays with
  rows split over the mesh's data x fsdp axes; each process transfers only its own rows."""

  def one(v):
    v = np.asarray(v)
    sharding = batch_sharding(mesh, v.ndim)
    return jax.make_array_from_process_local_data(sharding, v[_local_rows(sharding, v.shape)], v.shape)

  return jax.tree.map(one, host)


def local_copy(tree):
  """A copy of global arrays (sharded over every process's devices) on this process's first
  device (a collective: every process calls it)."""
  from jax.experimental import multihost_utils

  return jax.device_put(multihost_utils.process_allgather(tree, tiled=True), jax.local_devices()[0])


def to_host(tree):
  """NumPy values of replicated arrays (every process holds all of each)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)
