"""The head-training loop: data, mesh placement, jitted steps, orbax checkpoints, metrics.jsonl.

Resuming: the latest checkpoint under `output_dir/checkpoints` restores the heads, the optimizer
state and the step; the data order is a pure function of (seed, step), so the run continues
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medusa_jax import draft_vocab
from medusa_jax.data import load_conversations, pack_examples, split, tokenize_with_labels
from medusa_jax.errors import MedusaError
from medusa_jax.heads import HeadsConfig, MedusaHeads
from medusa_jax.llama import Llama
from medusa_jax.sharding import batch_sharding, committed_shardings, make_mesh, shard_state
from medusa_jax.train_config import TrainConfig
from medusa_jax.training import (backbone_hidden, head_targets, make_optimizer, make_train_step,
                                 position_targets, soft_head_targets, summarize,
                                 teacher_distribution)

CACHED_HEADS = 8  # a hidden-state cache serves every head count up to this (see `_stored_positions`)


def prepare_data(cfg: TrainConfig, tokenizer, pad_id: int):
  """(train tokens, train mask, eval tokens, eval mask), fixed shape `[n, seq_len]`."""
  if not cfg.data:
    raise MedusaError("no training data: set data=FILE")
  convs = [c for path in cfg.data for c in load_conversations(path)]
  convs = [c for c in convs if any(m["role"] == "assistant" for m in c.messages)]
  if not convs:
    raise MedusaError("the training data holds no assistant answers")
  train, held = split(convs, cfg.eval_fraction, cfg.seed)
  tr = pack_examples((tokenize_with_labels(tokenizer, c.messages) for c in train), cfg.seq_len, pad_id)
  ev = (pack_examples((tokenize_with_labels(tokenizer, c.messages) for c in held), cfg.seq_len, pad_id)
        if held else tr)
  return tr[0], tr[1], ev[0], ev[1]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of the batch at `step`: epoch-wise seeded permutations, a pure function of the step."""
  per_epoch = max(1, n // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[np.arange(i * batch_size, (i + 1) * batch_size) % n]


def _row_positions(base_graphdef, base_state, tokens: np.ndarray, mask: np.ndarray, num_heads: int,
                   batch_size: int, progress: bool = False) -> list[dict]:
  """Per row of `tokens`: NumPy {"hidden" `[n, embed]`, "targets", "valid" `[n, num_heads]`} for
  the `n` positions of that row that some head has a target at."""
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
    p = {k: v.reshape((len(rows), width) + v.shape[1:]) for k, v in p.items()}
    for j, row in enumerate(rows):
      keep = p["valid"][j].any(-1)
      out[row] = {k: v[j][keep] for k, v in p.items()}
  return out


def _concat(parts: list[dict]) -> dict:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def cache_positions(base_graphdef, base_state, tokens: np.ndarray, mask: np.ndarray, num_heads: int,
                    batch_size: int, progress: bool = False) -> dict:
  """Medusa-1 with a frozen backbone: its hidden states never change, so they are computed once.
  Returns NumPy {"hidden" `[n, embed]`, "targets", "valid" `[n, num_heads]`} for the `n` positions
  that some head has a target at, row by row (prompt and padding positions are dropped)."""
  return _concat(_row_positions(base_graphdef, base_state, tokens, mask, num_heads, batch_size,
                                progress))


def _stored_positions(cfg: TrainConfig, base_graphdef, base_state, tokens: np.ndarray,
                      mask: np.ndarray, progress: bool = False) -> dict:
  """`cache_positions`, kept in `cfg.hidden_cache_dir` (when set) row by row, under a fingerprint
  of the model spec and compute dtype and of each row's tokens: later runs on the same rows (head
  sweeps) reuse them, and a run on grown data computes only the new rows. The store keeps targets
  for `CACHED_HEADS` heads (or more when asked), so runs with fewer heads share it: each takes its
  first `num_heads` columns and the positions some head of its own has a target at."""
  if not cfg.hidden_cache_dir:
    return cache_positions(base_graphdef, base_state, tokens, mask, cfg.num_heads, cfg.batch_size,
                           progress)
  heads = max(cfg.num_heads, CACHED_HEADS)
  model_key = hashlib.sha256("\0".join((cfg.model, cfg.compute_dtype, str(heads))).encode())
  folder = os.path.join(cfg.hidden_cache_dir, f"positions-{model_key.hexdigest()[:16]}")
  keys = [hashlib.sha256(np.ascontiguousarray(t).tobytes() + np.ascontiguousarray(m).tobytes())
          .hexdigest()[:32] for t, m in zip(tokens, mask)]
  stored = {}  # row key -> its positions
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    if not name.endswith(".npz") or name.endswith(".tmp.npz"):  # skip a killed run's partial write
      continue
    with np.load(os.path.join(folder, name)) as shard:
      arrays = {k: shard[k] for k in ("hidden", "targets", "valid")}
      ends = np.cumsum(shard["counts"])
      for key, start, end in zip(shard["keys"].tolist(), ends - shard["counts"], ends):
        stored[key] = {k: v[start:end] for k, v in arrays.items()}  # views, not copies
  missing = list({key: i for i, key in enumerate(keys) if key not in stored}.values())
  if missing:
    new = _row_positions(base_graphdef, base_state, tokens[missing], mask[missing], heads,
                         cfg.batch_size, progress)
    shard = {"keys": np.asarray([keys[i] for i in missing]),
             "counts": np.asarray([len(p["hidden"]) for p in new])} | _concat(new)
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256("".join(shard["keys"].tolist()).encode()).hexdigest()[:16]
    tmp = os.path.join(folder, f"{name}.tmp.npz")
    np.savez(tmp, **shard)
    os.replace(tmp, os.path.join(folder, f"{name}.npz"))
    stored.update(zip(shard["keys"].tolist(), new))
  positions = _concat([stored[key] for key in keys])
  keep = positions["valid"][:, : cfg.num_heads].any(-1)  # row order is kept, as `cache_positions` has it
  return {"hidden": positions["hidden"][keep], "targets": positions["targets"][keep, : cfg.num_heads],
          "valid": positions["valid"][keep, : cfg.num_heads]}


def _cached_soft_targets(cfg: TrainConfig, base_graphdef, base_state, draft_ids, tokens: np.ndarray,
                         mask: np.ndarray, positions: dict, rows_per_chunk: int = 256) -> dict:
  """Teacher targets for cached positions (`cache_positions` of `tokens`/`mask`): {"soft_ids",
  "soft_probs" `[n, num_heads, teacher_top_k]`}. The teacher runs on the cached hidden states; a
  head's teacher position that is not cached (the one before an answer's last token) falls back to
  the hard target."""
  teacher = jax.jit(lambda s, h: teacher_distribution(nnx.merge(base_graphdef, s), h, draft_ids,
                                                      cfg.teacher_top_k))
  hidden = positions["hidden"]
  if not len(hidden):
    shape = (0, cfg.num_heads, cfg.teacher_top_k)
    return {"soft_ids": np.zeros(shape, np.int32), "soft_probs": np.zeros(shape, np.float32)}
  chunk = cfg.vocab_chunk  # positions per vocab projection, as in the loss; fixed size: one compilation
  chunks = [jax.device_get(teacher(base_state, jnp.asarray(
      np.resize(hidden[i: i + chunk], (chunk, hidden.shape[1])))))
      for i in range(0, len(hidden), chunk)]
  ids, probs = (np.concatenate(part)[: len(hidden)] for part in zip(*chunks))
  done, out = 0, {"soft_ids": [], "soft_probs": []}
  for i in range(0, len(tokens), rows_per_chunk):
    t, m = tokens[i: i + rows_per_chunk], mask[i: i + rows_per_chunk]
    targets, valid = (np.asarray(x) for x in head_targets(t, m, cfg.num_heads))
    kept = valid.any(-1)  # the rows' cached positions, in cache order (as `_row_positions` keeps them)
    n = int(kept.sum())
    seq_ids = np.zeros(t.shape + ids.shape[1:], ids.dtype)
    seq_probs = np.zeros(t.shape + probs.shape[1:], probs.dtype)
    seq_ids[kept], seq_probs[kept] = ids[done: done + n], probs[done: done + n]
    soft = soft_head_targets(seq_ids, seq_probs, kept, targets)
    out["soft_ids"].append(np.asarray(soft[0])[kept])
    out["soft_probs"].append(np.asarray(soft[1])[kept])
    done += n
  if done != len(hidden):
    raise MedusaError(f"cached positions ({len(hidden)}) do not match the data ({done}): "
                      f"clear {cfg.hidden_cache_dir}")
  return {k: np.concatenate(v) for k, v in out.items()}


def _checkpoint_manager(cfg: TrainConfig):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(cfg.output_dir, "checkpoints")),
                               options=options)


