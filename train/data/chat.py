"""Conversations: chat templates rendered into token ids with the loss mask of supervised
fine-tuning, and the JSONL records they come from.

A template turns messages ({role, content}) into pieces: text, or a special token by name.
Each piece is encoded on its own, so the mask is exact at piece boundaries. The mask covers
each assistant turn's content and the token that ends it, never a header or any system /
user text:

  chatml   <|im_start|>role\\n content <|im_end|>\\n
  phi3     <|role|>\\n content <|end|>\\n
  llama2   <s>[INST] <<SYS>>\\n system \\n<</SYS>>\\n\\n user [/INST] assistant </s>
  plain    Role: content\\n, each assistant turn ended by the tokenizer's EOS

Special tokens: a Hugging Face tokenizer must have the template's own (its `encode` of the
name gives one id); a byte-level or fourfold SentencePiece tokenizer gets them reserved
right after its vocabulary (`reserved_ids`), so the model needs that many more rows.
"""

from __future__ import annotations

import dataclasses
import glob
import json

import numpy as np

from modeling.vocab import FOURFOLD

ROLES = ("system", "user", "assistant")
TEMPLATES = ("chatml", "phi3", "llama2", "plain")
# the special tokens each template names (BOS / EOS are the tokenizer's own)
TEMPLATE_TOKENS = {
  "chatml": ("<|im_start|>", "<|im_end|>"),
  "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
  "llama2": (),
  "plain": (),
}


@dataclasses.dataclass(frozen=True)
class Piece:
  text: str = ""  # ordinary text
  token: str = ""  # or a special token: a template token, "bos" or "eos"
  loss: bool = False  # in the SFT loss


def _txt(text: str, loss: bool = False) -> Piece:
  return Piece(text=text, loss=loss)


def _tok(name: str, loss: bool = False) -> Piece:
  return Piece(token=name, loss=loss)


def render(messages: list[dict], template: str) -> list[Piece]:
  """The pieces of a conversation under `template` (TEMPLATES)."""
  out: list[Piece] = []
  if template == "chatml":
    for m in messages:
      is_assistant = m["role"] == "assistant"
      out += [_tok("<|im_start|>"), _txt(f"{m['role']}\n"), _txt(m["content"], is_assistant)]
      out += [_tok("<|im_end|>", is_assistant), _txt("\n")]
  elif template == "phi3":
    for m in messages:
      is_assistant = m["role"] == "assistant"
      out += [_tok(f"<|{m['role']}|>"), _txt("\n"), _txt(m["content"], is_assistant)]
      out += [_tok("<|end|>", is_assistant), _txt("\n")]
  elif template == "llama2":
    system = ""
    for m in messages:
      if m["role"] == "system":
        system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
      elif m["role"] == "user":
        out += [_tok("bos"), _txt(f"[INST] {system}{m['content'].strip()} [/INST]")]
        system = ""
      else:
        out += [_txt(" "), _txt(m["content"].strip(), True), _txt(" "), _tok("eos", True)]
  elif template == "plain":
    for m in messages:
      out.append(_txt(f"{m['role'].capitalize()}: "))
      if m["role"] == "assistant":
        out += [_txt(m["content"], True), _tok("eos", True), _txt("\n")]
      else:
        out.append(_txt(f"{m['content']}\n"))
  else:
    raise ValueError(f"task.template={template!r}: allowed {TEMPLATES}")
  return out


def reserved_ids(template: str, vocab_size: int) -> dict[str, int]:
  """Ids of the template's tokens for a tokenizer without them: right after its vocabulary."""
  return {name: vocab_size + i for i, name in enumerate(TEMPLATE_TOKENS[template])}


def token_ids(template: str, tokenizer) -> dict[str, int]:
  """{token name: id} of the template's special tokens, plus "bos" and "eos"."""
  s = tokenizer.specials
  ids = {"bos": s.bos, "eos": s.eos}
  if s == FOURFOLD:  # fourfold's own tokenizers have no template tokens: reserve them
    return ids | reserved_ids(template, tokenizer.vocab_size)
  for name in TEMPLATE_TOKENS[template]:
    got = tokenizer.encode(name)
    if got.size != 1:
      raise ValueError(
        f"task.template={template!r} needs the token {name!r}, which data.tokenizer does not "
        f"have (it encodes to {got.tolist()})"
      )
    ids[name] = int(got[0])
  return ids


