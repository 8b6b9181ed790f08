"""Tokenizers: Hugging Face tokenizers (from a HF directory or GGUF metadata) and a byte-level
fallback for random-weight models; chat-prompt encoding shared by every tool."""

from __future__ import annotations

from typing import Sequence

Message = dict[str, str]


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258 (0 pad, 1 bos, 2 eos) with a plain chat format; for `random:` models."""

  pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
  vocab_size = 259
  chat_template = None

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    return ([self.bos_token_id] if add_special_tokens else []) + [b + 3 for b in text.encode("utf-8")]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                          tokenize: bool = True, **_):
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    text += "assistant: " if add_generation_prompt else ""
    return self.encode(text, add_special_tokens=True) if tokenize else text


def as_messages(prompt: str | Sequence[Message]) -> list[Message]:
  """A user string, or a list of {"role", "content"} messages, as a message list."""
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_chat(tokenizer, prompt: str | Sequence[Message], chat: bool = True) -> list[int]:
  """Token ids of a prompt: through the chat template (generation prompt added) when the tokenizer
  has one and `chat` is set, else the raw text."""
  if chat and (getattr(tokenizer, "chat_template", None) or isinstance(tokenizer, ByteTokenizer)):
    ids = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 returns a BatchEncoding
      ids = ids["input_ids"]
    return [int(i) for i in ids]
  text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in as_messages(prompt))
  return [int(i) for i in tokenizer.encode(text, add_special_tokens=True)]
