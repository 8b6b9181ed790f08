"""train/distill.py end to end on random:tiny: answers every training prompt once, writes the held-out
split, a rerun resumes (answers nothing twice), excluded and over-long prompts are never answered."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from medusa_jax.data import Conversation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(out, *extra):
  cmd = [sys.executable, os.path.join(ROOT, "train", "distill.py"), "--model", "random:tiny",
         "--prompts", os.path.join(ROOT, "tests", "fixtures", "tiny_chat.json"), "--out", str(out),
         "--max-new-tokens", "6", "--batch-size", "4", "--eval-fraction", "0.2", *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  return json.loads(out.read_text()), proc.stdout


def test_distill_writes_answers_and_resumes(tmp_path):
  out = tmp_path / "d.json"
  first, _ = _run(out, "--max-prompts", "3")
  assert len(first) == 3 and all(d["messages"][-1]["role"] == "assistant" for d in first)
  held = [json.loads(l) for l in (tmp_path / "d.json.heldout.jsonl").read_text().splitlines()]
  assert held and not {h["turns"][0] for h in held} & {d["messages"][0]["content"] for d in first}
  again, _ = _run(out, "--max-prompts", "5")
  assert again[:3] == first and len(again) == 5 and len({d["id"] for d in again}) == 5
  assert not list(tmp_path.glob("*.tmp"))


def test_distill_never_answers_excluded_prompts(tmp_path):
  first, _ = _run(tmp_path / "all.json", "--max-prompts", "3")
  skipped = first[1]["messages"][0]["content"]
  exclude = tmp_path / "tune.jsonl"
  exclude.write_text(json.dumps({"category": "x", "turns": [skipped]}) + "\n")
  kept, _ = _run(tmp_path / "kept.json", "--max-prompts", "3", "--exclude", str(exclude))
  assert [d["id"] for d in kept] == [first[0]["id"], first[2]["id"]]
  assert skipped not in {d["messages"][0]["content"] for d in kept}
  none, printed = _run(tmp_path / "none.json", "--max-prompts", "3", "--max-prompt-tokens", "2")
  assert none == [] and "skipped 3 prompts longer than --max-prompt-tokens 2" in printed


def test_prompt_keeps_a_system_message_with_the_first_user_turn():
  spec = importlib.util.spec_from_file_location("distill", os.path.join(ROOT, "train", "distill.py"))
  distill = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(distill)
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
  assert distill._prompt(Conversation(messages)) == messages[:2]
