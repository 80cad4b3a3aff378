"""Tokenizers: raw bytes, a SentencePiece model trained with the fourfold special ids, or a
Hugging Face model's own tokenizer (`hf:<dir>`).

Each tokenizer names its special ids in `specials` (modeling/vocab.py `Specials`): bytes
and fourfold SentencePiece models share the ids 0..7 (`FOURFOLD`); a Hugging Face tokenizer
keeps its model's (GPT-2's <|endoftext|>, BERT's [CLS] 101, T5's pad 0 ...). Framing,
objectives and decoding read the ids from there.
"""

from __future__ import annotations

import json
import os
import re
from typing import Protocol

import numpy as np
import sentencepiece as spm
import tokenizers

from modeling.vocab import (
  BOS_ID,
  CLS_ID,
  EOS_ID,
  FOURFOLD,
  MASK_ID,
  NUM_SPECIAL,
  PAD_ID,
  SEP_ID,
  UNK_ID,
  Specials,
  ranges_of,
)

# Control pieces at the reserved ids 3, 4, 5, 7 of the SentencePiece models train_spm writes.
SPM_RESERVED_PIECES = ("[MASK]", "[CLS]", "[SEP]", "[RESERVED7]")

_ALLOWED_SPECS = (
  "allowed: 'byte', 'spm:<path to .model>' or 'hf:<directory of a Hugging Face model>'"
)


class Tokenizer(Protocol):
  """What the pipeline and the trainer need from a tokenizer."""

  vocab_size: int  # the ids it can emit, added tokens included
  is_byte_level: bool
  specials: Specials  # its model's special ids and framing

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of the text alone, without the model's framing (BOS / EOS)."""
    ...

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids`, special ids skipped."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: byte b is id b + NUM_SPECIAL. No vocabulary file, no unknowns."""

  vocab_size = 256 + NUM_SPECIAL
  is_byte_level = True
  specials = FOURFOLD

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32, no EOS) of `text`; bytes are taken as they are, valid UTF-8 or not."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of the byte tokens in `ids`; special ids are dropped, invalid UTF-8 replaced."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    bytes_N = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)] - NUM_SPECIAL
    return bytes_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def num_bytes(self, ids: np.ndarray | list[int]) -> int:
    """How many of `ids` are byte tokens (for bits per byte)."""
    return int(np.count_nonzero(np.asarray(ids) >= NUM_SPECIAL))


class SentencePieceTokenizer:
  """A SentencePiece `.model` whose special ids follow the fourfold layout (see train_spm)."""

  is_byte_level = False
  specials = FOURFOLD

  def __init__(self, path: str):
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    _check_special_ids(self._sp, path)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32, no EOS) of `text`; bytes are decoded as UTF-8, invalid bytes replaced."""
    if isinstance(text, bytes | bytearray | memoryview):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids`, with the reserved ids 0..7 dropped."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    kept = ids_N[(ids_N >= NUM_SPECIAL) & (ids_N < self.vocab_size)]
    return self._sp.decode(kept.tolist())


def _check_special_ids(sp: spm.SentencePieceProcessor, path: str) -> None:
  """Raises unless pad/eos/bos/unk sit at 0/1/2/6 and ids 3, 4, 5, 7 are reserved pieces."""
  expected = {"pad": PAD_ID, "eos": EOS_ID, "bos": BOS_ID, "unk": UNK_ID}
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "bos": sp.bos_id(), "unk": sp.unk_id()}
  reserved = dict(zip((MASK_ID, CLS_ID, SEP_ID, 7), SPM_RESERVED_PIECES, strict=True))
  ordinary = [
    i
    for i, piece in reserved.items()
    if i >= sp.get_piece_size() or not (sp.is_control(i) or sp.id_to_piece(i) == piece)
  ]
  if got != expected or ordinary:
    raise ValueError(
      f"SentencePiece model {path}: special ids {got} (ordinary pieces at reserved ids"
      f" {ordinary}) do not follow the fourfold layout {expected} with ids 3, 4, 5, 7"
      " reserved. Retrain it with `python -m train.data.train_spm --config=<preset>"
      " --output=<path>.model --vocab_size=<n>`."
    )


