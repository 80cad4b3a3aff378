"""Constrained decoding (eval/constrain.py, the Automaton in modeling/decoding.py): each
token's bytes against the tokenizer's own text, the device tables against outlines-core's
index for every state, constrained greedy decoding against a float64 NumPy loop that masks
with outlines-core's index step by step, and samples at temperature 1 from random tiny
models (decoder: sampling, greedy, beams, past the context; encdec: sampling and beams)
that all match their regex or validate against their schema."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import outlines_core
import pytest

from eval import constrain
from modeling import decoding
from modeling.transformer import EncoderDecoder, Transformer
from tests.tiny_models import abstract_init, draw_params, random_params, tiny
from train import families
from train.data import train_spm
from train.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
BYTES = ByteTokenizer()
STOP = BYTES.specials.stop_ids  # (EOS,)
CODE = r"[A-Z]{2}-[0-9]{3}( \((x|y|z)[0-9]?\))?"
SCHEMA = {  # every field bounded, so a random model finishes within its tokens
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 5},
    "code": {"type": "string", "pattern": "^[0-9]{1,3}$"},
    "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
  },
  "required": ["name", "code", "ok", "color"],
}


@functools.cache
def spm_tokenizer(directory: str) -> SentencePieceTokenizer:
  """A fourfold SentencePiece model trained on a few words (0.1 s)."""
  words = ["def", "class", "return", "value", "print", "x1", "é", "Zürich"]
  docs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
  path = os.path.join(directory, "tok.model")
  return SentencePieceTokenizer(train_spm.train_sentencepiece(docs, path, 300, 10**6))


def tokenizer_of(name: str, tmp_path_factory):
  if name == "byte":
    return BYTES
  if name == "spm":
    return spm_tokenizer(str(tmp_path_factory.getbasetemp()))
  return make_tokenizer(f"hf:{os.path.join(FIXTURES, name)}")


def width(tokenizer) -> int:
  """The model's logits: the tokenizer's ids, or more (padded embedding rows)."""
  return max(tokenizer.vocab_size, getattr(tokenizer, "model_vocab_size", 0))


# ---- each token's bytes


TOKENIZERS = ["byte", "spm", "gpt2", "llama3", "phi3", "llama2", "t5"]
TEXTS = ["def f(x):\n\treturn x * 2  # ok", "Zürich 日本 😀 é", "  two  spaces\n\nend "]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_token_bytes_spell_the_tokenizers_own_text(name, tmp_path_factory):
  """Joined, the bytes of a text's tokens are the tokenizer's decoded text (a SentencePiece
  decoder drops the dummy prefix's leading space); special ids emit nothing."""
  tok = tokenizer_of(name, tmp_path_factory)
  pieces = constrain.token_bytes(tok, width(tok))
  assert len(pieces) == width(tok)
  for text in TEXTS:
    ids = tok.encode(text)
    ids = ids[~tok.specials.is_special(ids)]  # T5's unknown id: no bytes, and decoded as none
    joined = b"".join(pieces[i] for i in ids.tolist())
    decoded = tok.decode(ids).encode("utf-8")
    assert joined in (decoded, b" " + decoded), (joined, decoded)
  special = [i for i in range(tok.vocab_size) if tok.specials.is_special(i)]
  assert special and all(pieces[i] is None for i in special)
  assert all(p is None for p in pieces[tok.vocab_size :])


def test_a_wordpiece_tokenizer_is_refused_naming_its_decoder():
  tok = make_tokenizer(f"hf:{os.path.join(FIXTURES, 'bert_model')}")
  with pytest.raises(ValueError, match=r"its decoder \(WordPiece\) does not give each token"):
    constrain.token_bytes(tok, tok.vocab_size)


# ---- the device tables against outlines-core's index


def outlines_index(regex: str, pieces) -> outlines_core.Index:
  """outlines-core's own index of the regex matched whole, EOS at the id past the table."""
  groups: dict[bytes, list[int]] = {}
  for i, b in enumerate(pieces):
    if b is not None:
      groups.setdefault(b, []).append(i)
  vocabulary = outlines_core.Vocabulary(len(pieces), groups)
  return outlines_core.Index(constrain.anchored(regex), vocabulary)


def reachable_states(index: outlines_core.Index) -> list[int]:
  """The index's states reachable from its start: the start first, then in order."""
  start = index.get_initial_state()
  seen, todo = {start}, [start]
  while todo:
    for n in index.get_transitions().get(todo.pop(), {}).values():
      if n not in seen:
        seen.add(n)
        todo.append(n)
  return [start, *sorted(seen - {start})]


def device_allowed(c: constrain.Constraint, stop) -> np.ndarray:
  """[S, V] the device's allowed tokens (bitmask unpacked, the stop ids in accepting
  states) of every state."""
  states = jnp.arange(c.next_SV.shape[0], dtype=jnp.int32)
  return np.asarray(decoding.allowed(c.automaton, states, c.next_SV.shape[1], stop))


@pytest.mark.parametrize("name", ["byte", "phi3", "gpt2", "llama2", "spm"])
@pytest.mark.parametrize("kind", ["regex", "schema"])
def test_device_tables_equal_outlines_core_for_every_state(name, kind, tmp_path_factory):
  tok = tokenizer_of(name, tmp_path_factory)
  v = width(tok)
  pieces = constrain.token_bytes(tok, v)
  regex = CODE if kind == "regex" else constrain.schema_regex(SCHEMA, "schema")
  c = constrain.compile_regex(regex, pieces, source="test")
  index = outlines_index(regex, pieces)
  eos, stop = v, tok.specials.stop_ids
  allowed_SV = device_allowed(c, stop)
  # our numbering: outlines' start first, then its other states in order; the dead state last
  order = reachable_states(index)
  assert c.num_states == len(order)  # no state was dropped: each can reach an accepted text
  for ours, theirs in enumerate(order):
    want = set(index.get_allowed_tokens(theirs) or ())
    if eos in want:
      want = (want - {eos}) | set(stop)
    assert set(np.flatnonzero(allowed_SV[ours])) == want
    assert bool(c.final_S[ours]) == index.is_final_state(theirs)
    for t in want - set(stop):
      assert c.next_SV[ours, t] == order.index(index.get_next_state(theirs, t))
    assert np.all(c.next_SV[ours, ~allowed_SV[ours]] == c.num_states)  # the dead state
  assert not allowed_SV[-1].any() and np.all(c.next_SV[-1] == c.num_states)


def accepted_texts(c: constrain.Constraint, limit: int = 8) -> set[bytes]:
  """Every text of at most `limit` tokens the tables accept, by walking them."""
  out, todo = set(), [(0, b"")]
  while todo:
    state, text = todo.pop()
    if c.final_S[state]:
      out.add(text)
    if len(text) < limit:
      for t in np.flatnonzero(c.next_SV[state] != c.num_states):
        todo.append((int(c.next_SV[state, t]), text + c.pieces[t]))
  return out


def test_the_tables_accept_exactly_the_regexs_texts():
  """A finite language, enumerated: texts that extend an accepted one are there too (the
  regex is matched whole, so outlines-core 0.2.14 keeps the transitions out of accepting
  states)."""
  c = constrain.build(BYTES, BYTES.vocab_size, regex=r"(a|abc)( d)?|[xy]z?")
  want = {b"a", b"abc", b"a d", b"abc d", b"x", b"y", b"xz", b"yz"}
  assert accepted_texts(c) == want
  c = constrain.build(BYTES, BYTES.vocab_size, choices=["no", "no way", "n|o (maybe)"])
  assert accepted_texts(c, 12) == {b"no", b"no way", b"n|o (maybe)"}


def test_states_that_cannot_finish_are_dropped():
  """Tokens 'x', 'y' and 'c' (no 'z') for xy*z|xc: outlines-core keeps the loop on 'y' after
  'x', which can never end; the tables drop it, and every path they allow ends accepted.
  Without the 'c' no text is reachable at all: refused."""
  pieces = [None, b"x", b"y", b"c"]
  regex = "xy*z|xc"
  index = outlines_index(regex, pieces)
  after_x = index.get_next_state(index.get_initial_state(), 1)
  assert set(index.get_allowed_tokens(after_x)) == {2, 3}
  c = constrain.compile_regex(regex, pieces, source="--regex='xy*z|xc'")
  allowed_SV = device_allowed(c, (0,))
  assert set(np.flatnonzero(allowed_SV[0])) == {1}
  assert set(np.flatnonzero(allowed_SV[c.next_SV[0, 1]])) == {3}
  assert accepted_texts(c) == {b"xc"}
  assert c.accepts(np.array([1, 3, 0]), (0,)) and not c.accepts(np.array([1]), (0,))
  assert c.text(np.array([1, 3, 0, 3]), (0,)) == "xc"
  with pytest.raises(ValueError, match=r"--regex='xy\*z': no token sequence can satisfy it"):
    constrain.compile_regex("xy*z", pieces, source="--regex='xy*z'")


# ---- refused before decoding


def test_bad_constraints_are_refused_naming_the_flag(tmp_path):
  v = BYTES.vocab_size
  with pytest.raises(ValueError, match=r"--regex='a\(b': not compiled"):
    constrain.build(BYTES, v, regex="a(b")
  with pytest.raises(ValueError, match=r"--regex=.*: no token sequence can satisfy it"):
    constrain.build(BYTES, v, regex=r"a[^\x00-\x{10FFFF}]")
  t5 = make_tokenizer(f"hf:{os.path.join(FIXTURES, 't5')}")  # no byte fallback: no '日'
  with pytest.raises(ValueError, match="no token sequence can satisfy it"):
    constrain.build(t5, width(t5), regex="日本")
  with pytest.raises(ValueError, match=r"--regex, --choices: give at most one constraint"):
    constrain.build(BYTES, v, regex="a", choices=["a", "b"])
  with pytest.raises(ValueError, match=r"--choices=a,,b: a choice is empty"):
    constrain.build(BYTES, v, choices=["a", "", "b"])
  bad = tmp_path / "bad.json"
  bad.write_text('{"type": "frobnicate"}')
  with pytest.raises(ValueError, match=r"--json_schema=.*bad.json: not a JSON schema"):
    constrain.build(BYTES, v, json_schema=str(bad))
  with pytest.raises(ValueError, match=r"--json_schema=.*missing.json: cannot read"):
    constrain.build(BYTES, v, json_schema=str(tmp_path / "missing.json"))
  # [a-z]{100}: 101 states + the dead one, 102 x 264 int32 and the bitmask: 0.1 MiB
  with pytest.raises(ValueError, match=r"101 states; .* over the limit of 0.05 MiB"):
    constrain.build(BYTES, v, regex="[a-z]{100}", max_mib=0.05)
  assert constrain.build(BYTES, v, regex="[a-z]{100}", max_mib=0.2).num_states == 101
  assert constrain.build(BYTES, v) is None


# ---- decoding: a tiny random decoder with byte tokens

CONTEXT = 160
TOKENS = {"regex": 40, "choices": 40, "schema": 150}  # enough for the longest text


@functools.cache
def decoder():
  cfg = tiny("gpt", seq_len=CONTEXT, vocab=BYTES.vocab_size + 3)  # 3 rows past the tokenizer
  return Transformer(cfg), random_params(cfg)


@functools.cache
def constraint(kind: str) -> constrain.Constraint:
  model, _ = decoder()
  v = model.cfg.vocab_size
  if kind == "regex":
    return constrain.build(BYTES, v, regex=CODE)
  if kind == "choices":
    return constrain.build(BYTES, v, choices=["yes", "no", "maybe (a.k.a. 50|50)"])
  return constrain.compile_regex(
    constrain.schema_regex(SCHEMA, "schema"), constrain.token_bytes(BYTES, v), source="schema"
  )


def check(kind: str, texts: list[str]) -> None:
  """Every text matches the constraint as its reader would check it."""
  for text in texts:
    if kind == "schema":
      jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "choices":
      assert text in ("yes", "no", "maybe (a.k.a. 50|50)"), text
    else:
      assert re.fullmatch(CODE, text), text


@functools.cache
def uncached_forward(model):
  """The whole model on one [1, CONTEXT] row, no cache: (params, tokens, segments) -> logits."""
  pos_1L = jnp.arange(CONTEXT)[None]
  return jax.jit(lambda params, t, s: model.apply({"params": params}, t, pos_1L, s)[0])


def masked_greedy_reference(model, params, index, prompt_P, num_tokens, eos) -> list[int]:
  """Greedy decoding without a cache, masked on the host: each step recomputes the whole
  sequence, takes the float64 logits of the last position, keeps what outlines-core's
  index allows in its current state (EOS: the stop id) and moves the index's state."""
  buf_1L = np.zeros((1, CONTEXT), np.int32)
  buf_1L[0, : prompt_P.size] = prompt_P
  forward = uncached_forward(model)
  state, out = index.get_initial_state(), []
  for t in range(prompt_P.size, prompt_P.size + num_tokens):
    seg_1L = (np.arange(CONTEXT) < t)[None].astype(np.int32)
    logits_1LV = forward(params, jnp.asarray(buf_1L), jnp.asarray(seg_1L))
    logits_V = np.asarray(logits_1LV[0, t - 1], np.float64)
    allowed = [STOP[0] if a == eos else a for a in index.get_allowed_tokens(state)]
    masked_V = np.full_like(logits_V, -np.inf)
    masked_V[allowed] = logits_V[allowed]
    tok = int(np.argmax(masked_V))
    out.append(tok)
    if tok == STOP[0]:
      break
    state = index.get_next_state(state, tok)
    buf_1L[0, t] = tok
  return out


@pytest.mark.parametrize("kind", ["regex", "schema"])
def test_constrained_greedy_equals_a_host_masked_reference(kind):
  model, params = decoder()
  c = constraint(kind)
  pieces = constrain.token_bytes(BYTES, model.cfg.vocab_size)
  index = outlines_index(c.regex, pieces)
  prompts = [BYTES.encode(p) for p in ("Co:", "{ab", "zz ")]
  n = TOKENS[kind]
  got_BN = decoding.generate(
    model, params, np.stack(prompts), n, jax.random.key(0), 0.0, eos_id=STOP,
    automaton=c.automaton,
  )  # fmt: skip
  for p, got_N in zip(prompts, got_BN, strict=True):
    want = masked_greedy_reference(model, params, index, p, n, len(pieces))
    assert want[-1] == STOP[0], "the reference did not finish"
    np.testing.assert_array_equal(got_N[: len(want)], want)
    assert not got_N[len(want) :].any()
    check(kind, [c.text(got_N, STOP)])


@pytest.mark.parametrize("kind", ["regex", "schema", "choices"])
def test_samples_at_temperature_1_all_match(kind):
  """64 samples (rows of one batch, each its own draw; the regex's with top-k and top-p
  after the mask): every one is accepted and matches."""
  model, params = decoder()
  c = constraint(kind)
  prompt_BP = np.tile(BYTES.encode("Out: ")[None], (64, 1))
  top_k, top_p = (5, 0.9) if kind == "regex" else (0, 1.0)
  out_BN = decoding.generate(
    model, params, prompt_BP, TOKENS[kind], jax.random.key(0), 1.0, top_k, top_p,
    eos_id=STOP, automaton=c.automaton,
  )  # fmt: skip
  assert all(c.accepts(o, STOP) for o in out_BN)
  texts = [c.text(o, STOP) for o in out_BN]
  check(kind, texts)
  assert len(set(texts)) > (2 if kind == "choices" else 10)  # samples, not one text repeated


def test_constrained_decoding_past_the_context_carries_the_state():
  """Digits and letters alternate, 16 of them after a 3-token prompt, with a 16-token
  context: decoding restarts its cache from the last 8 tokens after 13, and the automaton's
  state goes on from where it was."""
  cfg = tiny("gpt", seq_len=16, vocab=BYTES.vocab_size)
  model, params = Transformer(cfg), random_params(cfg)
  c = constrain.build(BYTES, cfg.vocab_size, regex="([0-9][a-z]){8}")
  prompt_BP = np.tile(BYTES.encode("abc")[None], (8, 1))
  with pytest.warns(UserWarning, match="continues from the last 8 tokens"):
    out_BN = decoding.generate(
      model, params, prompt_BP, 17, jax.random.key(1), 1.0, eos_id=STOP, automaton=c.automaton
    )
  assert np.all(out_BN[:, 16] == STOP[0])
  texts = [c.text(o, STOP) for o in out_BN]
  assert all(re.fullmatch("([0-9][a-z]){8}", t) for t in texts), texts


def test_decoder_beam_search_outputs_match():
  kind = "schema"
  model, params = decoder()
  c = constraint(kind)
  prompt_BP = np.stack([BYTES.encode(p) for p in ("Out:", "Code", "{ab ")])
  out_BN = decoding.generate(
    model, params, prompt_BP, TOKENS[kind], jax.random.key(0), eos_id=STOP,
    automaton=c.automaton, beam_size=3,
  )  # fmt: skip
  assert all(c.accepts(o, STOP) for o in out_BN)
  check(kind, [c.text(o, STOP) for o in out_BN])


# ---- encoder-decoder


@functools.cache
def encdec():
  cfg = tiny("t5", seq_len=CONTEXT, vocab=BYTES.vocab_size)
  return EncoderDecoder(cfg), draw_params(abstract_init(cfg, EncoderDecoder))


@pytest.mark.parametrize("beam", [1, 3])
def test_seq2seq_samples_and_beams_match(beam):
  model, params = encdec()
  c = constrain.build(BYTES, model.cfg.vocab_size, regex=CODE)
  src_BS = np.stack([np.concatenate([BYTES.encode(f"reverse: {i:03d}"), STOP]) for i in range(32)])
  out_BN = decoding.seq2seq_generate(
    model, params, src_BS, 40, jax.random.key(0), 1.0, beam_size=beam, automaton=c.automaton
  )
  assert all(c.accepts(o, STOP) for o in out_BN)
  texts = [c.text(o, STOP) for o in out_BN]
  check("regex", texts)
  assert len(set(texts)) > 5  # each source its own text (sampled: each row its own draw)


# ---- the samplers and generate_until


def test_generate_until_through_each_familys_sampler():
  """The decoder's sampler continues the prompt (shown before the text), the constraint
  decides the text; generate_until cuts it at the first stop string; a diffusion sampler
  refuses a constraint and says why."""
  model, params = decoder()
  c = constraint("regex")
  family = families.FAMILIES["decoder"]
  config = None  # the decoder's sampler reads the config only for --chat
  rng = jax.random.key(3)
  sampled = family.sampler(
    config, model, params, BYTES, "Out: ", 40, rng, constraint=c, temperature=1.0
  )
  assert sampled.before == "Out: " and sampled.accepted and re.fullmatch(CODE, sampled.text)
  shown, calls = family.sample(config, model, params, BYTES, "Out: ", 40, rng, constraint=c)
  assert shown == "Out: " + sampled.text and calls == 40
  cut = sampled.text[3]  # the first digit
  got = constrain.generate_until(
    family, config, model, params, BYTES, "Out: ", rng,
    max_tokens=40, until=[cut, "never"], constraint=c, temperature=1.0,
  )  # fmt: skip
  assert got == sampled.text.split(cut)[0] == sampled.text[:3]
  diffusion = families.FAMILIES["diffusion"]
  with pytest.raises(ValueError, match=r"--regex=.*unmasks positions in any order"):
    diffusion.sampler(None, model, params, BYTES, "x", 4, rng, constraint=c)


# ---- the benchmark


def test_bench_prints_both_rates_and_every_sample_matches():
  cmd = [
    sys.executable, "-m", "bench.constrained_decoding", "--config=configs/gpt.py:size=tiny",
    "--choices=red,green,blue (dark)", "--batch_size=8", "--num_tokens=24", "--rounds=1",
  ]  # fmt: skip
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  last = r.stdout.strip().splitlines()[-1]
  m = re.fullmatch(
    r"tokens_per_sec=(\d+) constrained_tokens_per_sec=(\d+) ratio=([\d.]+) matched=16/16", last
  )
  assert m, last
  assert float(m[3]) == pytest.approx(int(m[2]) / int(m[1]), abs=2e-3)
  # the minimal automaton: start, r, re, g .. gree, b .. blue, ' (' .. 'k', and one end
  assert "--choices=red,green,blue (dark): 18 states, device tables" in r.stdout
  assert "(19 x 264)" in r.stdout
