"""Constrained decoding: a regex, a JSON schema or a list of choices compiled, on the host,
into the token-level automaton the decoding loops follow on the device.

outlines-core builds the automaton over the tokenizer's tokens (each id as the exact bytes
it emits; special ids are never allowed). Its states are renumbered 0..S-2 (0: the start;
states from which no accepted text can be reached are dropped), S-1 is the dead state, and
two tables go to the device as a `modeling.decoding.Automaton`: the next state of every
(state, token), int32 [S, V], and the allowed tokens as a packed bitmask, uint32
[S, ceil(V / 32)]. The stop ids (EOS) are allowed in accepting states only.

    constraint = build(tokenizer, model.cfg.vocab_size, regex=r"[0-9]{3}-[a-z]+")
    family.sampler(config, model, params, tokenizer, prompt, n, rng, constraint=constraint)
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import outlines_core
import sentencepiece as spm
import tokenizers

from modeling.decoding import Automaton, until_stop
from modeling.vocab import NUM_SPECIAL
from train.data.tokenizers import (
  ByteTokenizer,
  HuggingFaceSentencePieceTokenizer,
  HuggingFaceTokenizer,
  SentencePieceTokenizer,
)
from train.families import CONSTRAINT_OPTIONS

MAX_TABLE_MIB = 1024  # the device tables' default limit (eval.sample --max_constraint_mib)


# ---- each token id as the bytes it emits


def _sentencepiece_bytes(sp: spm.SentencePieceProcessor) -> list[bytes | None]:
  """A SentencePiece model's pieces as bytes: '▁' is a space, '<0xAB>' the byte 0xAB;
  control, unknown and unused pieces emit nothing."""
  out: list[bytes | None] = []
  for i in range(sp.get_piece_size()):
    piece = sp.id_to_piece(i)
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
      out.append(None)
    elif sp.is_byte(i):
      out.append(bytes([int(piece[3:5], 16)]))
    else:
      out.append(piece.replace("\u2581", " ").encode("utf-8"))
  return out


def _gpt2_byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet, reversed: the character each byte is written as -> byte."""
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _decoder_types(decoder: dict | None) -> list[str]:
  """The types of a tokenizer.json decoder, a Sequence's flattened."""
  if not decoder:
    return []
  if decoder.get("type") == "Sequence":
    return [t for d in decoder.get("decoders", []) for t in _decoder_types(d)]
  return [str(decoder.get("type"))]


def _tokenizer_json_bytes(path: str) -> list[bytes | None]:
  """A tokenizer.json's tokens as bytes: byte-level BPE (GPT-2, Llama 3) through the byte
  alphabet, SentencePiece-style vocabularies ('▁' for spaces, '<0xAB>' byte fallback) by
  their pieces; added tokens as their text."""
  tok = tokenizers.Tokenizer.from_file(path)
  with open(path, encoding="utf-8") as f:
    types = _decoder_types(json.load(f).get("decoder"))
  vocab = tok.get_vocab(with_added_tokens=True)
  added = tok.get_added_tokens_decoder()
  out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
  if "ByteLevel" in types:
    alphabet = _gpt2_byte_decoder()

    def piece_bytes(piece: str) -> bytes | None:
      if any(c not in alphabet for c in piece):
        return None
      return bytes(alphabet[c] for c in piece)

  elif "Metaspace" in types or "Replace" in types or "ByteFallback" in types:
    fallback = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def piece_bytes(piece: str) -> bytes | None:
      m = fallback.fullmatch(piece)
      if m and "ByteFallback" in types:
        return bytes([int(m.group(1), 16)])
      return piece.replace("\u2581", " ").encode("utf-8")

  else:
    raise ValueError(
      f"{path}: its decoder ({', '.join(types) or 'none'}) does not give each token bytes of "
      "its own (WordPiece joins tokens with spaces); constrained decoding reads byte-level BPE "
      "and SentencePiece-style tokenizers"
    )
  for piece, i in vocab.items():
    out[i] = added[i].content.encode("utf-8") if i in added else piece_bytes(piece)
  return out


