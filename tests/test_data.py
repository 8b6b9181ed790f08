"""Data loading: every supported format, assistant-only labels proven on a hand-built conversation."""

from __future__ import annotations

import json

import pytest

from medusa_jax import MedusaError
from medusa_jax.model.tokenizer import ByteTokenizer
from medusa_jax.training.data import (
  load_conversations,
  pack_examples,
  split,
  tokenize_with_labels,
)


def test_formats(tmp_path):
  chat = tmp_path / "chat.json"
  chat.write_text(json.dumps([
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
      {"messages": [{"role": "user", "content": "e"}], "category": "x"},
  ]))
  convs = load_conversations(str(chat))
  assert [c.messages[-1]["content"] for c in convs] == ["b", "d", "e"]
  assert convs[1].messages[0]["role"] == "user" and convs[2].category == "x"

  alpaca = tmp_path / "alpaca.json"
  alpaca.write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
  (c,) = load_conversations(str(alpaca))
  assert c.messages == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]

  mt = tmp_path / "mt.jsonl"
  mt.write_text('{"turns": ["q1", "q2"], "category": "math"}\n{"turns": ["q3"]}\n')
  convs = load_conversations(str(mt))
  assert convs[0].user_turns == ["q1", "q2"] and convs[0].category == "math"
  assert convs[1].category == "mt"


def test_bad_files(tmp_path):
  with pytest.raises(MedusaError, match="data file not found"):
    load_conversations(str(tmp_path / "none.json"))
  empty = tmp_path / "empty.json"
  empty.write_text("[]")
  with pytest.raises(MedusaError, match="holds no conversations"):
    load_conversations(str(empty))
  odd = tmp_path / "odd.json"
  odd.write_text('[{"foo": 1}]')
  with pytest.raises(MedusaError, match="unrecognised record"):
    load_conversations(str(odd))
  odd.write_text('[{"messages": ["hello"]}]')
  with pytest.raises(MedusaError, match="a message must be an object with role and content, got str"):
    load_conversations(str(odd))
  odd.write_text('[{"instruction": 3}]')
  with pytest.raises(MedusaError, match="needs a string instruction"):
    load_conversations(str(odd))
  one = tmp_path / "one.jsonl"  # a single turn given as a string is one turn, not one per character
  one.write_text('{"turns": "Hello there"}\n')
  assert load_conversations(str(one))[0].user_turns == ["Hello there"]


def test_assistant_mask_on_hand_built_conversation():
  tok = ByteTokenizer()
  messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "sure"}]
  ids, mask = tokenize_with_labels(tok, messages)
  # ByteTokenizer renders "role: content\n" per message after a BOS token
  text = "user: hi\nassistant: yo\nuser: ok?\nassistant: sure\n"
  assert ids == tok.encode(text, add_special_tokens=True)
  labelled = tok.decode([i for i, m in zip(ids, mask) if m])
  assert labelled == "yo\nsure\n"  # exactly the assistant contents and their end-of-turn


def test_assistant_mask_with_real_chat_template(smollm2):
  messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
  ids, mask = tokenize_with_labels(smollm2.tokenizer, messages)
  labelled = [i for i, m in zip(ids, mask) if m]
  assert smollm2.tokenizer.decode(labelled) == "Blue.<|im_end|>\n"


def test_pack_and_split():
  examples = [([1, 2, 3], [False, True, True]), ([4] * 10, [False] * 10), ([5, 6] * 4, [True] * 8)]
  tokens, mask = pack_examples(examples, 6, pad_id=0)
  assert tokens.tolist() == [[1, 2, 3, 0, 0, 0], [5, 6, 5, 6, 5, 6]]  # the unlabelled one dropped
  assert mask.sum() == 2 + 6
  with pytest.raises(MedusaError, match=r"no conversation has assistant tokens within its first 1 tokens \(seq_len\)"):
    pack_examples(examples[:2], 1, pad_id=0)
  a, b = split(list(range(100)), 0.1, seed=3)
  assert len(b) == 10 and sorted(a + b) == list(range(100))
  assert split(list(range(100)), 0.1, seed=3) == (a, b)
