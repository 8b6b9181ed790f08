"""Medusa-1 with a frozen backbone: its hidden states never change, so they are computed once per
run (`cache.hidden`) and, with `cache.dir`, kept per conversation for later runs on the same model
(head sweeps; data that grew computes only its new rows). A step then draws labelled positions
(`PositionBatch`) instead of running the backbone."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.atomic import atomic_file
from medusa_jax.errors import MedusaError
from medusa_jax.medusa.heads import head_targets
from medusa_jax.training.batches import PositionBatch, concat
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.targets import (
  backbone_hidden,
  position_targets,
  soft_head_targets,
  teacher_distribution,
)

CACHED_HEADS = 8  # a stored cache serves every head count up to this (see `stored_positions`)


def _row_positions(base_graphdef, base_state, tokens: np.ndarray, mask: np.ndarray, num_heads: int,
                   batch_size: int, progress: bool = False) -> list[PositionBatch]:
  """Per row of `tokens`: a NumPy `PositionBatch` of the positions of that row that some head has
  a target at."""
  from tqdm import tqdm

  fwd = jax.jit(lambda s, t, m: position_targets(backbone_hidden(nnx.merge(base_graphdef, s), t), t, m,
                                                 num_heads))
  # Causality: positions past a row's last assistant token change nothing before it, so rows
  # (sorted by that length) run trimmed to a multiple of 64 columns, not padded to seq_len.
  ends = np.asarray([int(np.nonzero(m)[0].max()) + 1 if m.any() else 0 for m in mask])
  order = np.argsort(ends, kind="stable")
  out: list = [None] * len(tokens)
  for i in tqdm(range(0, len(order), batch_size), desc="hidden states", unit="batch",
                disable=not progress):
    rows = order[i: i + batch_size]
    width = min(tokens.shape[1], -(-int(ends[rows].max()) // 64) * 64)
    p = jax.device_get(fwd(base_state, jnp.asarray(tokens[rows, :width]), jnp.asarray(mask[rows, :width])))
    p = jax.tree.map(lambda v: v.reshape((len(rows), width) + v.shape[1:]), p)
    for j, row in enumerate(rows):
      keep = p.valid[j].any(-1)
      out[row] = jax.tree.map(lambda v: v[j][keep], p)
  return out


def cache_positions(base_graphdef, base_state, tokens: np.ndarray, mask: np.ndarray, num_heads: int,
                    batch_size: int, progress: bool = False) -> PositionBatch:
  """The NumPy `PositionBatch` of the `n` positions of `tokens` / `mask` `[rows, seq]` that some
  head has a target at, row by row (prompt and padding positions are dropped)."""
  return concat(_row_positions(base_graphdef, base_state, tokens, mask, num_heads, batch_size,
                               progress))


def stored_positions(cfg: TrainConfig, base_graphdef, base_state, tokens: np.ndarray,
                     mask: np.ndarray, progress: bool = False) -> PositionBatch:
  """`cache_positions`, kept in `cfg.cache.dir` (when set) row by row, under a fingerprint of the
  model spec and compute dtype and of each row's tokens: later runs on the same rows (head sweeps)
  reuse them, and a run on grown data computes only the new rows. The store keeps targets for
  `CACHED_HEADS` heads (or more when asked), so runs with fewer heads share it: each takes its
  first `num_heads` columns and the positions some head of its own has a target at."""
  num_heads = cfg.heads.num_heads
  if not cfg.cache.dir:
    return cache_positions(base_graphdef, base_state, tokens, mask, num_heads, cfg.data.batch_size,
                           progress)
  heads = max(num_heads, CACHED_HEADS)
  model_key = hashlib.sha256("\0".join((cfg.model.spec, cfg.model.compute_dtype, str(heads),
                                         "next_tokens")).encode())
  folder = os.path.join(cfg.cache.dir, f"positions-{model_key.hexdigest()[:16]}")
  keys = [hashlib.sha256(np.ascontiguousarray(t).tobytes() + np.ascontiguousarray(m).tobytes())
          .hexdigest()[:32] for t, m in zip(tokens, mask)]
  stored = {}  # row key -> its positions
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    if not name.endswith(".npz") or ".tmp" in name:  # skip a killed run's partial write
      continue
    with np.load(os.path.join(folder, name)) as shard:
      arrays = PositionBatch(shard["hidden"], shard["next_tokens"], shard["targets"], shard["valid"])
      ends = np.cumsum(shard["counts"])
      for key, start, end in zip(shard["keys"].tolist(), ends - shard["counts"], ends):
        stored[key] = jax.tree.map(lambda v: v[start:end], arrays)  # views, not copies
  missing = list({key: i for i, key in enumerate(keys) if key not in stored}.values())
  if missing:
    new = _row_positions(base_graphdef, base_state, tokens[missing], mask[missing], heads,
                         cfg.data.batch_size, progress)
    shard_keys = [keys[i] for i in missing]
    joined = concat(new)
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256("".join(shard_keys).encode()).hexdigest()[:16]
    with atomic_file(os.path.join(folder, f"{name}.npz")) as tmp:
      np.savez(tmp, keys=np.asarray(shard_keys), counts=np.asarray([len(p.hidden) for p in new]),
               hidden=joined.hidden, next_tokens=joined.next_tokens, targets=joined.targets,
               valid=joined.valid)
    stored.update(zip(shard_keys, new))
  positions = concat([stored[key] for key in keys])
  keep = positions.valid[:, :num_heads].any(-1)  # row order is kept, as `cache_positions` has it
  return PositionBatch(positions.hidden[keep], positions.next_tokens[keep],
                       positions.targets[keep, :num_heads], positions.valid[keep, :num_heads])


def with_soft_targets(cfg: TrainConfig, base_graphdef, base_state, draft_ids, tokens: np.ndarray,
                      mask: np.ndarray, positions: PositionBatch,
                      rows_per_chunk: int = 256) -> PositionBatch:
  """`positions` (`cache_positions` of `tokens`/`mask`) with the teacher's targets
  (`soft_ids`, `soft_probs` `[n, num_heads, teacher_top_k]`). The teacher runs on the cached hidden
  states; a head's teacher position that is not cached (the one before an answer's last token)
  falls back to the hard target."""
  num_heads, top_k = cfg.heads.num_heads, cfg.heads.teacher_top_k
  teacher = jax.jit(lambda s, h: teacher_distribution(nnx.merge(base_graphdef, s), h, draft_ids, top_k))
  hidden = positions.hidden
  if not len(hidden):
    shape = (0, num_heads, top_k)
    return dataclasses.replace(positions, soft_ids=np.zeros(shape, np.int32),
                               soft_probs=np.zeros(shape, np.float32))
  chunk = cfg.optim.vocab_chunk  # positions per vocab projection, as in the loss; fixed size: one compilation
  chunks = [jax.device_get(teacher(base_state, jnp.asarray(
      np.resize(hidden[i: i + chunk], (chunk, hidden.shape[1])))))
      for i in range(0, len(hidden), chunk)]
  ids, probs = (np.concatenate(part)[: len(hidden)] for part in zip(*chunks))
  done, out_ids, out_probs = 0, [], []
  for i in range(0, len(tokens), rows_per_chunk):
    t, m = tokens[i: i + rows_per_chunk], mask[i: i + rows_per_chunk]
    targets, valid = (np.asarray(x) for x in head_targets(t, m, num_heads))
    kept = valid.any(-1)  # the rows' cached positions, in cache order (as `_row_positions` keeps them)
    n = int(kept.sum())
    seq_ids = np.zeros(t.shape + ids.shape[1:], ids.dtype)
    seq_probs = np.zeros(t.shape + probs.shape[1:], probs.dtype)
    seq_ids[kept], seq_probs[kept] = ids[done: done + n], probs[done: done + n]
    soft = soft_head_targets(seq_ids, seq_probs, kept, targets)
    out_ids.append(np.asarray(soft[0])[kept])
    out_probs.append(np.asarray(soft[1])[kept])
    done += n
  if done != len(hidden):
    raise MedusaError(f"cached positions ({len(hidden)}) do not match the data ({done}): "
                      f"clear {cfg.cache.dir}")
  return dataclasses.replace(positions, soft_ids=np.concatenate(out_ids),
                             soft_probs=np.concatenate(out_probs))