def encode(messages: list[dict], template: str, tokenizer, ids: dict[str, int] | None = None):
  """(token ids [N], loss mask [N] bool) of a conversation."""
  ids = ids or token_ids(template, tokenizer)
  tokens, mask = [], []
  for piece in render(messages, template):
    if piece.token:
      if ids.get(piece.token) is None:
        raise ValueError(f"task.template={template!r} needs a {piece.token} token")
      new = [ids[piece.token]]
    else:
      new = tokenizer.encode(piece.text).tolist()
    tokens += new
    mask += [piece.loss] * len(new)
  return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def fit(tokens_N: np.ndarray, mask_N: np.ndarray, seq_len: int):
  """Truncates to `seq_len` from the left of the prompt, never the response: (tokens,
  mask, truncated) or None when the text after the first loss token alone is too long."""
  if tokens_N.size <= seq_len:
    return tokens_N, mask_N, False
  first = int(np.argmax(mask_N)) if mask_N.any() else tokens_N.size
  if tokens_N.size - first > seq_len:
    return None
  cut = tokens_N.size - seq_len
  return tokens_N[cut:], mask_N[cut:], True


# ---- JSONL records


@dataclasses.dataclass
class Counts:
  """Rows read, and rows skipped by reason (reported by the loaders)."""

  read: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str) -> None:
    self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _messages(value, where: str) -> list[dict]:
  """A string is one user turn's text; a list must hold {role, content} dicts."""
  if isinstance(value, str):
    return [{"role": "user", "content": value}]
  if not isinstance(value, list) or not all(
    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    for m in value
  ):
    raise ValueError(f"{where}: expected a string or a list of {{role, content}} messages")
  return value


def _answer(value, where: str) -> list[dict]:
  """A preference answer: a string is one assistant turn."""
  if isinstance(value, str):
    return [{"role": "assistant", "content": value}]
  return _messages(value, where)


def _rows(pattern: str):
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"data.name='jsonl:{pattern}': no file matches")
  for path in paths:
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(row, dict):
          raise ValueError(f"{where}: expected a JSON object")
        yield where, row


def read_conversations(
  pattern: str,
  messages_field: str = "messages",
  prompt_field: str = "prompt",
  response_field: str = "response",
) -> tuple[list[list[dict]], Counts]:
  """Conversations from JSONL: `messages`, or `prompt` + `response`. A row with neither is an
  error naming its file and line (the file is not what the task reads); a conversation with
  no assistant turn or a role outside ROLES is skipped and counted (it cannot train SFT)."""
  convs, counts = [], Counts()
  for where, row in _rows(pattern):
    counts.read += 1
    if messages_field in row:
      messages = _messages(row[messages_field], f"{where}: {messages_field}")
    elif prompt_field in row and response_field in row:
      messages = _messages(row[prompt_field], f"{where}: {prompt_field}")
      if not isinstance(row[response_field], str):
        raise ValueError(f"{where}: {response_field} must be a string")
      messages = [*messages, {"role": "assistant", "content": row[response_field]}]
    else:
      raise ValueError(
        f"{where}: needs {messages_field!r}, or {prompt_field!r} and {response_field!r}; "
        f"has {sorted(row)}"
      )
    if any(m["role"] not in ROLES for m in messages):
      counts.skip("role outside system/user/assistant")
    elif not any(m["role"] == "assistant" for m in messages):
      counts.skip("no assistant turn")
    else:
      convs.append(messages)
  return convs, counts


def read_preferences(
  pattern: str,
  prompt_field: str = "prompt",
  chosen_field: str = "chosen",
  rejected_field: str = "rejected",
) -> tuple[list[tuple[list[dict], list[dict]]], Counts]:
  """(chosen conversation, rejected conversation) pairs from JSONL rows {prompt, chosen,
  rejected} (strings or message lists; a string answer is one assistant turn). A missing
  field is an error naming file and line; chosen == rejected is skipped and counted (no
  preference to learn)."""
  pairs, counts = [], Counts()
  for where, row in _rows(pattern):
    counts.read += 1
    missing = [k for k in (prompt_field, chosen_field, rejected_field) if k not in row]
    if missing:
      raise ValueError(f"{where}: missing {missing}; has {sorted(row)}")
    prompt = _messages(row[prompt_field], f"{where}: {prompt_field}")
    chosen = _answer(row[chosen_field], f"{where}: {chosen_field}")
    rejected = _answer(row[rejected_field], f"{where}: {rejected_field}")
    if chosen == rejected:
      counts.skip("chosen == rejected")
    elif any(m["role"] not in ROLES for m in [*prompt, *chosen, *rejected]):
      counts.skip("role outside system/user/assistant")
    else:
      pairs.append(([*prompt, *chosen], [*prompt, *rejected]))
  return pairs, counts
