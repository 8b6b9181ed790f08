"""Prompts with reference answers, for quality metrics (`metrics.py`, `infer/evaluate.py`).

`load(path)` reads a JSON list or JSONL file and recognises its rows by their keys:

| rows hold | set | prompt | references |
| --- | --- | --- | --- |
| `prompt`, `reference` or `references` | any | `prompt` | as given |
| `dialogue`, `summary1..3` or `summary` | DialogSum (`references/dialogsum_*.jsonl`) | "Summarize the following dialogue ..." | the human summaries |
| `instruction`, `instances` | Alpaca seed tasks (`prompts/alpaca_seed_tasks.jsonl`) | instruction + first instance's input | its output |
| `instruction`, `response` | GPTeacher codegen (`prompts/gpteacher_codegen.json`) | instruction + input | `response` |
| `instruction`, `output` | Alpaca JSON, e.g. GSM8K (`prompts/gsm8k_train.json`) | instruction + input | `output` |

Exact match compares final answers: a row's `"answer"`, or the number after `#### ` in its reference
(GSM8K's own form), or, in a file named `*gsm8k*` (the Alpaca conversion, without `####`), the
reference's last number.
The shared sets are read where they lie (../shared/data); their licences keep them out of this
project's files.
"""

from __future__ import annotations

import dataclasses
import json
import os

from medusa_jax.errors import MedusaError
from medusa_jax.eval.metrics import final_answer

SUMMARIZE = "Summarize the following dialogue in one or two sentences.\n\n{}"


@dataclasses.dataclass(frozen=True)
class Example:
  prompt: str
  references: tuple[str, ...]
  answer: str | None = None  # the final answer exact match compares, where the set has one


def _with_input(instruction: str, text: str | None) -> str:
  return f"{instruction}\n\n{text}" if text else instruction


def _example(row: dict, where: str) -> Example:
  if "prompt" in row:
    refs = row.get("references", [row["reference"]] if "reference" in row else None)
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
      raise MedusaError(f'{where}: a row with "prompt" needs "reference" (text) or "references" (a list of texts)')
    return Example(row["prompt"], tuple(refs), None if row.get("answer") is None else str(row["answer"]))
  if "dialogue" in row:
    refs = [row[k] for k in ("summary1", "summary2", "summary3", "summary") if row.get(k)]
    return Example(SUMMARIZE.format(row["dialogue"]), tuple(refs))
  if "instances" in row:
    first = row["instances"][0]
    return Example(_with_input(row["instruction"], first.get("input")), (first["output"],))
  if "instruction" in row and ("response" in row or "output" in row):
    return Example(_with_input(row["instruction"], row.get("input")), (row.get("response", row.get("output")),))
  raise MedusaError(f"{where}: unknown row {sorted(row)}; give prompt + reference(s), or a set of the "
                    "table in medusa_jax/eval/references.py")


def load(path: str, limit: int | None = None) -> list[Example]:
  """The first `limit` (None: all) examples of a JSON list or JSONL file (module docstring)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise MedusaError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    stripped = text.lstrip()
    rows = json.loads(text) if stripped.startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]
  except ValueError as e:
    raise MedusaError(f"{path}: not JSON or JSONL ({e})") from None
  if not rows or not all(isinstance(r, dict) for r in rows):
    raise MedusaError(f"{path}: expected a list of JSON objects")
  examples = [_example(r, f"{path} row {i + 1}") for i, r in enumerate(rows[:limit])]
  last_number = "gsm8k" in os.path.basename(path).lower()
  return [dataclasses.replace(ex, answer=ex.answer or final_answer(ex.references[0], reference=not last_number))
          for ex in examples]
