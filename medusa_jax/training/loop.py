"""The head-training loop: data, mesh placement, jitted steps, orbax checkpoints, metrics.jsonl.

Resuming: the latest checkpoint under `output_dir/checkpoints` restores the heads, the optimizer
state and the step; the data order is a pure function of (seed, step), so the run continues
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medusa_jax.cache import enable_compilation_cache
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.eagle import EagleHead
from medusa_jax.medusa.heads import MedusaHeads
from medusa_jax.model.sharding import (
  committed_shardings,
  make_mesh,
  shard_state,
)
from medusa_jax.training import checkpoints
from medusa_jax.training.batches import PositionBatch, SequenceBatch, num_rows, rows
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.data import (
  load_conversations,
  pack_examples,
  split,
  tokenize_with_labels,
)
from medusa_jax.training.distributed import global_batch, is_main, local_copy, to_host
from medusa_jax.training.hidden_cache import stored_positions, with_soft_targets
from medusa_jax.training.losses import summarize
from medusa_jax.training.optimizer import make_optimizer
from medusa_jax.training.step import make_train_step
from medusa_jax.weights import specs


def prepare_data(cfg: TrainConfig, tokenizer, pad_id: int) -> tuple[SequenceBatch, SequenceBatch]:
  """(train, eval) NumPy batches of fixed shape `[n, seq_len]`."""
  if not cfg.data.files:
    raise MedusaError("no training data: set data=FILE")
  convs = [c for path in cfg.data.files for c in load_conversations(path)]
  convs = [c for c in convs if any(m["role"] == "assistant" for m in c.messages)]
  if not convs:
    raise MedusaError("the training data holds no assistant answers")
  train, held = split(convs, cfg.data.eval_fraction, cfg.seed)

  def pack(part):
    return SequenceBatch(*pack_examples((tokenize_with_labels(tokenizer, c.messages) for c in part),
                                        cfg.data.seq_len, pad_id))

  tr = pack(train)
  return tr, (pack(held) if held else tr)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Rows of the batch at `step`: epoch-wise seeded permutations, a pure function of the step."""
  per_epoch = max(1, n // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  return order[np.arange(i * batch_size, (i + 1) * batch_size) % n]


@dataclasses.dataclass
class TrainSetup:
  """A run's model, state and jitted functions, placed on its mesh."""
  mesh: Mesh
  loaded: Any                  # specs.LoadedModel: the backbone and its tokenizer
  base_graphdef: nnx.GraphDef
  base_state: nnx.State        # the frozen original backbone
  params: dict                 # {"heads"} or, with Medusa-2, {"heads", "backbone"}
  opt_state: Any
  shardings: Any               # of (params, opt_state)
  step: Callable               # step(params, opt_state, base_state, batch)
  evaluate: Callable           # evaluate(params, base_state, batch)
  data: tuple | None           # prepare_data's (train, eval) batches; None without data
  draft_ids: np.ndarray | None  # the heads' drafting vocabulary in training (None: whole vocabulary)


def setup(cfg: TrainConfig, init_heads: MedusaHeads | None = None) -> TrainSetup:
  """Loads the backbone (float32 master weights when it trains, else the compute dtype), makes
  fresh heads (or an EAGLE drafter) or starts from `init_heads` (e.g. Medusa-1's, for Medusa-2;
  `cfg.heads.init` names them for the command line, which reads them), places everything on the
  `cfg.mesh` mesh by the logical axis rules, and jits the step."""
  batch_size = cfg.data.batch_size
  if batch_size % (cfg.mesh.data * cfg.mesh.fsdp):
    raise MedusaError(f"batch_size {batch_size} must divide by mesh.data x mesh.fsdp "
                      f"= {cfg.mesh.data * cfg.mesh.fsdp}")
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  loaded = specs.load(cfg.model.spec, dtype=cfg.model.compute_dtype, seed=cfg.seed,
                      param_dtype="float32" if cfg.method == "medusa2" else cfg.model.compute_dtype)
  data = prepare_data(cfg, loaded.tokenizer, loaded.model.config.pad_token_id) if cfg.data.files else None
  draft_ids = None
  if cfg.heads.draft_vocab:
    if data is None:
      raise MedusaError("draft_vocab needs training data (its answers' tokens): set data=FILE")
    draft_ids = draft_vocab.rank_by_frequency([data[0].tokens[data[0].mask]])[0][: cfg.heads.draft_vocab]
  heads = checkpoints.fresh_heads(cfg, loaded.model, draft_ids)
  if init_heads is not None and (isinstance(init_heads, EagleHead) != isinstance(heads, EagleHead) or (
      isinstance(heads, EagleHead) and init_heads.config != heads.config)):
    raise MedusaError(f"init_heads ({init_heads.config}) cannot start {heads.config}: an EAGLE drafter "
                      "starts from one of the same taps and drafting vocabulary, heads from heads")
  if isinstance(heads, EagleHead) and init_heads is not None:
    nnx.update(heads, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(init_heads)))
  elif init_heads is not None:
    c, w = init_heads.config, heads.config
    # Medusa heads can start Hydra ones: Hydra's input layers start as [I; 0; 0], so the Hydra heads
    # start as exactly those Medusa heads.
    if dataclasses.replace(c, head_type=w.head_type) != w or c.head_type not in ("medusa", w.head_type):
      raise MedusaError(f"init_heads are {c.num_heads} {c.head_type} heads x {c.num_layers} layers "
                        f"(share_lm_head {c.share_lm_head}) but the config asks for {w.num_heads} "
                        f"{w.head_type} heads x {w.num_layers} (share_lm_head {w.share_lm_head})")
    nnx.update(heads, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(init_heads)))
  elif cfg.heads.init:
    raise MedusaError("heads.init names starting heads for train/train_heads.py; from Python, "
                      "read them (medusa_jax.formats.layout.read_heads) and pass init_heads=")
  vocab = len(draft_ids) if draft_ids is not None else loaded.model.config.vocab_size
  if cfg.heads.teacher_top_k > vocab:
    raise MedusaError(f"teacher_top_k {cfg.heads.teacher_top_k} exceeds the heads' {vocab}-token vocabulary")
  heads_graphdef, heads_state = nnx.split(heads)
  base_graphdef, base_state = nnx.split(loaded.model)
  base_state = shard_state(base_state, mesh)
  params = checkpoints.trained_params(cfg, shard_state(heads_state, mesh), base_state)
  optimizer = make_optimizer(cfg)
  opt_state = optimizer.init(params)
  shardings = committed_shardings((params, opt_state), mesh)
  # Own copies: the step donates them, and some alias the frozen backbone or each other.
  params, opt_state = jax.device_put((params, opt_state), shardings, may_alias=False)
  step, evaluate = make_train_step(heads_graphdef, base_graphdef, optimizer, cfg, shardings, draft_ids)
  return TrainSetup(mesh, loaded, base_graphdef, base_state, params, opt_state, shardings, step,
                    evaluate, data, draft_ids)


