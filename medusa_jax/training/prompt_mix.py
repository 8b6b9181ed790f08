"""Prompts that cover what users ask, built by templates from public prompt sets (the files of
`../shared/data/prompts`), for self-distillation (`train/distill.py` answers them) and for a
diverse held-out benchmark.

Categories: translation (English into several languages), summarise / extract / rewrite a given
text, QA over a given passage, answers from a given context (retrieval-augmented), code, code
edits (explain / comment / port / improve given code), maths, open chat, tool use, and multi-turn
(a follow-up after the model's own answer). Passages and code come from the sets' own answers
(roleplay answers, codegen responses) and questions (maths problems).

Each source file is split as `train/distill.py` splits it (`data.split`, fraction 0.05, seed 0):
training prompts use only its training rows, held-out prompts only its held-out rows, so no text
of a held-out prompt is ever trained on.
"""

from __future__ import annotations

import os
import re

import numpy as np

from medusa_jax.errors import MedusaError
from medusa_jax.training.data import read_objects, split

SOURCES = {
    "gsm8k": "gsm8k_train.json",
    "codegen": "gpteacher_codegen.json",
    "roleplay": "gpteacher_roleplay.json",
    "toolformer": "gpteacher_toolformer.json",
}
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Chinese", "Japanese")

TRANSLATE = ("Translate the following text into {lang}:\n\n{text}",
             "Translate into {lang}: {text}",
             "How would you say this in {lang}?\n\n\"{text}\"",
             "Please translate this sentence from English to {lang}.\n\n{text}")
SUMMARIZE = ("Summarize the following text in two sentences.\n\n{text}",
             "Write a one-sentence summary of this text:\n\n{text}",
             "TL;DR:\n\n{text}",
             "Give a short summary of the main points of the text below.\n\n{text}")
EXTRACT = ("List the key facts stated in the following text as bullet points.\n\n{text}",
           "Which people, places, objects or ideas are named in this text? List them.\n\n{text}",
           "Extract every number in the following text and say what each one refers to.\n\n{text}",
           "Pull out the three most important sentences of this text, word for word.\n\n{text}")
REWRITE = ("Rewrite the following text in a more formal tone.\n\n{text}",
           "Rewrite this text so that a ten-year-old could understand it.\n\n{text}",
           "Paraphrase the following paragraph.\n\n{text}",
           "Make this text shorter and clearer without losing information.\n\n{text}",
           "Rewrite the text below as a list of short bullet points.\n\n{text}")
PASSAGE_QA = ("Read the passage and answer the question.\n\nPassage: {text}\n\nQuestion: {question}",
              "{text}\n\nBased on the text above, {question_lower}",
              "Passage:\n{text}\n\nAnswer using only the passage: {question}")
QUESTIONS = ("What is the main idea of the passage?", "What would be a good title for this passage?",
             "Who or what is the passage mostly about?", "What happens first in the passage?",
             "What is the tone of the passage, and why?", "What conclusion does the passage reach?")
CONTEXT = ("Use the following context to answer the question.\n\nContext: {text}\n\nQuestion: {question}",
           "Context:\n{text}\n\nUsing the context above, answer: {question}")
CODE_EDIT = ("Explain what the following code does, step by step.\n\n{text}",
             "Add helpful comments to this code.\n\n{text}",
             "Rewrite the following code in {language}.\n\n{text}",
             "Suggest an improvement to this code and show the improved version.\n\n{text}",
             "Are there any bugs or edge cases in this code?\n\n{text}")
CODE_LANGUAGES = ("Python", "JavaScript", "Java", "C++", "Go", "Rust")
FOLLOW_UPS = ("Can you make that shorter?", "Explain your answer in more detail.",
              "Can you give me an example?", "Summarize your answer in one sentence.",
              "Now translate your answer into French.", "Please write that as a bulleted list.",
              "Why is that?", "Thanks! Can you give me two more ideas?",
              "What would be a good next step?", "Can you say that more simply?")

CATEGORIES = ("translation", "summarize", "extract", "rewrite", "passage_qa", "context_qa", "code",
              "code_edit", "maths", "chat", "tools", "multi_turn")


