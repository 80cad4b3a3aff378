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
  completion  the turns' text back to back, no roles (system and user text is the context),
           each assistant turn ended by EOS: a pretrained model's own document format

Special tokens: a Hugging Face tokenizer must have the template's own (its `encode` of the
name gives one id); a byte-level or fourfold SentencePiece tokenizer gets them reserved
right after its vocabulary (`reserved_ids`), so the model needs that many more rows.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

from modeling.vocab import FOURFOLD
from train.data import pipeline, sources

ROLES = ("system", "user", "assistant")
TEMPLATES = ("chatml", "phi3", "llama2", "plain", "completion")
# the special tokens each template names (BOS / EOS are the tokenizer's own)
TEMPLATE_TOKENS = {
  "chatml": ("<|im_start|>", "<|im_end|>"),
  "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
  "llama2": (),
  "plain": (),
  "completion": (),
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
  elif template == "completion":
    for m in messages:
      if m["role"] == "assistant":
        out += [_txt(m["content"], True), _tok("eos", True)]
      else:
        out.append(_txt(m["content"]))
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
  return encode_pieces(render(messages, template), template, tokenizer, ids)


def encode_pieces(pieces: list[Piece], template: str, tokenizer, ids: dict[str, int] | None = None):
  """(token ids [N], loss mask [N] bool) of rendered pieces."""
  ids = ids or token_ids(template, tokenizer)
  tokens, mask = [], []
  for piece in pieces:
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
    for line_no, _, _, row in sources.jsonl_lines(path, "jsonl", pattern):
      yield f"{path}:{line_no}", row


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


# ---- SFT batches: whole conversations packed first-fit, with the loss mask


def needs_reserved_rows(specials) -> bool:
  """fourfold's own tokenizers have no template tokens: the model reserves rows for them."""
  return specials == FOURFOLD


def _split(items: list, split: str, config) -> list:
  """train: the first 90% (all of it when data.eval_name holds the evaluation); validation:
  the last 10%; all: every item (data.eval_name)."""
  if split == "all" or (split == "train" and config.data.eval_name):
    return items
  cut = len(items) - len(items) // HELD_OUT_FRACTION
  return {"train": items[:cut], "validation": items[cut:]}[split]


HELD_OUT_FRACTION = 10


def source_of(config, split: str) -> tuple[str, str]:
  """(the JSONL glob, its config key) of a split: data.eval_name's whole file for "all"."""
  key = "data.eval_name" if split == "all" else "data.name"
  name = config.data.eval_name if split == "all" else config.data.name
  if not name.startswith("jsonl:"):
    raise ValueError(
      f"{key}={name!r}: task.name={config.task.name!r} reads conversations from jsonl:<glob> "
      "(docs/post_training.md gives the record layouts)"
    )
  return name.partition(":")[2], key


def conversations(config, split: str) -> list[list[dict]]:
  """The split's conversations (`task.*_field` names the keys); skipped rows are logged."""
  t = config.task
  pattern, key = source_of(config, split)
  convs, counts = read_conversations(pattern, t.messages_field, t.prompt_field, t.response_field)
  _log_counts(f"{key} {pattern}", counts, len(convs))
  return _split(convs, split, config)


def _log_counts(what: str, counts: Counts, kept: int) -> None:
  skipped = ", ".join(f"{n} {why}" for why, n in sorted(counts.skipped.items())) or "none"
  logging.info("%s: %d rows read, %d kept; skipped: %s", what, counts.read, kept, skipped)


def sft_examples(config, tokenizer, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
  """(token ids, loss mask) of each conversation of the split, fitted to `data.seq_len`:
  prompts truncated from the left, a conversation whose response alone is too long
  skipped; both counted in the log."""
  template, seq_len = config.task.template, config.data.seq_len
  ids = token_ids(template, tokenizer)
  out, truncated, too_long = [], 0, 0
  for messages in conversations(config, split):
    fitted = fit(*encode(messages, template, tokenizer, ids), seq_len)
    if fitted is None:
      too_long += 1
      continue
    truncated += fitted[2]
    out.append((fitted[0], fitted[1]))
  logging.info(
    "sft %s: %d conversations; %d prompts truncated from the left to data.seq_len=%d, "
    "%d skipped (the response alone is longer)",
    split,
    len(out),
    truncated,
    seq_len,
    too_long,
  )
  if not out:
    raise ValueError(f"data.name={config.data.name!r}: no {split} conversation fits")
  return out


def _example(pair) -> dict[str, np.ndarray]:
  return {"tokens": pair[0].astype(np.int32), "loss_mask": pair[1].astype(np.int32)}


def _pack(examples: grain.IterDataset, seq_len: int, bins: int, seed: int) -> grain.IterDataset:
  """First-fit packing of whole conversations: each its own segment, positions from 0."""
  packed = pipeline.first_fit(examples, {"tokens": seq_len, "loss_mask": seq_len}, bins, seed)
  return packed.map(
    lambda r: {
      "tokens": r["tokens"],
      "segment_ids": r["tokens_segment_ids"],
      "positions": r["tokens_positions"],
      "loss_mask": r["loss_mask"],
    }
  )


def sft_train_iterator(
  config, tokenizer, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
  """Infinite packed batches, reshuffled every epoch, checkpointable. The conversations are
  dealt as pretraining's documents are (`pipeline.process_batches`): conversation k goes to
  shard k % data.shards, and each process keeps its rows of the global batch, so the batches
  do not depend on the process count."""
  pipeline.check_process(process_index, process_count)
  shards = config.data.shards
  pipeline.check_shards(shards, batch_size * process_count)
  examples = sft_examples(config, tokenizer, "train")

  def shard_batches(k: int, rows: int) -> grain.DatasetIterator:
    mine = grain.MapDataset.source(examples)[k::shards]
    if len(mine) == 0:
      raise ValueError(
        f"data.shards={shards}: data.name={config.data.name!r} has {len(examples)} training "
        f"conversations, none for shard {k}; allowed: at most as many shards as conversations"
      )
    stream = mine.shuffle(seed=seed).repeat().map(_example)
    # The conversations are tokenized already, in memory: no prefetch threads, no buffer.
    stream = stream.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    batches = _pack(stream, config.data.seq_len, rows, seed + 7919 * k)
    return iter(batches.batch(rows, drop_remainder=True))

  return pipeline.process_batches(shard_batches, shards, batch_size, process_index, process_count)


def sft_eval_batches(
  config,
  tokenizer,
  *,
  batch_size: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
):
  """Every evaluation conversation once, in order, packed; the last batch padded."""
  pipeline.check_process(process_index, process_count)
  split = sources.eval_split(config)
  examples = sft_examples(config, tokenizer, split)
  stream = grain.MapDataset.source(examples).map(_example).to_iter_dataset()
  rows = _pack(stream, config.data.seq_len, bins=1, seed=0)
  return pipeline.batch_eval_rows(rows, batch_size, max_batches, process_index, process_count)


def answer_stops(template: str, tokenizer, ids: dict[str, int] | None = None) -> tuple[int, ...]:
  """Where a generated answer ends: the template's end of turn (chatml's <|im_end|>, phi3's
  <|end|>, else EOS) and the tokenizer's own stop ids."""
  ids = ids or token_ids(template, tokenizer)
  end = {"chatml": "<|im_end|>", "phi3": "<|end|>"}.get(template, "eos")
  return tuple(sorted({ids[end], *tokenizer.specials.stop_ids}))


def decode_prompts(config, tokenizer, limit: int) -> tuple[list[np.ndarray], list[str]]:
  """(prompt ids, reference text) of the first `limit` evaluation conversations (0: all):
  the conversation up to its last assistant turn's content (the turn's header included),
  and that content."""
  template, seq_len = config.task.template, config.data.seq_len
  ids = token_ids(template, tokenizer)
  split = sources.eval_split(config)
  prompts, refs = [], []
  for messages in conversations(config, split):
    if limit and len(prompts) >= limit:
      break
    prompt, ref = prompt_and_answer(messages, template, tokenizer, ids)
    if prompt.size == 0 or prompt.size >= seq_len:
      continue
    prompts.append(prompt)
    refs.append(ref)
  return prompts, refs


def prompt_and_answer(messages: list[dict], template: str, tokenizer, ids=None):
  """(the ids a model is given to write the last assistant turn: everything before that
  turn's content, its header included; that content)."""
  last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
  pieces = render(messages[: last + 1], template)
  content = max(i for i, p in enumerate(pieces) if p.loss and not p.token)
  prompt, _ = encode_pieces(pieces[:content], template, tokenizer, ids)
  return prompt, messages[last]["content"]


class ChatPairs(Sequence):
  """(input text, target text) of each conversation of a split, for an encoder-decoder: the
  input is the conversation before its last assistant turn (a lone user turn as its text,
  more turns as `Role: content` lines), the target that turn's content."""

  def __init__(self, config, split: str):
    self.convs = conversations(config, split)

  def __len__(self) -> int:
    return len(self.convs)

  def __getitem__(self, index: int) -> tuple[str, str]:
    messages = self.convs[index]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    before = messages[:last]
    if len(before) == 1 and before[0]["role"] == "user":
      return before[0]["content"], messages[last]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in before]
    return "\n".join([*lines, "Assistant:"]), messages[last]["content"]


# ---- DPO rows: one (chosen, rejected) pair per row, each side padded to data.seq_len


def _common_prefix(a: list[dict], b: list[dict]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _answer_only(messages: list[dict], prompt_turns: int, template: str, tokenizer, ids):
  """(ids, mask) of a conversation whose mask covers only the turns after the prompt (a
  multi-turn prompt's own assistant turns are context, not the answer being compared)."""
  tokens, mask = encode(messages, template, tokenizer, ids)
  prompt, _ = encode(messages[:prompt_turns], template, tokenizer, ids)
  mask[: prompt.size] = False
  return tokens, mask


def preference_rows(config, tokenizer, split: str) -> dict[str, np.ndarray]:
  """The split's preference pairs as row arrays: `chosen_tokens`, `chosen_mask` (the
  answer's tokens, as SFT's loss mask), `chosen_segment_ids` (1 on tokens, 0 padding), the
  same three for `rejected_`, and `weight` (1). Prompts are truncated from the left to fit
  `data.seq_len`; a pair whose answer alone is too long is skipped; both are logged."""
  t, seq_len = config.task, config.data.seq_len
  pattern, key = source_of(config, split)
  pairs, counts = read_preferences(pattern, t.prompt_field, t.chosen_field, t.rejected_field)
  _log_counts(f"{key} {pattern}", counts, len(pairs))
  ids = token_ids(t.template, tokenizer)
  sides: dict[str, list[np.ndarray]] = {}
  truncated = too_long = 0
  for chosen, rejected in _split(pairs, split, config):
    shared = _common_prefix(chosen, rejected)
    fitted = [
      fit(*_answer_only(conv, shared, t.template, tokenizer, ids), seq_len)
      for conv in (chosen, rejected)
    ]
    if any(f is None for f in fitted):
      too_long += 1
      continue
    truncated += any(f[2] for f in fitted)
    for side, (tokens, mask, _) in zip(("chosen", "rejected"), fitted, strict=True):
      pad = seq_len - tokens.size
      sides.setdefault(f"{side}_tokens", []).append(np.pad(tokens, (0, pad)))
      sides.setdefault(f"{side}_mask", []).append(np.pad(mask, (0, pad)).astype(np.int32))
      sides.setdefault(f"{side}_segment_ids", []).append(
        np.pad(np.ones(tokens.size, np.int32), (0, pad))
      )
  logging.info(
    "dpo %s: %d pairs; %d prompts truncated from the left to data.seq_len=%d, %d skipped "
    "(an answer alone is longer)",
    split,
    len(sides.get("chosen_tokens", [])),
    truncated,
    seq_len,
    too_long,
  )
  if not sides:
    raise ValueError(f"{key}={config.data.name!r}: no {split} preference pair fits")
  rows = {k: np.stack(v).astype(np.int32) for k, v in sides.items()}
  rows["weight"] = np.ones(len(rows["chosen_tokens"]), np.float32)
  return rows