PARAM_SHAPES = "param_shapes.json"  # beside train_config.json: what the checkpoints hold


def _shapes(params) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(k): list(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _restore(cfg: TrainConfig, manager, step: int, target: dict) -> dict:
  """The checkpoint at `step` restored into `target` (`{"params", "opt_state"}`); a one-line error
  when the run was made for other shapes (another base model, head count or method)."""
  import orbax.checkpoint as ocp

  try:
    with open(os.path.join(cfg.output_dir, PARAM_SHAPES)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    saved = None  # runs from before the file existed: orbax checks the shapes
  want = _shapes(target["params"])
  if isinstance(saved, dict) and saved != want:
    name = next((k for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)))
    raise MedusaError(f"the checkpoints under {cfg.output_dir} do not fit this base model and config: "
                      f"params{name} is {saved.get(name, 'absent')} there, {want.get(name, 'absent')} here")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]


def _trained_params(cfg: TrainConfig, heads_state, base_state) -> dict:
  """The parameters the optimizer updates: `{"heads"}`, plus `"backbone"` with Medusa-2."""
  params = {"heads": nnx.to_pure_dict(heads_state)}
  if cfg.method == "medusa2":
    params["backbone"] = nnx.to_pure_dict(base_state)
  return params


@dataclasses.dataclass
class TrainSetup:
  """A run's model, state and jitted functions, placed on its mesh."""
  mesh: Mesh
  loaded: Any                  # loading.LoadedModel: the backbone and its tokenizer
  base_graphdef: nnx.GraphDef
  base_state: nnx.State        # the frozen original backbone
  params: dict                 # {"heads"} or, with Medusa-2, {"heads", "backbone"}
  opt_state: Any
  shardings: Any               # of (params, opt_state)
  step: Callable               # step(params, opt_state, base_state, batch)
  evaluate: Callable           # evaluate(params, base_state, batch)
  data: tuple | None           # prepare_data's (train tokens, mask, eval tokens, mask); None without data
  draft_ids: np.ndarray | None  # the heads' drafting vocabulary in training (None: whole vocabulary)


