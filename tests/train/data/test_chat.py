"""Chat templates: golden two-turn renders and their SFT loss masks; JSONL rows and bad input."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from train.data import chat
from train.data.tokenizers import ByteTokenizer, make_tokenizer

TWO_TURNS = [
  {"role": "system", "content": "Be brief."},
  {"role": "user", "content": "Hi"},
  {"role": "assistant", "content": "Hello!"},
  {"role": "user", "content": "2+2?"},
  {"role": "assistant", "content": "4"},
]
# the render with special tokens spelled out, and what the loss covers, per template
GOLDEN = {
  "chatml": (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    ["Hello!", "<|im_end|>", "4", "<|im_end|>"],
  ),
  "phi3": (
    "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n"
    "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n",
    ["Hello!", "<|end|>", "4", "<|end|>"],
  ),
  "llama2": (
    "<bos>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! <eos><bos>[INST] 2+2? [/INST] 4 <eos>",
    ["Hello!", "<eos>", "4", "<eos>"],
  ),
  "plain": (
    "System: Be brief.\nUser: Hi\nAssistant: Hello!<eos>\nUser: 2+2?\nAssistant: 4<eos>\n",
    ["Hello!", "<eos>", "4", "<eos>"],
  ),
  "completion": ("Be brief.HiHello!<eos>2+2?4<eos>", ["Hello!", "<eos>", "4", "<eos>"]),
}


def spelled(ids_N, mask_N, tokenizer, names: dict[int, str]):
  """(the whole render as text with specials named, the masked spans in order)."""

  def text(ids):
    out, run = [], []
    for i in ids:
      if int(i) in names:
        out += [tokenizer.decode(run), names[int(i)]] if run else [names[int(i)]]
        run = []
      else:
        run.append(int(i))
    return "".join(out + ([tokenizer.decode(run)] if run else []))

  spans, start = [], None
  for i, m in enumerate([*mask_N, False]):
    if m and start is None:
      start = i
    if not m and start is not None:
      chunk = ids_N[start:i]
      end = 1 if int(chunk[-1]) in names else 0
      spans += [text(chunk[: len(chunk) - end])] if len(chunk) > end else []
      spans += [text(chunk[-1:])] if end else []
      start = None
  return text(ids_N), spans


@pytest.mark.parametrize("template", chat.TEMPLATES)
def test_golden_two_turn_render_and_mask_with_the_byte_tokenizer(template):
  tok = ByteTokenizer()
  ids = chat.token_ids(template, tok)
  names = {v: k if k.startswith("<|") else f"<{k}>" for k, v in ids.items()}
  tokens_N, mask_N = chat.encode(TWO_TURNS, template, tok, ids)
  whole, spans = spelled(tokens_N, mask_N, tok, names)
  want_text, want_spans = GOLDEN[template]
  assert whole == want_text
  assert spans == want_spans  # exactly each assistant's content and its end token
  reserved = chat.reserved_ids(template, tok.vocab_size)
  assert sorted(reserved.values()) == list(range(264, 264 + len(chat.TEMPLATE_TOKENS[template])))


def test_an_imported_tokenizer_uses_its_own_template_tokens():
  fixture = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "hf" / "phi3"
  tok = make_tokenizer(f"hf:{fixture}")
  ids = chat.token_ids("phi3", tok)
  for name in ("<|user|>", "<|assistant|>", "<|end|>"):
    assert ids[name] < tok.vocab_size and tok.encode(name).tolist() == [ids[name]]
  tokens_N, mask_N = chat.encode(TWO_TURNS[1:], "phi3", tok, ids)
  assert tokens_N[mask_N][-1] == ids["<|end|>"]
  assert tok.decode(tokens_N[mask_N][:-1]).endswith("4")
  gpt2 = make_tokenizer(f"hf:{fixture.parent / 'gpt2'}")
  with pytest.raises(ValueError, match="needs the token '<\\|im_start\\|>'"):
    chat.token_ids("chatml", gpt2)


def test_truncation_cuts_the_prompt_from_the_left_never_the_response():
  tokens_N, mask_N = chat.encode(TWO_TURNS, "plain", ByteTokenizer())
  n = tokens_N.size
  out, out_mask, cut = chat.fit(tokens_N, mask_N, n - 5)
  assert cut and out.size == n - 5
  np.testing.assert_array_equal(out, tokens_N[5:])
  np.testing.assert_array_equal(out_mask, mask_N[5:])
  first_loss = int(np.argmax(mask_N))
  assert chat.fit(tokens_N, mask_N, n - first_loss - 1) is None  # the response would be cut
  assert chat.fit(tokens_N, mask_N, n)[2] is False


def test_jsonl_rows_bad_rows_are_skipped_and_counted_or_named(tmp_path):
  path = tmp_path / "sft.jsonl"
  rows = [
    {"messages": TWO_TURNS},
    {"prompt": "Say hi", "response": "hi"},
    {"messages": [{"role": "user", "content": "no answer"}]},
    {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  convs, counts = chat.read_conversations(str(path))
  assert convs[1] == [
    {"role": "user", "content": "Say hi"},
    {"role": "assistant", "content": "hi"},
  ]
  assert len(convs) == 2 and counts.read == 4
  assert counts.skipped == {"no assistant turn": 1, "role outside system/user/assistant": 1}
  path.write_text(json.dumps({"messages": TWO_TURNS}) + "\n" + json.dumps({"text": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"sft.jsonl:2: needs 'messages'"):
    chat.read_conversations(str(path))

  prefs = tmp_path / "dpo.jsonl"
  prefs.write_text(
    "\n".join(
      json.dumps(r)
      for r in (
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
      )
    )
  )
  pairs, counts = chat.read_preferences(str(prefs))
  assert pairs == [
    (
      [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
      [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
    )
  ]
  assert counts.skipped == {"chosen == rejected": 1}
  prefs.write_text(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
  with pytest.raises(ValueError, match=r"dpo.jsonl:1: missing \['rejected'\]"):
    chat.read_preferences(str(prefs))