def train(cfg: TrainConfig, *, init_heads: MedusaHeads | None = None, progress: bool = True,
          stop_at: int | None = None) -> dict:
  """Trains Medusa heads (and, with Medusa-2, the backbone). Returns the last logged metrics.

  `stop_at` ends the run after that step, as an interruption would (the schedule still follows
  `max_steps`); a later call resumes from the last checkpoint."""
  from tqdm import tqdm

  enable_compilation_cache()
  run = setup(cfg, init_heads)
  mesh, base_graphdef, base_state = run.mesh, run.base_graphdef, run.base_state
  params, opt_state = run.params, run.opt_state
  if run.data is None:
    raise MedusaError("no training data: set data=FILE")
  data, ev_data = run.data
  per_step = cfg.data.batch_size
  if cfg.cache.hidden:  # steps draw `batch_size * seq_len` labelled positions, not padded rows
    cache_cfg, cache_state = cfg, base_state
    if jax.process_count() > 1:  # each process computes (and keeps) the cache on its own devices
      cache_cfg = dataclasses.replace(cfg, cache=dataclasses.replace(
          cfg.cache, dir=cfg.cache.dir and os.path.join(cfg.cache.dir, f"process-{jax.process_index()}")))
      cache_state = local_copy(base_state)
    positions = [stored_positions(cache_cfg, base_graphdef, cache_state, d.tokens, d.mask, progress)
                 for d in (data, ev_data)]
    if cfg.heads.teacher_top_k:
      positions = [with_soft_targets(cfg, base_graphdef, cache_state, run.draft_ids, d.tokens, d.mask, p)
                   for p, d in zip(positions, (data, ev_data))]
    data, ev_data = positions
    per_step = cfg.data.batch_size * cfg.data.seq_len

  def device_batch(host: SequenceBatch | PositionBatch, idx: np.ndarray):
    return global_batch(rows(host, idx), mesh)  # this process's rows only

  manager = checkpoints.manager(cfg)
  start = 0
  if manager.latest_step() is not None:
    start = manager.latest_step()
    restored = checkpoints.restore(cfg, manager, start, {"params": params, "opt_state": opt_state})
    params, opt_state = jax.device_put((restored["params"], restored["opt_state"]), run.shardings)
  main = is_main()  # one process writes the run files and metrics
  if main:
    checkpoints.write_run_files(cfg, params)
    if run.draft_ids is not None:
      draft_vocab.save(cfg.output_dir, run.draft_ids)
  metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if main else None
  last = {}
  bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=not (progress and main))
  try:
    for step in range(start, cfg.max_steps):
      idx = batch_indices(num_rows(data), per_step, step, cfg.seed)
      params, opt_state, metrics = run.step(params, opt_state, base_state, device_batch(data, idx))
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.max_steps:
        last = {"step": done, "split": "train", **summarize(to_host(metrics))}
        _log(metrics_file, last)
        bar.set_postfix(loss=f"{last['loss']:.3f}", top1=f"{last['top1'][0]:.2f}")
      if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
        _log(metrics_file, {"step": done, "split": "eval",
                            **_evaluate(cfg, run.evaluate, params, base_state, ev_data, per_step,
                                        device_batch)})
      if done % cfg.save_every == 0 or done == cfg.max_steps:
        checkpoints.save(manager, done, params, opt_state)
      bar.update(1)
      if stop_at is not None and done >= stop_at:
        break
  finally:
    manager.wait_until_finished()
    if metrics_file:
      metrics_file.close()
    bar.close()
  return last


def _log(metrics_file, record: dict) -> None:
  if metrics_file:
    metrics_file.write(json.dumps(record) + "\n")
    metrics_file.flush()


def _evaluate(cfg, eval_fn, params, base_state, data, per_step: int, device_batch) -> dict:
  """Summed metrics over up to `eval_batches` held-out batches (in order); mean loss."""
  n = num_rows(data)
  starts = range(0, min(n, cfg.eval_batches * per_step), per_step)
  total = None
  for i in starts:
    m = eval_fn(params, base_state, device_batch(data, np.arange(i, i + per_step) % n))
    total = m if total is None else jax.tree.map(lambda a, b: a + b, total, m)
  out = summarize(to_host(total))
  out["loss"] = out["loss"] / len(starts)
  return out
