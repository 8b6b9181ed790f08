"""Sharding rules, declared once: logical axis names -> axes of a (data, fsdp, tensor) mesh.

Every parameter carries logical axis names in its `axes` metadata (e.g. `("embed", "mlp")`);
activations and batches use the same names. `LOGICAL_AXIS_RULES` maps each name to mesh axes.
A dimension that a mesh axis does not divide evenly is replicated instead, so one code path runs
on 1 CPU, 8 simulated CPU devices, one GPU or a pod.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medusa_jax.errors import MedusaError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "seq": (),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "vocab": ("tensor",),
    "medusa_heads": (),
}


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "tensor"); their product must equal the device count."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = (int(data), int(fsdp), int(tensor))
  if min(sizes) < 1:
    raise MedusaError(f"mesh sizes must be >= 1, got data={data} fsdp={fsdp} tensor={tensor}")
  if math.prod(sizes) != len(devices):
    raise MedusaError(
        f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {math.prod(sizes)} devices, "
        f"but {len(devices)} are available"
    )
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def parse_mesh(text: str, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh from `"data=2,tensor=4"` (the training config's `mesh.*` keys; missing axes are 1)."""
  sizes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, eq, value = part.partition("=")
    if not eq or name.strip() not in MESH_AXES or not value.strip().isdigit():
      raise MedusaError(f"a mesh is AXIS=N[,AXIS=N] with axes {', '.join(MESH_AXES)} "
                        f"(e.g. data=2,tensor=4); got {text!r}")
    sizes[name.strip()] = int(value)
  return make_mesh(devices=devices, **sizes)


def check_model_fits(config, mesh: Mesh) -> None:
  """A one-line error unless the mesh's tensor axis divides the attention heads, kv heads, MLP
  width and vocabulary of `config` (a `ModelConfig`) and its fsdp axis the hidden size: what
  tensor-parallel inference splits."""
  t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
  for name, dim, n, axis in (("attention heads", config.num_heads, t, "tensor"),
                             ("kv heads", config.num_kv_heads, t, "tensor"),
                             ("MLP width", config.intermediate_size, t, "tensor"),
                             ("vocabulary", config.vocab_size, t, "tensor"),
                             ("hidden size", config.hidden_size, f, "fsdp")):
    if dim % n:
      raise MedusaError(f"mesh {axis}={n} does not divide the model's {dim} {name}")


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Maps logical axis names of an array of `shape` to a PartitionSpec on `mesh`.

  A mesh axis is used at most once per array, and only where it divides the dimension.
  """
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = []
    size = 1
    for ax in LOGICAL_AXIS_RULES.get(name, ()) if name else ():
      n = mesh.shape[ax]
      if ax in used or n == 1 or dim % (size * n):
        continue
      mesh_axes.append(ax)
      size *= n
    used.update(mesh_axes)
    spec.append(tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
  return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
  """NamedShardings for every variable of an nnx State, from each variable's `axes` metadata."""

  def one(var):
    axes = var.get_metadata().get("axes") or (None,) * np.ndim(var.get_value())
    return var.replace(named_sharding(axes, np.shape(var.get_value()), mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh) -> nnx.State:
  """Places an nnx State on `mesh` following the logical axis rules."""
  return jax.device_put(state, state_shardings(state, mesh))


def committed_shardings(tree: Any, mesh: Mesh) -> Any:
  """Each leaf's NamedSharding on `mesh`, replicated for leaves that have none yet (e.g. optimizer
  step counters), so a jitted step can return its state exactly as it received it."""

  def one(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return sharding
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a `[batch, ...]` input: batch over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