def token_bytes(tokenizer, vocab_size: int) -> list[bytes | None]:
  """The bytes each id in [0, vocab_size) emits when generated; None for ids never generated
  under a constraint (special ids, ids past the tokenizer, tokens that emit nothing)."""
  if isinstance(tokenizer, ByteTokenizer):
    table: list[bytes | None] = [None] * NUM_SPECIAL + [bytes([b]) for b in range(256)]
  elif isinstance(tokenizer, SentencePieceTokenizer):
    table = _sentencepiece_bytes(spm.SentencePieceProcessor(model_file=tokenizer.path))
  elif isinstance(tokenizer, HuggingFaceSentencePieceTokenizer):
    sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
    table = _sentencepiece_bytes(sp)  # then the added tokens, as their text
    table += [tokenizer.decode([i]).encode("utf-8") for i in range(len(table), vocab_size)]
  elif isinstance(tokenizer, HuggingFaceTokenizer):
    table = _tokenizer_json_bytes(tokenizer.path)
  else:
    raise ValueError(
      f"{type(tokenizer).__name__}: constrained decoding knows the byte, SentencePiece and "
      "Hugging Face tokenizers"
    )
  table = (table + [None] * vocab_size)[:vocab_size]
  specials = tokenizer.specials
  return [
    None if b == b"" or i >= tokenizer.vocab_size or specials.is_special(i) else b
    for i, b in enumerate(table)
  ]


# ---- the constraint: a regex's automaton over those bytes


@dataclasses.dataclass(frozen=True)
class Constraint:
  """A regex compiled for one tokenizer and vocabulary width: the device automaton, and the
  host's copy of its transitions and each id's bytes to check and decode what it made."""

  regex: str
  source: str  # where it came from, as a flag: --regex=..., --json_schema=..., --choices=...
  automaton: Automaton  # on the device
  next_SV: np.ndarray  # int32 [S, V], the host's copy
  final_S: np.ndarray  # bool [S]
  pieces: tuple[bytes | None, ...]  # the bytes each id emits

  @property
  def num_states(self) -> int:
    """The automaton's states, the dead state excluded."""
    return self.next_SV.shape[0] - 1

  def accepts(self, ids_N, stop_ids) -> bool:
    """Whether the generated ids (up to the first stop id) are an accepted text."""
    state = 0
    for i in until_stop(ids_N, stop_ids).tolist():
      state = int(self.next_SV[state, i])
    return bool(self.final_S[state])

  def text(self, ids_N, stop_ids) -> str:
    """The text of the generated ids up to the first stop id: their bytes, joined (which is
    what the regex matched; a tokenizer's own decode may strip a leading space)."""
    data = b"".join(self.pieces[i] or b"" for i in until_stop(ids_N, stop_ids).tolist())
    return data.decode("utf-8", errors="replace")


def anchored(regex: str) -> str:
  """The regex as a whole-text match: `(?:regex)\\z`. The generated text must match it
  whole; and outlines-core 0.2.14 drops every transition out of a state where the regex
  could already end (`a|abc` generates only `a`; fixed upstream after 0.2.14), unless the
  match can only end at the end of the text."""
  return f"(?:{regex})\\z"


