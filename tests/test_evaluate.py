"""Quality metrics against sacrebleu and rouge-score called directly, the reference-set loaders,
and infer/evaluate.py end to end on a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sacrebleu
from helpers import ROOT, write_tiny_heads
from rouge_score import rouge_scorer

from medusa_jax.errors import MedusaError
from medusa_jax.eval import metrics, references

OUTPUTS = ["the cat sat on the mat", "a quick brown fox jumps", "he paid 12 dollars"]
REFS = [("the cat is on the mat", "a cat sat on a mat"), ("the quick brown fox jumped",),
        ("He pays 1,2 dollars. #### 12",)]


def test_metrics_equal_the_libraries_called_directly():
  got = metrics.score(OUTPUTS, REFS)
  streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
  assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(OUTPUTS, streams).score)
  assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(OUTPUTS, streams).score)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for name in ("rouge1", "rouge2", "rougeL"):
    expected = sum(scorer.score_multi(list(r), o)[name].fmeasure for o, r in zip(OUTPUTS, REFS)) / 3
    assert got[name] == pytest.approx(100 * expected)
  assert got["exact_match"] is None  # no final answers given
  perfect = metrics.score(["the cat sat on the mat"], [("the cat sat on the mat",)])
  assert perfect["bleu"] == pytest.approx(100) and perfect["rougeL"] == pytest.approx(100)


def test_exact_match_of_final_answers():
  refs = [("so 6 + 6 = 12\n#### 12",), ("#### 1,000",), ("#### 7",)]
  answers = [metrics.final_answer(r[0], reference=True) for r in refs]
  assert answers == ["12", "1000", "7"]
  got = metrics.score(["The answer is 12.", "That makes 1000.0 dollars", "#### 8 (or 7)"], refs, answers)
  assert got["exact_match"] == pytest.approx(200 / 3)
  assert metrics.score(["12"], refs[:1], [None])["exact_match"] is None
  assert metrics.final_answer("no number here") is None
  assert metrics.final_answer("3 apples and 4 pears") == "4"


def test_loaders_recognise_each_set(tmp_path):
  rows = {
      "generic.jsonl": ['{"prompt": "p", "reference": "r", "answer": 3}', '{"prompt": "q", "references": ["a", "b"]}'],
      "dialogsum.jsonl": ['{"fname": "x", "dialogue": "#Person1#: hi", "summary1": "s1", "summary2": "s2", "summary3": "s3"}'],
      "seed.jsonl": ['{"instruction": "Add.", "instances": [{"input": "1 2", "output": "3"}]}'],
  }
  for name, lines in rows.items():
    (tmp_path / name).write_text("\n".join(lines))
  (tmp_path / "gsm.json").write_text(json.dumps([{"instruction": "What is 2+2?", "input": "", "output": "4\n#### 4"}]))
  (tmp_path / "my_gsm8k.json").write_text(json.dumps([{"instruction": "2+3?", "input": "", "output": "2+3 = 5 apples."}]))
  (tmp_path / "code.json").write_text(json.dumps([{"instruction": "Write x.", "input": "", "response": "x = 1"}]))
  generic = references.load(str(tmp_path / "generic.jsonl"))
  assert generic[1] == references.Example("q", ("a", "b")) and generic[0].answer == "3"
  d = references.load(str(tmp_path / "dialogsum.jsonl"))[0]
  assert d.prompt.endswith("#Person1#: hi") and d.references == ("s1", "s2", "s3")
  assert references.load(str(tmp_path / "seed.jsonl"))[0] == references.Example("Add.\n\n1 2", ("3",))
  assert references.load(str(tmp_path / "gsm.json"))[0] == references.Example("What is 2+2?", ("4\n#### 4",), "4")
  assert references.load(str(tmp_path / "my_gsm8k.json"))[0].answer == "5"  # GSM8K without ####: the last number
  assert references.load(str(tmp_path / "seed.jsonl"))[0].answer is None
  assert references.load(str(tmp_path / "code.json"))[0].references == ("x = 1",)
  (tmp_path / "bad.jsonl").write_text('{"question": "?"}\n')
  with pytest.raises(MedusaError, match="row 1: unknown row"):
    references.load(str(tmp_path / "bad.jsonl"))


def test_evaluate_cli(tmp_path):
  write_tiny_heads(tmp_path / "heads")
  data = tmp_path / "d.jsonl"
  data.write_text('{"prompt": "hello there", "reference": "hi"}\n'
                  '{"prompt": "two plus two", "references": ["four", "#### 4"]}\n'
                  '{"prompt": "name a colour", "reference": "red"}\n')
  out = tmp_path / "r.json"
  cmd = [sys.executable, os.path.join(ROOT, "infer", "evaluate.py"), "--data", str(data), "--model", "random:tiny",
         "--heads", str(tmp_path / "heads"), "--tree", "chain2", "--max-new-tokens", "10",
         "--strategies", "medusa", "beam:2", "spec-beam:2", "medusa-beam:2x3@5", "--out", str(out), "--plot", str(tmp_path / "p.png")]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  r = json.loads(out.read_text())
  assert list(r["strategies"]) == ["greedy", "medusa", "beam:2", "spec-beam:2", "medusa-beam:2x3@5"]
  for s in r["strategies"].values():
    assert set(s) >= {*metrics.score(["a"], [("a",)]), "tokens_per_step", "tokens_per_second", "rtf"}
  greedy = r["strategies"]["greedy"]
  assert greedy["rtf"] == pytest.approx(1.0) and greedy["exact_match"] is None
  names = metrics.score(["a"], [("a",)])
  for lossless, base in (("medusa", "greedy"), ("medusa-beam:2x3@5", "greedy"), ("spec-beam:2", "beam:2")):
    assert all(p["outputs"][lossless] == p["outputs"][base] for p in r["prompts"])  # so the same scores
    assert {k: r["strategies"][lossless][k] for k in names} == {k: r["strategies"][base][k] for k in names}
  assert len(r["prompts"]) == 3 and (tmp_path / "p.png").stat().st_size > 0
  assert "medusa-beam:2x3@5" in proc.stdout and "RTF" in proc.stdout
  bad = subprocess.run(cmd[:-4] + ["--strategies", "beam:x", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and bad.stderr.startswith("error: unknown strategy 'beam:x'")