def _read(folder: str, name: str) -> list[dict]:
  path = os.path.join(folder, SOURCES[name])
  return read_objects(path, "instruction", f"cannot read the prompt set {path}")


def _prompt(row: dict) -> str:
  return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def _sentences(text: str) -> list[str]:
  return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 30 <= len(s.strip()) <= 240]


class _Pools:
  """The texts of one split of the sources that templates fill in."""

  def __init__(self, sources: dict[str, list[dict]]):
    self.rows = sources
    self.passages = [r["output"].strip() for r in sources["roleplay"] if 300 <= len(r.get("output", "")) <= 1500]
    self.problems = [r["instruction"].strip() for r in sources["gsm8k"]]
    self.code = [r["response"].strip() for r in sources["codegen"]
                 if 80 <= len(r.get("response", "")) <= 1200 and "\n" in r.get("response", "")]
    self.contexts = [(r["output"].strip(), _prompt(r)) for r in sources["roleplay"]
                     if 200 <= len(r.get("output", "")) <= 1200]
    self.sentences = [s for p in self.passages for s in _sentences(p)] + [
        s for p in self.problems for s in _sentences(p)]


def _one(category: str, pools: _Pools, rng: np.random.Generator) -> list[str]:
  """One prompt of `category` (its user turns)."""
  def pick(items):
    return items[int(rng.integers(len(items)))]

  if category == "translation":
    return [pick(TRANSLATE).format(lang=pick(LANGUAGES), text=pick(pools.sentences))]
  if category in ("summarize", "extract", "rewrite"):
    templates = {"summarize": SUMMARIZE, "extract": EXTRACT, "rewrite": REWRITE}[category]
    return [pick(templates).format(text=pick(pools.passages + pools.problems[: len(pools.passages) // 4]))]
  if category == "passage_qa":
    q = pick(QUESTIONS)
    return [pick(PASSAGE_QA).format(text=pick(pools.passages), question=q,
                                    question_lower=q[0].lower() + q[1:])]
  if category == "context_qa":
    context, question = pick(pools.contexts)
    return [pick(CONTEXT).format(text=context, question=question)]
  if category == "code":
    return [_prompt(pick(pools.rows["codegen"]))]
  if category == "code_edit":
    return [pick(CODE_EDIT).format(text=pick(pools.code), language=pick(CODE_LANGUAGES))]
  if category == "maths":
    return [pick(pools.problems)]
  if category == "chat":
    return [_prompt(pick(pools.rows["roleplay"]))]
  if category == "tools":
    return [_prompt(pick(pools.rows["toolformer"]))]
  if category == "multi_turn":
    first = _one(pick(("chat", "code", "maths", "summarize", "passage_qa")), pools, rng)
    return first + [pick(FOLLOW_UPS)]
  raise MedusaError(f"unknown prompt category {category!r}; known: {', '.join(CATEGORIES)}")


def build(folder: str, counts: dict[str, int], *, heldout: bool, seed: int = 0,
          eval_fraction: float = 0.05) -> list[dict]:
  """`counts[c]` prompts of each category `c` as MT-bench-style records (`{"category", "turns"}`),
  from the training rows of the source files in `folder` (the held-out rows with `heldout`);
  distinct prompts, deterministic in `seed`."""
  sources = {}
  for name in SOURCES:
    rows = _read(folder, name)
    train_rows, held_rows = split(rows, eval_fraction, 0)  # as train/distill.py splits the file
    sources[name] = held_rows if heldout else train_rows
  pools = _Pools(sources)
  rng = np.random.default_rng([seed, int(heldout)])
  out, seen = [], set()
  for category in CATEGORIES:
    made, tries = 0, 0
    while made < counts.get(category, 0):
      tries += 1
      if tries > 50 * counts[category] + 100:
        raise MedusaError(f"not enough distinct {category} prompts in {folder} for {counts[category]}")
      turns = _one(category, pools, rng)
      if turns[0] in seen:
        continue
      seen.add(turns[0])
      out.append({"category": category, "turns": turns})
      made += 1
  return out