def compile_regex(
  regex: str,
  pieces: Sequence[bytes | None],
  *,
  source: str,
  max_mib: float = MAX_TABLE_MIB,
) -> Constraint:
  """The constraint of `regex` over tokens emitting `pieces[id]` (None: never allowed).
  Refused, naming `source`, when no token sequence satisfies it or when its device tables
  would take more than `max_mib` MiB."""
  v = len(pieces)
  groups: dict[bytes, list[int]] = {}
  for i, b in enumerate(pieces):
    if b is not None:
      groups.setdefault(b, []).append(i)
  eos = v  # outlines-core's EOS: an id past the table (the loops allow the real stop ids)
  try:
    index = outlines_core.Index(anchored(regex), outlines_core.Vocabulary(eos, groups))
  except ValueError as e:  # a regex it cannot parse, or one no token sequence satisfies
    why = "no token sequence can satisfy it" if "incompatible" in str(e) else "not compiled"
    raise ValueError(f"{source}: {why} (outlines-core: {e})") from e
  edges = index.get_transitions()  # {state: {token: next state}}, EOS included
  finals = set(index.get_final_states())
  start = index.get_initial_state()
  after = {s: set(d.values()) - {s} for s, d in edges.items()}
  reached, todo = {start}, [start]
  while todo:
    for n in after.get(todo.pop(), ()):
      if n not in reached:
        reached.add(n)
        todo.append(n)
  # keep the states from which an accepted text can still be reached
  before: dict[int, set[int]] = {}
  for s in reached:
    for n in after.get(s, ()):
      before.setdefault(n, set()).add(s)
  live = reached & finals
  todo = list(live)
  while todo:
    for s in before.get(todo.pop(), ()):
      if s not in live:
        live.add(s)
        todo.append(s)
  if start not in live:
    raise ValueError(f"{source}: no token sequence can satisfy it (no accepted text is reachable)")
  order = [start, *sorted(live - {start})]
  size_s = len(order) + 1
  words = -(-v // 32)
  need = size_s * (v + words) * 4 + size_s
  if need > max_mib * 2**20:
    raise ValueError(
      f"{source}: its automaton has {len(order)} states; the device tables ({size_s} x {v} "
      f"int32 next states and the bitmask) would take {need / 2**20:.0f} MiB, over the limit "
      f"of {max_mib:g} MiB (eval.sample --max_constraint_mib)"
    )
  dead = size_s - 1
  number_of = np.full(max(reached) + 1, dead, np.int32)  # outlines' state -> ours (dead: dropped)
  number_of[order] = np.arange(len(order))
  next_SV = np.full((size_s, v), dead, np.int32)
  for i, s in enumerate(order):
    d = edges.get(s, {})
    tokens = np.fromiter(d.keys(), np.int64, len(d))
    nexts = np.fromiter(d.values(), np.int64, len(d))
    keep = tokens != eos
    next_SV[i, tokens[keep]] = number_of[nexts[keep]]
  bits = np.packbits(
    np.pad(next_SV != dead, ((0, 0), (0, words * 32 - v))), axis=1, bitorder="little"
  )
  mask_SW = bits.view("<u4").astype(np.uint32)
  final_S = np.array([s in finals for s in order] + [False])
  automaton = Automaton(jnp.asarray(next_SV), jnp.asarray(mask_SW), jnp.asarray(final_S))
  return Constraint(regex, source, automaton, next_SV, final_S, tuple(pieces))


# ---- from the flags


def choices_regex(choices: Sequence[str]) -> str:
  """An alternation of the choices as literals."""
  return "(" + "|".join(re.escape(c) for c in choices) + ")"


def schema_regex(schema: str | dict, source: str) -> str:
  """outlines-core's regex of a JSON schema (a JSON text or a dict)."""
  text = schema if isinstance(schema, str) else json.dumps(schema)
  try:
    return outlines_core.json_schema.build_regex_from_schema(text)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source}: not a JSON schema outlines-core can compile ({e})") from e


def build(
  tokenizer,
  vocab_size: int,
  *,
  regex: str | None = None,
  json_schema: str | None = None,
  choices: Sequence[str] | None = None,
  max_mib: float = MAX_TABLE_MIB,
) -> Constraint | None:
  """The constraint eval.sample's flags ask for (None when none is given): a regex, a JSON
  schema file or a list of choices, at most one, over the tokenizer's ids in
  [0, vocab_size) (the model's logits)."""
  given = [
    name
    for name, value in zip(CONSTRAINT_OPTIONS, (regex, json_schema, choices), strict=True)
    if value
  ]
  if len(given) > 1:
    raise ValueError(f"{', '.join('--' + g for g in given)}: give at most one constraint")
  if not given:
    return None
  if regex:
    source, pattern = f"--regex={regex!r}", regex
  elif json_schema:
    source = f"--json_schema={json_schema}"
    try:
      with open(json_schema, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise ValueError(f"{source}: cannot read the schema file ({e})") from e
    pattern = schema_regex(text, source)
  else:
    source = f"--choices={','.join(choices)}"
    if any(c == "" for c in choices):
      raise ValueError(f"{source}: a choice is empty; each must be a non-empty text")
    pattern = choices_regex(choices)
  return compile_regex(pattern, token_bytes(tokenizer, vocab_size), source=source, max_mib=max_mib)


# ---- for lm-evaluation-harness's generate_until


def generate_until(
  family,
  config,
  model,
  params,
  tokenizer,
  context: str,
  rng,
  *,
  max_tokens: int,
  until: Sequence[str] = (),
  constraint: Constraint | None = None,
  **options,
) -> str:
  """One generate_until request: the text the family's sampler generates after `context`
  (at most `max_tokens` tokens, constrained when `constraint` is given), cut before the
  first of the `until` strings. `options` are the sampler's (temperature 0: greedy)."""
  sampled = family.sampler(
    config, model, params, tokenizer, context, max_tokens, rng, constraint=constraint, **options
  )
  text = sampled.text
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text
