"""A training run's orbax checkpoints under `output_dir/checkpoints`: saving, restoring (checked
against the run's `param_shapes.json` first), and the trained model of the latest one."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medusa_jax.atomic import write_json
from medusa_jax.errors import MedusaError
from medusa_jax.medusa import draft_vocab
from medusa_jax.medusa.eagle import EagleConfig, EagleHead, default_taps
from medusa_jax.medusa.heads import HeadsConfig, MedusaHeads
from medusa_jax.model.llama import Llama
from medusa_jax.training.config import TrainConfig
from medusa_jax.training.optimizer import make_optimizer

CONFIG = "train_config.json"        # the run's config, beside its checkpoints
PARAM_SHAPES = "param_shapes.json"  # what the checkpoints hold


def manager(cfg: TrainConfig):
  """The run's orbax CheckpointManager (asynchronous saves, `keep_checkpoints` kept)."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(cfg.output_dir, "checkpoints")),
                               options=options)


def _shapes(params) -> dict[str, list[int]]:
  return {jax.tree_util.keystr(k): list(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def write_run_files(cfg: TrainConfig, params) -> None:
  """`train_config.json` and `param_shapes.json` beside the checkpoints (atomically)."""
  os.makedirs(cfg.output_dir, exist_ok=True)
  write_json(os.path.join(cfg.output_dir, CONFIG), cfg.to_dict(), indent=2)
  write_json(os.path.join(cfg.output_dir, PARAM_SHAPES), _shapes(params), indent=0)


def save(checkpoints, step: int, params, opt_state) -> None:
  import orbax.checkpoint as ocp

  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state})))


def restore(cfg: TrainConfig, checkpoints, step: int, target: dict) -> dict:
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
  restored = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]


def trained_params(cfg: TrainConfig, heads_state, base_state) -> dict:
  """The parameters the optimizer updates: `{"heads"}`, plus `"backbone"` with Medusa-2."""
  params = {"heads": nnx.to_pure_dict(heads_state)}
  if cfg.method == "medusa2":
    params["backbone"] = nnx.to_pure_dict(base_state)
  return params


def heads_config(cfg: TrainConfig) -> HeadsConfig:
  return HeadsConfig(cfg.heads.num_heads, cfg.heads.num_layers, cfg.heads.share_lm_head,
                     cfg.heads.head_type)


def fresh_heads(cfg: TrainConfig, model: Llama, draft_ids: np.ndarray | None) -> MedusaHeads | EagleHead:
  """The heads (or EAGLE drafter) `cfg` trains, freshly made for `model`; `draft_ids`: their
  drafting vocabulary (an EAGLE drafter's `lm_head` columns; None: the whole vocabulary)."""
  if cfg.heads.head_type != "eagle":
    return MedusaHeads.for_model(model, heads_config(cfg), seed=cfg.seed, param_dtype=jnp.float32)
  ids = np.arange(model.config.vocab_size, dtype=np.int32) if draft_ids is None else draft_ids
  taps = tuple(cfg.heads.taps) or default_taps(model.config.num_layers)
  return EagleHead.for_model(model, EagleConfig(taps, len(ids)), ids, seed=cfg.seed, param_dtype=jnp.float32)


def read_config(run_dir: str) -> TrainConfig:
  """The config of the run in `run_dir` (whose `output_dir` becomes `run_dir`)."""
  path = os.path.join(run_dir, CONFIG)
  try:
    with open(path) as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise MedusaError(f"cannot read {path}: {e}") from None
  if not isinstance(values, dict):
    raise MedusaError(f"{path} must hold a JSON object")
  cfg = TrainConfig.from_dict(values)
  cfg.output_dir = run_dir
  return cfg


def trained_model(cfg: TrainConfig, base: Llama) -> tuple[Llama, MedusaHeads | EagleHead]:
  """(backbone, heads) of the latest checkpoint under `cfg.output_dir`; the backbone is `base`
  itself unless the run was Medusa-2 (then `base` with the trained weights). The run's drafting
  vocabulary is its `draft_vocab.json` (`loop.train` writes it)."""
  checkpoints = manager(cfg)
  step = checkpoints.latest_step()
  if step is None:
    raise MedusaError(f"no checkpoint under {cfg.output_dir}/checkpoints")
  heads = fresh_heads(cfg, base, draft_vocab.read(cfg.output_dir, None))
  heads_graphdef, heads_state = nnx.split(heads)
  base_graphdef, base_state = nnx.split(base)
  params = trained_params(cfg, heads_state, base_state)
  target = {"params": params, "opt_state": make_optimizer(cfg).init(params)}
  params = restore(cfg, checkpoints, step, target)["params"]
  if "backbone" in params:
    base = nnx.merge(base_graphdef, params["backbone"])
  return base, nnx.merge(heads_graphdef, params["heads"])
