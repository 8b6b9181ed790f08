"""Conversation data: reading prompt and chat files, assistant-only labels, fixed-shape batches.

Formats read (by content, not by file name):
- chat JSON: a list of conversations, each a list of `{"role", "content"}` messages, or an object
  with `"messages"`, or ShareGPT `{"conversations": [{"from", "value"}]}`;
- Alpaca JSON: `{"instruction", "input", "output"}` (also `instances` as in the seed tasks);
- MT-bench JSONL: one `{"turns": [...], "category": ...}` per line (user turns only);
- anything `datasets.load_dataset` reads from a local file (json, jsonl, csv, parquet) with
  one of the fields above.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np

from medusa_jax.errors import MedusaError
from medusa_jax.model.tokenizer import Message

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


@dataclasses.dataclass
class Conversation:
  """Messages (may end with a user turn: then it is a prompt to answer) and a category name."""

  messages: list[Message]
  category: str = "default"

  @property
  def user_turns(self) -> list[str]:
    return [m["content"] for m in self.messages if m["role"] == "user"]


def _record(rec: Any, default_category: str) -> list[Conversation]:
  """One record of any supported format -> conversations."""
  if isinstance(rec, list):
    return [Conversation([_message(m) for m in rec], default_category)]
  if not isinstance(rec, dict):
    raise MedusaError(f"unsupported record of type {type(rec).__name__}")
  category = str(rec.get("category", default_category))
  if "messages" in rec:
    return [Conversation([_message(m) for m in rec["messages"]], category)]
  if "conversations" in rec:
    return [Conversation([_message(m) for m in rec["conversations"]], category)]
  if "turns" in rec:
    turns = [rec["turns"]] if isinstance(rec["turns"], str) else rec["turns"]
    if not isinstance(turns, list):
      raise MedusaError(f"'turns' must be a list of user turns, got {type(turns).__name__}")
    return [Conversation([{"role": "user", "content": str(t)} for t in turns], category)]
  if "instruction" in rec:
    instances = rec.get("instances") or []
    if not isinstance(rec["instruction"], str) or not (
        isinstance(instances, list) and all(isinstance(i, dict) for i in instances)):
      raise MedusaError("an 'instruction' record needs a string instruction (and a list of instance objects)")
    instances = rec.get("instances") or [{"input": rec.get("input", ""), "output": rec.get("output")}]
    out = []
    for inst in instances:
      prompt = rec["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
      msgs = [{"role": "user", "content": prompt}]
      if inst.get("output"):
        msgs.append({"role": "assistant", "content": str(inst["output"])})
      out.append(Conversation(msgs, category))
    return out
  raise MedusaError(f"unrecognised record with keys {sorted(rec)[:6]}: expected messages, "
                    "conversations, turns or instruction")


def _message(m: dict) -> Message:
  if not isinstance(m, dict):
    raise MedusaError(f"a message must be an object with role and content, got {type(m).__name__}")
  if "role" in m and "content" in m:
    role, content = m["role"], m["content"]
  elif "from" in m and "value" in m:
    role, content = m["from"], m["value"]
  else:
    raise MedusaError(f"unrecognised message with keys {sorted(m)}")
  if str(role).lower() not in _ROLES:
    raise MedusaError(f"unknown message role {role!r}")
  return {"role": _ROLES[str(role).lower()], "content": str(content)}


def _read_records(path: str) -> list:
  if not os.path.exists(path):
    raise MedusaError(f"data file not found: {path}")
  if path.endswith((".json", ".jsonl")):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    try:
      data = json.loads(text)
      return data if isinstance(data, list) else data.get("data", [data])
    except json.JSONDecodeError:
      try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
      except json.JSONDecodeError as e:
        raise MedusaError(f"{path} is neither JSON nor JSON lines: {e}") from None
  try:
    import datasets

    kind = {".csv": "csv", ".parquet": "parquet"}.get(os.path.splitext(path)[1], "json")
    return list(datasets.load_dataset(kind, data_files=path, split="train"))
  except Exception as e:
    raise MedusaError(f"cannot read {path} with datasets: {e}") from None


def read_objects(path: str, key: str, context: str) -> list[dict]:
  """A JSON file holding a list of objects that each have `key`; a one-line error starting with
  `context` otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  except (OSError, ValueError) as e:
    raise MedusaError(f"{context}: {e}") from None
  if not isinstance(rows, list) or not all(isinstance(r, dict) and key in r for r in rows):
    raise MedusaError(f"{context}: not a list of objects with {key!r}")
  return rows


def load_conversations(path: str) -> list[Conversation]:
  """All conversations of a file; the category defaults to the file's base name."""
  default = os.path.splitext(os.path.basename(path))[0]
  out = [c for rec in _read_records(path) for c in _record(rec, default)]
  if not out:
    raise MedusaError(f"{path} holds no conversations")
  return out


def split(items: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
  """Deterministic (train, eval) split after a seeded shuffle."""
  order = np.random.default_rng(seed).permutation(len(items))
  n_eval = int(round(len(items) * eval_fraction))
  return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def _ids(tokenizer, messages, add_generation_prompt):
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
  if hasattr(ids, "keys"):
    ids = ids["input_ids"]
  return [int(i) for i in ids]


def tokenize_with_labels(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
  """Token ids of a conversation and a mask that is true exactly on assistant tokens (their
  content and end-of-turn marker), found by rendering the chat template turn by turn."""
  ids = _ids(tokenizer, messages, False)
  mask = [False] * len(ids)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    start = len(_ids(tokenizer, messages[:i], True))
    end = len(_ids(tokenizer, messages[: i + 1], False))
    if _ids(tokenizer, messages[: i + 1], False) != ids[:end]:
      raise MedusaError("the chat template does not render conversations prefix by prefix")
    for j in range(start, end):
      mask[j] = True
  return ids, mask


def pack_examples(examples: Iterable[tuple[list[int], list[bool]]], seq_len: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Fixed-shape rows: each conversation truncated / right-padded to `seq_len`.
  Returns tokens `[n, seq_len]` int32 and assistant mask `[n, seq_len]` bool."""
  rows, masks = [], []
  for ids, mask in examples:
    if not any(mask[:seq_len]):
      continue
    ids, mask = ids[:seq_len], mask[:seq_len]
    rows.append(ids + [pad_id] * (seq_len - len(ids)))
    masks.append(mask + [False] * (seq_len - len(mask)))
  if not rows:
    raise MedusaError(f"no conversation has assistant tokens within its first {seq_len} tokens "
                      "(seq_len) to train on")
  return np.asarray(rows, np.int32), np.asarray(masks, bool)
