"""train/distill.py end to end on random:tiny: answers every training prompt once, writes the held-out
split, a rerun resumes (answers nothing twice), excluded and over-long prompts are never answered."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT

from medusa_jax.training.data import Conversation


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
  from medusa_jax.cli import distill

  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
  assert distill._prompt(Conversation(messages)) == messages[:2]


def test_multi_turn_prompts_are_answered_turn_by_turn(tmp_path):
  """A follow-up turn is answered after the model's own first answer: the second answer equals
  what the model says to [turn 1, its answer, turn 2]; single-turn rows keep one answer."""
  import medusa_jax

  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"category": "mt", "turns": ["Name a colour.", "Why that one?"]}) + "\n"
                     + json.dumps({"category": "mt", "turns": ["Say hi."]}) + "\n")
  out = tmp_path / "d.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train", "distill.py"), "--model", "random:tiny",
                         "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "5",
                         "--batch-size", "2", "--eval-fraction", "0"], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  done = {d["messages"][0]["content"]: d["messages"] for d in json.loads(out.read_text())}
  two, one = done["Name a colour."], done["Say hi."]
  assert [m["role"] for m in two] == ["user", "assistant", "user", "assistant"] and two[2]["content"] == "Why that one?"
  assert [m["role"] for m in one] == ["user", "assistant"]
  engine = medusa_jax.load("random:tiny", heads=None)
  again = engine.generate([two[:3]], max_new_tokens=5, seed=1)[0]
  assert two[3]["content"] == again.text.strip()
