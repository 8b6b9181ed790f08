"""Quality metrics of outputs against references: corpus BLEU and chrF (sacrebleu), ROUGE-1/2/L
F-measures (rouge-score, the best reference per output, averaged), and exact match of final
answers where the set has them (GSM8K). All on a 0-100 scale."""

from __future__ import annotations

import re
from collections.abc import Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str, *, reference: bool = False) -> str | None:
  """The number after `####`, else (unless `reference`: then None) the text's last number; commas
  and a trailing `.0` dropped."""
  if "####" in text:
    found = _NUMBER.findall(text.split("####")[-1])[:1]
  else:
    found = [] if reference else _NUMBER.findall(text)[-1:]
  if not found:
    return None
  number = found[0].replace(",", "")
  return number[:-2] if number.endswith(".0") else number


def score(outputs: Sequence[str], references: Sequence[Sequence[str]],
          answers: Sequence[str | None] | None = None) -> dict:
  """{"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"} of `outputs` against each one's
  `references`; exact_match: the outputs' final answers (`final_answer`) against `answers`, None
  unless every output has one to meet."""
  import sacrebleu
  from rouge_score import rouge_scorer

  streams = max(len(r) for r in references)
  refs = [[r[i] if i < len(r) else None for r in references] for i in range(streams)]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  rouge = [scorer.score_multi(list(r), o) for o, r in zip(outputs, references)]
  exact = None
  if answers is not None and all(a is not None for a in answers):
    exact = 100.0 * sum(final_answer(o) == a for o, a in zip(outputs, answers)) / len(outputs)
  result = {"bleu": sacrebleu.corpus_bleu(list(outputs), refs).score,
            "chrf": sacrebleu.corpus_chrf(list(outputs), refs).score}
  for name in ("rouge1", "rouge2", "rougeL"):
    result[name] = 100.0 * sum(s[name].fmeasure for s in rouge) / len(rouge)
  return result | {"exact_match": exact}