# ---- Hugging Face tokenizers: a model directory's own files, read as transformers reads them

# The files of a Hugging Face model directory a tokenizer is read from, in order of preference:
# `tokenizers`' serialization, else a SentencePiece model (Llama 2's name, then T5's).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model")
# transformers' named special tokens, as the keys of tokenizer_config.json
_HF_NAMED = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    value = json.load(f)
  return value if isinstance(value, dict) else {}


def _token_text(value) -> str | None:
  """A special token as the config files write it: a string, or an AddedToken's dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _hf_config(directory: str) -> dict:
  """tokenizer_config.json, with special_tokens_map.json merged in as transformers merges it
  (only when the config lists no `added_tokens_decoder`)."""
  config = _read_json(os.path.join(directory, "tokenizer_config.json"))
  if "added_tokens_decoder" not in config:
    config.update(_read_json(os.path.join(directory, "special_tokens_map.json")))
  return config


def _extra_special_texts(config: dict) -> list[str]:
  """The additional special tokens the config names (`additional_special_tokens`, or
  transformers 5's `extra_special_tokens`, a list or a dict)."""
  out = []
  for key in ("additional_special_tokens", "extra_special_tokens"):
    value = config.get(key) or []
    for item in value.values() if isinstance(value, dict) else value:
      text = _token_text(item)
      if text is not None and text not in out:
        out.append(text)
  return out


def _hf_specials(
  directory: str,
  named: dict[str, int | None],
  special_ids: set[int],
  frame: tuple[list[int], list[int]],
  tokenizer_class: str,
) -> Specials:
  """The Specials of a Hugging Face tokenizer: its named tokens' ids (the model's config.json
  filling those it lacks), its framing (BOS first?), and every special id."""
  model = _read_json(os.path.join(directory, "config.json"))
  generation = _read_json(os.path.join(directory, "generation_config.json"))

  def listed(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]

  def own_or_models(name: str) -> int | None:  # the tokenizer's id, else the model's first
    return (
      named[name]
      if named[name] is not None
      else next(iter(listed(model.get(f"{name}_token_id"))), None)
    )

  bos, eos, pad = own_or_models("bos"), own_or_models("eos"), own_or_models("pad")
  stop = [] if eos is None else [eos]
  for value in (model.get("eos_token_id"), generation.get("eos_token_id")):
    stop += [i for i in listed(value) if i not in stop]
  start = listed(model.get("decoder_start_token_id"))
  if start:
    decoder_start = start[0]
  else:  # T5 starts its decoder at pad; other families at BOS
    decoder_start = pad if tokenizer_class.startswith("T5") or bos is None else bos
  prefix, _ = frame
  return Specials(
    pad=0 if pad is None else pad,
    eos=eos,
    bos=bos,
    mask=named["mask"],
    cls=named["cls"],
    sep=named["sep"],
    unk=named["unk"],
    decoder_start=decoder_start,
    add_bos=bos is not None and list(prefix) == [bos],
    stop=tuple(stop),
    special_ranges=ranges_of(special_ids | {i for i in named.values() if i is not None}),
  )


def _frame_of(framed: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
  """(prefix, suffix) the framing put around `plain` in `framed`."""
  for k in range(len(framed) - len(plain) + 1):
    if framed[k : k + len(plain)] == plain:
      return framed[:k], framed[k + len(plain) :]
  raise ValueError(f"the framed ids {framed} do not contain the text's ids {plain}")


def _model_vocab_size(directory: str) -> int:
  """The model's embedding rows (config.json `vocab_size`; 0 when not given), which may
  exceed the tokenizer's ids (T5: 32128 rows for 32100 ids)."""
  value = _read_json(os.path.join(directory, "config.json")).get("vocab_size")
  return int(value) if isinstance(value, int) else 0


class HuggingFaceTokenizer:
  """A Hugging Face model's `tokenizer.json`, run by the `tokenizers` library (GPT-2's
  byte-level BPE, Llama 3, Phi-3, BERT's WordPiece, RoBERTa ...), with the special tokens
  and framing of its `tokenizer_config.json` and the model's ids of its `config.json`.

  `encode` gives the text's ids alone (added and special tokens written in the text become
  their ids, as in transformers); `encode_framed` what transformers' `tokenizer(text)`
  gives (the post-processor's BOS / CLS / SEP / EOS).
  """

  is_byte_level = False

  def __init__(self, directory: str, path: str):
    self.directory, self.path = directory, path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.no_truncation()
    self._tok.no_padding()
    config = _hf_config(directory)
    self.tokenizer_class = str(config.get("tokenizer_class") or "")
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1
    self.model_vocab_size = _model_vocab_size(directory)
    added = self._tok.get_added_tokens_decoder()
    special = {i for i, token in added.items() if token.special}
    named = {}
    for name in _HF_NAMED:
      text = _token_text(config.get(f"{name}_token"))
      named[name] = None if text is None else self._tok.token_to_id(text)
    special |= {vocab[t] for t in _extra_special_texts(config) if t in vocab}
    # transformers tidies decoded text (" ." -> ".") when asked, except for BPE models
    self._clean_up = bool(config.get("clean_up_tokenization_spaces")) and (
      type(self._tok.model).__name__ != "BPE"
    )
    probe = "a"
    frame = _frame_of(self.encode_framed(probe).tolist(), self.encode(probe).tolist())
    self.specials = _hf_specials(directory, named, special, frame, self.tokenizer_class)

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of `text` alone, without the model's framing."""
    if isinstance(text, bytes | bytearray | memoryview):
      text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_framed(self, text: str) -> np.ndarray:
    """What transformers' `tokenizer(text)["input_ids"]` gives: the ids with the model's
    special tokens around them (tokenizer.json's post-processor, which transformers 5
    follows over tokenizer_config.json's add_bos_token / add_eos_token)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids` as transformers decodes it with skip_special_tokens=True."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    kept = ids_N[(ids_N >= 0) & (ids_N < self.vocab_size)].tolist()
    text = self._tok.decode(kept, skip_special_tokens=True)
    return _clean_up_tokenization(text) if self._clean_up else text


def _clean_up_tokenization(text: str) -> str:
  """transformers' `clean_up_tokenization`: no space before punctuation and contractions."""
  for before, after in (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
  ):
    text = text.replace(before, after)
  return text


class _AddedToken:
  """An added token of a SentencePiece tokenizer: its text and how it eats whitespace."""

  def __init__(self, content: str, special: bool, lstrip=False, rstrip=False, single_word=False):
    self.content, self.special = content, special
    self.lstrip, self.rstrip, self.single_word = lstrip, rstrip, single_word


class HuggingFaceSentencePieceTokenizer:
  """A Hugging Face model's SentencePiece `tokenizer.model` (Llama 2) or `spiece.model` (T5),
  run by `sentencepiece` as transformers' SentencePiece tokenizers run it (the slow
  LlamaTokenizer / T5Tokenizer, `legacy=True`): the text is split at added and special
  tokens (T5's `<extra_id_N>`, which strip the whitespace around them), each piece encoded
  with its own dummy prefix; framing adds BOS (`add_bos_token`, Llama's default) and EOS
  (`add_eos_token`; T5 always).

  The ids are those of the model: added tokens past the SentencePiece vocabulary take the
  ids their config gives (`added_tokens_decoder`), else T5's rule (`<extra_id_N>` is
  vocabulary + extra_ids - 1 - N), else the next free ids in order.
  """

  is_byte_level = False

  def __init__(self, directory: str, path: str):
    self.directory, self.path = directory, path
    self._sp = spm.SentencePieceProcessor(model_file=path)
    sp_size = self._sp.get_piece_size()
    config = _hf_config(directory)
    self.tokenizer_class = str(config.get("tokenizer_class") or "")
    t5 = self.tokenizer_class.startswith("T5") or "extra_ids" in config
    if config.get("legacy") is False:
      raise ValueError(
        f"{os.path.join(directory, 'tokenizer_config.json')}: legacy=false; only SentencePiece's "
        f"own (legacy) splitting is reproduced from {os.path.basename(path)}: give the "
        "directory the model's tokenizer.json"
      )
    named_text = {name: _token_text(config.get(f"{name}_token")) for name in _HF_NAMED}
    for name, sp_id in (
      ("bos", self._sp.bos_id()),
      ("eos", self._sp.eos_id()),
      ("unk", self._sp.unk_id()),
    ):
      if named_text[name] is None and f"{name}_token" not in config and sp_id >= 0:
        named_text[name] = self._sp.id_to_piece(sp_id)
    if t5 and named_text["pad"] is None and self._sp.pad_id() >= 0:
      named_text["pad"] = self._sp.id_to_piece(self._sp.pad_id())

    # added tokens: {id: _AddedToken}
    added: dict[int, _AddedToken] = {}
    for index, token in (config.get("added_tokens_decoder") or {}).items():
      token = token if isinstance(token, dict) else {"content": str(token)}
      added[int(index)] = _AddedToken(
        token["content"],
        bool(token.get("special", True)),
        bool(token.get("lstrip")),
        bool(token.get("rstrip")),
        bool(token.get("single_word")),
      )
    known = {t.content: i for i, t in added.items()}
    extra = _extra_special_texts(config)
    if t5:
      n = int(config.get("extra_ids", 100))
      for i in range(n):
        content = f"<extra_id_{i}>"
        if content not in known:
          added[sp_size + n - 1 - i] = _AddedToken(content, True, lstrip=True, rstrip=True)
          known[content] = sp_size + n - 1 - i
    next_id = max([sp_size - 1, *added]) + 1
    for content in [t for t in named_text.values() if t] + extra:
      if content in known:
        continue
      index = self._sp.piece_to_id(content)  # a piece of the vocabulary, else a new id
      if self._sp.id_to_piece(index) != content:
        index, next_id = next_id, next_id + 1
      added[index], known[content] = _AddedToken(content, True), index
    self._added, self._added_ids = added, known
    self.vocab_size = max([sp_size - 1, *added]) + 1
    self.model_vocab_size = _model_vocab_size(directory)
    self._sp_size = sp_size
    # the splitting: longest added / special token first at each position, as transformers' trie
    texts = sorted(known, key=len, reverse=True)
    self._split = re.compile("|".join(re.escape(t) for t in texts)) if texts else None

    named = {name: (None if text is None else known[text]) for name, text in named_text.items()}
    add_bos = config.get("add_bos_token", not t5 and named["bos"] is not None)
    add_eos = config.get("add_eos_token", t5)
    self._frame = (
      [named["bos"]] if add_bos and named["bos"] is not None else [],
      [named["eos"]] if add_eos and named["eos"] is not None else [],
    )
    special = {i for i, t in added.items() if t.special}
    special |= {i for i in range(sp_size) if self._sp.is_control(i) or self._sp.is_unknown(i)}
    self.specials = _hf_specials(directory, named, special, self._frame, self.tokenizer_class)

  def _pieces(self, text: str) -> list[str | int]:
    """The text split at added and special tokens (their ids), with the whitespace they
    strip removed, as transformers' `tokenize` splits it."""
    if self._split is None:
      return [text]
    parts: list[str | int] = []
    start = 0
    for m in self._split.finditer(text):
      parts += [text[start : m.start()], self._added_ids[m.group()]]
      start = m.end()
    parts.append(text[start:])
    for i, part in enumerate(parts):
      if isinstance(part, str):
        continue
      token = self._added[part]
      left = parts[i - 1] if i > 0 and isinstance(parts[i - 1], str) else None
      right = parts[i + 1] if i + 1 < len(parts) and isinstance(parts[i + 1], str) else None
      if token.rstrip and right:
        parts[i + 1] = right.lstrip()
      if token.lstrip and left:
        parts[i - 1] = left.rstrip()
      if token.single_word:  # inside a word it is text, joined to that word
        if left and left[-1] != " ":
          parts[i - 1], parts[i] = parts[i - 1] + token.content, ""
        elif right and right[0] != " ":
          parts[i + 1], parts[i] = token.content + parts[i + 1], ""
    return [p for p in parts if p != ""]

  def encode(self, text: str | bytes) -> np.ndarray:
    """Token ids (int32) of `text` alone, without the model's framing."""
    if isinstance(text, bytes | bytearray | memoryview):
      text = bytes(text).decode("utf-8", errors="replace")
    ids: list[int] = []
    for part in self._pieces(text):
      ids += [part] if isinstance(part, int) else self._sp.encode(part, out_type=int)
    return np.asarray(ids, np.int32)

  def encode_framed(self, text: str) -> np.ndarray:
    """What transformers' `tokenizer(text)["input_ids"]` gives: BOS and / or EOS around the
    text's ids, as the model's tokenizer adds them."""
    prefix, suffix = self._frame
    return np.asarray([*prefix, *self.encode(text).tolist(), *suffix], np.int32)

  def decode(self, ids: np.ndarray | list[int]) -> str:
    """Text of `ids`, special ids skipped; added ordinary tokens as their text."""
    ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
    keep = (ids_N >= 0) & (ids_N < self.vocab_size) & ~self.specials.is_special(ids_N)
    out, run = [], []
    for i in ids_N[keep].tolist():
      if i in self._added:
        out.append(self._sp.decode(run) + self._added[i].content)
        run = []
      elif i < self._sp_size:
        run.append(i)
    return "".join(out) + self._sp.decode(run)


def hf_tokenizer(directory: str) -> HuggingFaceTokenizer | HuggingFaceSentencePieceTokenizer:
  """The tokenizer of a Hugging Face model directory: its tokenizer.json if it has one,
  else its SentencePiece model; special tokens from tokenizer_config.json /
  special_tokens_map.json, the model's ids from config.json."""
  for name in HF_TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      if name == "tokenizer.json":
        return HuggingFaceTokenizer(directory, path)
      return HuggingFaceSentencePieceTokenizer(directory, path)
  raise ValueError(f"{directory!r} has no tokenizer: looked for {', '.join(HF_TOKENIZER_FILES)}")


def make_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `data.tokenizer`: `byte`, `spm:<path to .model>` or
  `hf:<directory of a Hugging Face model>`."""
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("hf:"):
    directory = os.path.expanduser(spec[len("hf:") :])
    if not os.path.isdir(directory):
      raise ValueError(
        f"data.tokenizer={spec!r}: no such directory {directory!r}; {_ALLOWED_SPECS}"
      )
    try:
      return hf_tokenizer(directory)
    except Exception as e:  # the libraries raise plain exceptions on a bad file
      raise ValueError(f"data.tokenizer={spec!r}: {e}") from e
  if spec.startswith("spm:"):
    path = os.path.expanduser(spec[len("spm:") :])
    if not os.path.isfile(path):
      raise ValueError(f"data.tokenizer={spec!r}: no such file {path!r}; {_ALLOWED_SPECS}")
    try:
      return SentencePieceTokenizer(path)
    except (OSError, RuntimeError, ValueError) as e:
      raise ValueError(f"data.tokenizer={spec!r}: {e}; {_ALLOWED_SPECS}") from e
  raise ValueError(f"data.tokenizer={spec!r}: unknown tokenizer; {_ALLOWED_SPECS}")
