"""The wiring table (train/families.py): every (family, task) builds, abstractly, and its
training batches have the layout its objective reads; an unknown name is refused naming its
key. Batches come from each task's own iterator on small local files; models are only
traced (jax.eval_shape), never compiled."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from modeling.transformer import EncoderDecoder, Transformer
from modeling.vocab import Specials
from tests.tiny_models import abstract_init, tiny_config
from train import families
from train.data.make_seq2seq_task import make_records
from train.data.tokenizers import ByteTokenizer

ROWS, SEQ_LEN = 2, 32
PRESET = {"decoder": "gpt", "encoder": "bert", "encdec": "t5", "diffusion": "mdlm"}
PAIRS = [(family, task) for family, fam in families.FAMILIES.items() for task in fam.tasks]
# The arrays a labeled task's objective reads besides tokens, positions, segment_ids and
# token_types (each [rows, seq_len]); *_b: the second text of a pair.
LABELED_KEYS = {
  "classify": {"label": (), "weight": ()},
  "regress": {"label": (), "weight": ()},
  "ner": {"labels": (SEQ_LEN,), "dropped": None, "weight": ()},
  "embed": {
    "label": (),
    "weight": (),
    **{f"{k}_b": (SEQ_LEN,) for k in ("tokens", "positions", "segment_ids", "token_types")},
  },
}
TEXT_KEYS = ("tokens", "positions", "segment_ids", "token_types")
# DPO's rows: each side of a pair (tokens, answer mask, segment ids), and the pair's weight
PAIR_KEYS = {
  **{f"{side}_{k}": (SEQ_LEN,) for side in ("chosen", "rejected") for k in ("tokens", "mask")},
  **{f"{side}_segment_ids": (SEQ_LEN,) for side in ("chosen", "rejected")},
  "weight": (),
}


def write_jsonl(path, records) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return f"jsonl:{path}"


def task_config(family: str, task: str, tmp_path):
  """The family's preset at size=tiny for `task`, on a small local file of that task's data."""
  preset = PRESET[family]
  options = "" if preset == "mdlm" or (preset == "gpt" and task == "pretrain") else f"task={task}"
  if task == "distill":  # the pretraining preset, with a teacher of its own shape (its config
    options = ""  # alone: building the model and objective reads no weights)
    teacher = tiny_config(PRESET[family], seq_len=SEQ_LEN)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(teacher.to_json_best_effort())
  c = tiny_config(PRESET[family], options, seq_len=SEQ_LEN, shuffle_window=4)
  if task == "distill":
    c.task.update(name="distill", teacher=str(tmp_path / "teacher"))
  words = "the cat sat on a mat and the dog ran to it".split()
  if task in ("pretrain", "distill"):
    (tmp_path / "docs.txt").write_text(" ".join(words * 40))
    c.data.name = f"text:{tmp_path / 'docs.txt'}"
  elif task == "seq2seq":
    c.data.name = write_jsonl(tmp_path / "s.jsonl", make_records("reverse", 20, 4, 10, "abcd", 0))
    c.data.target_len = 16
  elif task in ("classify", "regress"):
    records = [
      {"text": " ".join(words[i : i + 3]), "other": words[i], "label": i % 2} for i in range(8)
    ]
    c.data.update(name=write_jsonl(tmp_path / "l.jsonl", records), text_field="text")
    if task == "regress":
      c.task.text_pair_field = "other"
  elif task == "ner":
    records = [{"tokens": words[i : i + 3], "ner": ["B-X", "O", "I-X"]} for i in range(8)]
    c.data.name = write_jsonl(tmp_path / "n.jsonl", records)
    c.task.tag_names = "O,B-X,I-X"
  elif task == "sft":  # the completion template: each conversation ends at EOS
    records = [{"prompt": " ".join(words[i : i + 2]), "response": words[i + 2]} for i in range(9)]
    c.data.name = write_jsonl(tmp_path / "c.jsonl", records)
    c.task.template = "completion"
    c.data.target_len = 16
  elif task == "dpo":
    records = [
      {"prompt": words[i], "chosen": words[i + 1], "rejected": words[i + 2]} for i in range(9)
    ]
    c.data.name = write_jsonl(tmp_path / "p.jsonl", records)
    c.task.template = "completion"
  elif task == "embed":
    records = [{"s1": words[i], "s2": words[i + 1], "score": float(i % 5)} for i in range(8)]
    c.data.update(name=write_jsonl(tmp_path / "e.jsonl", records), text_field="s1")
    c.task.update(text_pair_field="s2", label_field="score", min_score=0.0)  # all positive
  return c


def test_every_family_has_a_preset_here():
  assert set(PRESET) == set(families.FAMILIES)


@pytest.mark.parametrize("family, task", PAIRS, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_each_task_builds_and_its_batches_are_what_its_objective_reads(family, task, tmp_path):
  config = task_config(family, task, tmp_path)
  wiring = families.resolve(config)
  assert wiring.family is families.FAMILIES[family]
  assert wiring.task is families.FAMILIES[family].tasks[task]
  tokenizer = ByteTokenizer()
  model, objective = wiring.build(config, tokenizer)
  assert type(model) is (EncoderDecoder if family == "encdec" else Transformer)
  assert model.cfg.head == wiring.task.head

  batch = next(iter(wiring.task.train_iterator(config, tokenizer, batch_size=ROWS, seed=0)))
  if wiring.task.batch_lengths is None:
    with pytest.raises(ValueError, match=re.escape(f"task.name={task!r}")):
      wiring.batch_lengths(config)
    want = {} if task == "dpo" else {k: (ROWS, SEQ_LEN) for k in TEXT_KEYS}
    for key, row_shape in (PAIR_KEYS if task == "dpo" else LABELED_KEYS[task]).items():
      want[key] = (ROWS, *batch[key].shape[1:]) if row_shape is None else (ROWS, *row_shape)
    assert {k: v.shape for k, v in batch.items()} == want
  else:
    lengths = wiring.batch_lengths(config)
    assert {k: v.shape for k, v in batch.items()} == {k: (ROWS, n) for k, n in lengths.items()}
    assert all(v.dtype == np.int32 for v in batch.values())
    assert lengths["tokens"] == SEQ_LEN
  assert wiring.target_len(config) == (batch["targets"].shape[1] if family == "encdec" else 0)

  params = nn.unbox(abstract_init(model.cfg, type(model)))
  # DPO's reference weights, a distillation teacher's (here of the student's shape): the
  # step passes them
  frozen = wiring.trainable(config).reference or wiring.task.teacher
  for deterministic in (False, True):  # the train step's call, and evaluation's
    out = jax.eval_shape(
      lambda p, b, r, d=deterministic: objective(
        model, p, b, r, d, **({"reference": p} if frozen else {})
      ),
      params,
      batch,
      jax.random.key(1),
    )
    assert out["loss_sum"].shape == out["weight"].shape == ()
    rows = {k: v.shape for k, v in out.items() if k.startswith("rows/")}
    assert all(shape[0] == ROWS for shape in rows.values()), rows


class OwnIds:
  """A tokenizer with a layout of its own: bytes at ids 1..256, its special ids after them
  (none at fourfold's 0..7), documents starting with BOS as Llama's do."""

  vocab_size = 264
  is_byte_level = False
  specials = Specials(
    pad=257,
    eos=258,
    bos=259,
    mask=260,
    cls=261,
    sep=262,
    unk=263,
    decoder_start=257,
    add_bos=True,
    special_ranges=((257, 264),),
  )

  def encode(self, text):
    return np.frombuffer(str(text).encode(), np.uint8).astype(np.int32) + 1

  def decode(self, ids):
    return bytes(int(i) - 1 for i in ids if 1 <= i <= 256).decode(errors="replace")


# Where each task's data puts the tokenizer's ids: (ids that must appear, ids that end each
# segment of tokens (and targets), the id of padding tokens)
S = OwnIds.specials
FRAMING = {
  ("decoder", "pretrain"): ({S.bos, S.eos}, None, None),
  ("diffusion", "pretrain"): ({S.bos, S.eos}, None, None),
  ("encoder", "pretrain"): ({S.cls, S.sep}, None, None),
  **{("encoder", t): ({S.cls, S.sep}, S.sep, S.pad) for t in LABELED_KEYS},
  ("encdec", "pretrain"): ({S.eos}, S.eos, None),
  ("encdec", "seq2seq"): ({S.eos}, S.eos, None),
  ("encdec", "sft"): ({S.eos}, S.eos, None),
  ("decoder", "sft"): ({S.eos}, S.eos, None),
  ("decoder", "dpo"): ({S.eos}, S.eos, None),
}
FRAMING.update({(f, "distill"): FRAMING[f, "pretrain"] for f in PRESET})


@pytest.mark.parametrize("family, task", PAIRS, ids=[f"{f}-{t}" for f, t in PAIRS])
def test_each_task_frames_its_data_with_the_tokenizers_own_ids(family, task, tmp_path):
  """Documents, labeled rows and text-to-text examples get the tokenizer's BOS / EOS / CLS /
  SEP / pad, none of fourfold's ids (1..6 are bytes no text here holds)."""
  config = task_config(family, task, tmp_path)
  if task in ("pretrain", "distill"):  # short documents, so that a batch holds their boundaries
    words = "the cat sat on a mat and the dog ran to it".split()
    docs = [{"text": " ".join(words[i % 9 : i % 9 + 3])} for i in range(40)]
    config.data.update(name=write_jsonl(tmp_path / "docs.jsonl", docs), text_field="text")
  wiring = families.resolve(config)
  tok = OwnIds()
  wiring.build(config, tok)  # the objective accepts the tokenizer's ids
  batch = next(iter(wiring.task.train_iterator(config, tok, batch_size=ROWS, seed=0)))
  present, ends, pad = FRAMING[family, task]
  sides = [("tokens", "segment_ids")]
  if task == "dpo":
    sides = [(f"{s}_tokens", f"{s}_segment_ids") for s in ("chosen", "rejected")]
  if family == "encdec":
    sides.append(("targets", "targets_segment_ids"))
  for key, seg_key in sides:
    tokens_BL, seg_BL = batch[key], batch[seg_key]
    real_N = tokens_BL[seg_BL > 0]
    assert not np.isin(real_N, range(1, 7)).any(), real_N
    if key.endswith("tokens"):
      assert present <= set(real_N.tolist())
    if ends is not None:  # each segment's last token
      last_BL = (seg_BL > 0) & (seg_BL != np.pad(seg_BL[:, 1:], ((0, 0), (0, 1))))
      assert (tokens_BL[last_BL] == ends).all()
    if pad is not None:
      assert (tokens_BL[seg_BL == 0] == pad).all() and (seg_BL == 0).any()
  if (family, task) in (("decoder", "pretrain"), ("diffusion", "pretrain")):
    flat_N = batch["tokens"].reshape(-1)
    after_eos = flat_N[1:][flat_N[:-1] == S.eos]
    assert (after_eos == S.bos).all()  # the next document starts with BOS


@pytest.mark.parametrize(
  "preset, key, value, pattern",
  [
    ("gpt", "model.family", "rnn", r"model\.family='rnn': allowed \['decoder', 'diffusion', "),
    ("gpt", "task.name", "classify", r"task\.name='classify': model\.family='decoder' allows"),
    ("bert", "task.name", "seq2seq", r"task\.name='seq2seq': model\.family='encoder' allows"),
  ],
)
def test_resolve_refuses_an_unknown_name_naming_its_key(preset, key, value, pattern):
  config = tiny_config(preset)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=pattern):
    families.resolve(config)
