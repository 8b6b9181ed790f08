"""Greedy decoding of an exported ONNX directory (`export.py`) on onnxruntime, plain or with the
Medusa heads' tree, the host loop in NumPy: candidates from the heads' top-k, one tree forward
(`tree_mask`: each node sees its ancestors), the longest path whose tokens equal the model's argmax,
then the kept K/V gathered behind the past. The output equals plain greedy decoding.

Rows of a batch accept different numbers of tokens; the cache stays rectangular, its unused slots
masked out by `attention_mask` (positions come from `position_ids`, so holes cost nothing else).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from medusa_jax.errors import MedusaError
from medusa_jax.medusa.tree import Tree
from medusa_jax.onnx.export import MEDUSA_FILE, MODEL_FILE


class OnnxDecoder:
  """An exported model directory on an onnxruntime CPU session."""

  def __init__(self, directory: str, *, threads: int | None = None):
    import onnxruntime as ort

    path = os.path.join(directory, MODEL_FILE)
    config_path = os.path.join(directory, "genai_config.json")
    for needed in (path, config_path):
      if not os.path.isfile(needed):
        raise MedusaError(f"{directory} is not an exported ONNX model: {os.path.basename(needed)} is missing")
    try:
      with open(config_path) as f:
        model = json.load(f)["model"]
      decoder = model["decoder"]
      options = ort.SessionOptions()
      options.log_severity_level = 3  # not the warning that `tree_mask`'s default is overridable
      if threads:
        options.intra_op_num_threads = threads
      self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # a corrupt graph, weights or config
      raise MedusaError(f"cannot load the ONNX model in {directory}: {str(e).strip().splitlines()[0][:200]}") from None
    self.num_layers, self.kv_heads, self.head_dim = (decoder["num_hidden_layers"], decoder["num_key_value_heads"],
                                                     decoder["head_size"])
    self.eos_ids = np.asarray(model["eos_token_id"], np.int64)
    self.pad_id = int(model.get("pad_token_id", 0))
    self.tree, self.num_heads = None, 0
    medusa = os.path.join(directory, MEDUSA_FILE)
    if os.path.isfile(medusa):
      with open(medusa) as f:
        spec = json.load(f)
      self.tree, self.num_heads = Tree(spec["paths"], num_heads=spec["num_heads"]), spec["num_heads"]
    self.tokenizer = None
    if os.path.isfile(os.path.join(directory, "tokenizer.json")) or os.path.isfile(
        os.path.join(directory, "tokenizer_config.json")):
      from transformers import AutoTokenizer

      self.tokenizer = AutoTokenizer.from_pretrained(directory)

  def empty_past(self, batch: int) -> list[np.ndarray]:
    """The `past_key_values` of a prefill: `2 * layers` arrays `[batch, kv_heads, 0, head_dim]`."""
    return [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)] * (2 * self.num_layers)

  def forward(self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: list[np.ndarray],
              tree_mask: np.ndarray | None = None):
    """ids, positions `[batch, seq]`, mask `[batch, past + seq]`, past `2 * layers` arrays
    `[batch, kv_heads, past, head_dim]` -> (logits `[batch, seq, vocab]`, presents, medusa logits
    `[heads, batch, seq, vocab]` or None)."""
    feed = {"input_ids": ids.astype(np.int64), "position_ids": positions.astype(np.int64),
            "attention_mask": mask.astype(np.int64)}
    for i in range(self.num_layers):
      feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    if tree_mask is not None:
      feed["tree_mask"] = tree_mask
    names = ["logits"] + [f"present.{i}.{k}" for i in range(self.num_layers) for k in ("key", "value")]
    names += ["medusa_logits"] if self.num_heads else []
    out = self.session.run(names, feed)
    return out[0], out[1:1 + 2 * self.num_layers], (out[-1] if self.num_heads else None)

  def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, mode: str = "medusa"):
    """Greedy tokens `[batch, max_new_tokens]` (padded), their counts, forward passes per row, seconds."""
    if mode not in ("baseline", "medusa"):
      raise MedusaError(f"unknown mode {mode!r}; use baseline or medusa")
    if mode == "medusa" and self.tree is None:
      raise MedusaError("this ONNX model was exported without Medusa heads; use --mode baseline")
    if not prompts or min(len(p) for p in prompts) == 0:
      raise MedusaError("every prompt needs at least one token")
    start = time.perf_counter()
    b, longest = len(prompts), max(len(p) for p in prompts)
    lens = np.asarray([len(p) for p in prompts])
    ids = np.full((b, longest), self.pad_id, np.int64)
    for r, p in enumerate(prompts):
      ids[r, :len(p)] = p
    valid = np.arange(longest)[None, :] < lens[:, None]
    logits, cache, heads = self.forward(ids, np.broadcast_to(np.arange(longest), ids.shape), valid,
                                        self.empty_past(b))
    rows = np.arange(b)
    root = logits[rows, lens - 1].argmax(-1)
    heads = None if heads is None else heads[:, rows, lens - 1]  # [heads, batch, vocab]
    out = np.full((b, max_new_tokens), self.pad_id, np.int64)
    count, steps, done = np.zeros(b, int), np.ones(b, int), np.zeros(b, bool)
    self._record(out, count, done, root[:, None], np.ones(b, int), max_new_tokens)
    length = lens.copy()  # the next position of each row
    while not done.all():
      if mode == "baseline":
        logits, cache, _ = self.forward(root[:, None], length[:, None],
                                        np.concatenate([valid, np.ones((b, 1), bool)], 1), cache)
        root = logits[:, 0].argmax(-1)
        emitted, n, keep = root[:, None], np.ones(b, int), np.zeros((b, 1), int)
      else:
        emitted, n, keep, root, cache, heads = self._tree_step(root, heads, length, valid, cache)
      # keep the past, then the new entries `keep` (the first `n` of them valid)
      cache = [np.concatenate([c[:, :, :valid.shape[1]], np.take_along_axis(
          c[:, :, valid.shape[1]:], keep[:, None, :, None], axis=2)], axis=2) for c in cache]
      valid = np.concatenate([valid, np.arange(keep.shape[1])[None, :] < n[:, None]], axis=1)
      length = length + n
      steps += ~done
      self._record(out, count, done, emitted, n, max_new_tokens)
    return out, count, steps, time.perf_counter() - start

  def _tree_step(self, root, heads, length, valid, cache):
    """One Medusa step from the heads' logits `[heads, batch, vocab]` at the root's parent: (emitted
    `[batch, depth + 1]`: the accepted tokens then the bonus, their count `[batch]`, the nodes
    whose K/V to keep `[batch, depth + 1]` (root first; the first `count` valid), the bonus (next
    root), presents, the heads' logits at the last accepted node)."""
    tree, b = self.tree, len(root)
    rows = np.arange(b)
    ranked = np.argsort(-heads[:tree.depth], axis=-1, kind="stable")[..., :tree.topk]  # [depth, batch, topk]
    flat = np.concatenate([root[:, None], ranked.transpose(1, 0, 2).reshape(b, -1)], axis=1)
    tokens = flat[:, tree.candidate_index]
    past = valid.shape[1]
    tree_mask = np.concatenate([np.ones((b, tree.size, past), bool),
                                np.broadcast_to(tree.mask, (b, tree.size, tree.size))], axis=2)
    logits, cache, medusa = self.forward(tokens, length[:, None] + tree.depths[None, :],
                                         np.concatenate([valid, np.ones((b, tree.size), bool)], 1), cache, tree_mask)
    best = logits.argmax(-1)  # [batch, T]
    ok = tokens == best[:, np.maximum(tree.parents, 0)]
    matches = ok[:, tree.retrieve[:, 1:]] & tree.retrieve_mask[None, :, 1:]
    per_leaf = np.cumprod(matches, axis=-1).sum(-1)  # [batch, leaves]: accepted along each path
    leaf = per_leaf.argmax(-1)  # the first longest, as `acceptance.choose_path`
    accepted = per_leaf[rows, leaf]
    path = tree.retrieve[leaf]  # [batch, depth + 1], root first
    last = path[rows, accepted]
    bonus = best[rows, last]
    shifted = np.concatenate([np.take_along_axis(tokens, path, axis=1)[:, 1:], bonus[:, None]], axis=1)
    j = np.arange(tree.depth + 1)[None, :]
    emitted = np.where(j < accepted[:, None], shifted, bonus[:, None])
    return emitted, accepted + 1, path, bonus, cache, medusa[:, rows, last]

  def _record(self, out, count, done, new, n, max_new_tokens):
    """Appends each live row's first `n` of `new` to `out`, stopping at EOS and `max_new_tokens`."""
    for r in np.flatnonzero(~done):
      for tok in new[r, :n[r]]:
        out[r, count[r]] = tok
        count[r] += 1
        if tok in self.eos_ids or count[r] >= max_new_tokens:
          done[r] = True
          break