def _load_initial_heads(heads: MedusaHeads, path: str, base: Llama) -> None:
  """Copies trained heads (any directory `read_heads` reads) into `heads`, whose shape must match."""
  from medusa_jax.export import read_heads

  start = read_heads(path, base)
  if start.config != heads.config:
    c, w = start.config, heads.config
    raise MedusaError(f"init_heads {path} has {c.num_heads} heads x {c.num_layers} layers "
                      f"(share_lm_head {c.share_lm_head}) but the config asks for {w.num_heads} x "
                      f"{w.num_layers} (share_lm_head {w.share_lm_head})")
  nnx.update(heads, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(start)))


def setup(cfg: TrainConfig) -> TrainSetup:
  """Loads the backbone (float32 master weights when it trains, else the compute dtype), makes
  fresh heads (or starts from `init_heads`), places everything on the `cfg.mesh` mesh by the logical axis rules, and jits the
  step."""
  from medusa_jax import loading

  if cfg.batch_size % (cfg.mesh.data * cfg.mesh.fsdp):
    raise MedusaError(f"batch_size {cfg.batch_size} must divide by mesh.data x mesh.fsdp "
                      f"= {cfg.mesh.data * cfg.mesh.fsdp}")
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  loaded = loading.load(cfg.model, dtype=cfg.compute_dtype, seed=cfg.seed,
                        param_dtype="float32" if cfg.method == "medusa2" else cfg.compute_dtype)
  heads = MedusaHeads.for_model(loaded.model, HeadsConfig(cfg.num_heads, cfg.num_layers,
                                                          cfg.share_lm_head),
                                seed=cfg.seed, param_dtype=jnp.float32)
  if cfg.init_heads:
    _load_initial_heads(heads, cfg.init_heads, loaded.model)
  data = prepare_data(cfg, loaded.tokenizer, loaded.model.config.pad_token_id) if cfg.data else None
  draft_ids = None
  if cfg.draft_vocab:
    if data is None:
      raise MedusaError("draft_vocab needs training data (its answers' tokens): set data=FILE")
    draft_ids = draft_vocab.rank_by_frequency([data[0][data[1]]])[0][: cfg.draft_vocab]
  vocab = len(draft_ids) if draft_ids is not None else loaded.model.config.vocab_size
  if cfg.teacher_top_k > vocab:
    raise MedusaError(f"teacher_top_k {cfg.teacher_top_k} exceeds the heads' {vocab}-token vocabulary")
  heads_graphdef, heads_state = nnx.split(heads)
  base_graphdef, base_state = nnx.split(loaded.model)
  base_state = shard_state(base_state, mesh)
  params = _trained_params(cfg, shard_state(heads_state, mesh), base_state)
  optimizer = make_optimizer(cfg)
  opt_state = optimizer.init(params)
  shardings = committed_shardings((params, opt_state), mesh)
  # Own copies: the step donates them, and some alias the frozen backbone or each other.
  params, opt_state = jax.device_put((params, opt_state), shardings, may_alias=False)
  step, evaluate = make_train_step(heads_graphdef, base_graphdef, optimizer, cfg, shardings, draft_ids)
  return TrainSetup(mesh, loaded, base_graphdef, base_state, params, opt_state, shardings, step,
                    evaluate, data, draft_ids)


def train(cfg: TrainConfig, *, progress: bool = True, stop_at: int | None = None) -> dict:
  """Trains Medusa heads (and, with Medusa-2, the backbone). Returns the last logged metrics.

  `stop_at` ends the run after that step, as an interruption would (the schedule still follows
  `max_steps`); a later call resumes from the last checkpoint."""
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  run = setup(cfg)
  mesh, base_graphdef, base_state = run.mesh, run.base_graphdef, run.base_state
  params, opt_state, shardings, step_fn, eval_fn = (run.params, run.opt_state, run.shardings,
                                                    run.step, run.evaluate)
  if run.data is None:
    raise MedusaError("no training data: set data=FILE")
  tokens, mask, ev_tokens, ev_mask = run.data

  data, ev_data = {"tokens": tokens, "mask": mask}, {"tokens": ev_tokens, "mask": ev_mask}
  per_step = cfg.batch_size
  if cfg.cache_hidden:  # steps draw `batch_size * seq_len` labelled positions, not padded rows
    positions = [_stored_positions(cfg, base_graphdef, base_state, d["tokens"], d["mask"], progress)
                 for d in (data, ev_data)]
    if cfg.teacher_top_k:
      for p, d in zip(positions, (data, ev_data)):
        p.update(_cached_soft_targets(cfg, base_graphdef, base_state, run.draft_ids, d["tokens"],
                                      d["mask"], p))
    data, ev_data = positions
    per_step = cfg.batch_size * cfg.seq_len

  num_rows = len(next(iter(data.values())))  # sequences, or positions with cache_hidden

  def device_batch(d: dict, idx: np.ndarray) -> dict:
    return {k: jax.device_put(jnp.asarray(v[idx]), batch_sharding(mesh, v.ndim)) for k, v in d.items()}

  manager = _checkpoint_manager(cfg)
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    restored = _restore(cfg, manager, start, {"params": params, "opt_state": opt_state})
    params, opt_state = jax.device_put((restored["params"], restored["opt_state"]), shardings)
  os.makedirs(cfg.output_dir, exist_ok=True)
  with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  with open(os.path.join(cfg.output_dir, PARAM_SHAPES), "w") as f:
    json.dump(_shapes(params), f, indent=0)
  metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")
  last = {}
  bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=not progress)
  try:
    for step in range(start, cfg.max_steps):
      idx = batch_indices(num_rows, per_step, step, cfg.seed)
      params, opt_state, metrics = step_fn(params, opt_state, base_state, device_batch(data, idx))
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.max_steps:
        last = {"step": done, "split": "train", **summarize(metrics)}
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1'][0]:.2f}")
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
        metrics_file.write(json.dumps({"step": done, "split": "eval",
                                       **_evaluate(cfg, eval_fn, params, base_state, ev_data,
                                                   per_step, device_batch)}) + "\n")
        metrics_file.flush()
      if done % cfg.save_every == 0 or done == cfg.max_steps:
        manager.save(done, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state})))
      bar.update(1)
      if stop_at is not None and done >= stop_at:
        break
  finally:
    manager.wait_until_finished()
    metrics_file.close()
    bar.close()
  return last


def _evaluate(cfg, eval_fn, params, base_state, data: dict, per_step: int, device_batch) -> dict:
  """Summed metrics over up to `eval_batches` held-out batches (in order); mean loss."""
  n = len(next(iter(data.values())))
  starts = range(0, min(n, cfg.eval_batches * per_step), per_step)
  total = None
  for i in starts:
    m = eval_fn(params, base_state, device_batch(data, np.arange(i, i + per_step) % n))
    total = m if total is None else jax.tree.map(lambda a, b: a + b, total, m)
  out = summarize(total)
  out["loss"] = out["loss"] / len(starts)
  return out


def trained_model(cfg: TrainConfig, base: Llama) -> tuple[Llama, MedusaHeads]:
  """(backbone, heads) of the latest checkpoint under `cfg.output_dir`; the backbone is `base`
  itself unless the run was Medusa-2 (then `base` with the trained weights)."""
  manager = _checkpoint_manager(cfg)
  step = manager.latest_step()
  if step is None:
    raise MedusaError(f"no checkpoint under {cfg.output_dir}/checkpoints")
  heads = MedusaHeads.for_model(base, HeadsConfig(cfg.num_heads, cfg.num_layers, cfg.share_lm_head),
                                param_dtype=jnp.float32)
  heads_graphdef, heads_state = nnx.split(heads)
  base_graphdef, base_state = nnx.split(base)
  params = _trained_params(cfg, heads_state, base_state)
  target = {"params": params, "opt_state": make_optimizer(cfg).init(params)}
  params = _restore(cfg, manager, step, target)["params"]
  if "backbone" in params:
    base = nnx.merge(base_graphdef, params["backbone"])
  return base, nnx.merge(heads_graphdef, params["heads"])
