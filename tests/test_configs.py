"""Derived config keys follow the keys they come from: through `--config.x=y` overrides (the
way `train.main` reads them), through a run's config.json, and to the data a task reads."""

from __future__ import annotations

import json
import os

import pytest
from absl import flags
from ml_collections import config_flags

import configs
from configs import gpt, llama, mdlm
from configs.ablations import bitnet_vs_fp
from train.data.labeled import load_labeled
from train.data.tokenizers import ByteTokenizer
from train.trainer import saved_config
from train.validation import validate_config

PRESETS = os.path.dirname(configs.__file__)


def from_command_line(*args: str):
  """The config `--config=<preset> <args>` gives, parsed as train.main parses it."""
  preset, *overrides = args
  argv = ["prog", f"--config={os.path.join(PRESETS, preset)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_kv_heads_and_mlp_width_follow_overrides():
  c = from_command_line(
    "gpt.py:size=tiny", "--config.model.num_heads=6", "--config.model.d_model=384"
  )
  assert (c.model.num_heads, c.model.num_kv_heads) == (6, 6)
  assert c.model.d_ff == 4 * 384
  validate_config(c)  # was: model.num_heads=6: must be divisible by model.num_kv_heads=4


@pytest.mark.parametrize("order", ["kv_first", "heads_first"])
def test_a_derived_key_set_itself_stays_set(order):
  kv, heads = "--config.model.num_kv_heads=2", "--config.model.num_heads=8"
  c = from_command_line("gpt.py:size=tiny", *([kv, heads] if order == "kv_first" else [heads, kv]))
  assert (c.model.num_heads, c.model.num_kv_heads) == (8, 2)  # one-way: kv never moves heads
  c = from_command_line("gpt.py:size=tiny", "--config.model.d_ff=100", "--config.model.d_model=32")
  assert (c.model.d_model, c.model.d_ff) == (32, 100)


def test_presets_that_set_gqa_keep_it():
  c = llama.get_config("size=XS")
  c.model.num_heads = 8
  assert c.model.num_kv_heads == 2 and c.model.d_ff == 352
  c = bitnet_vs_fp.get_config("size=2x64,quant=none")  # llama XS underneath, made MHA
  c.model.num_heads = 4
  assert c.model.num_kv_heads == 4


@pytest.mark.parametrize("size", list(gpt.SIZES))
def test_mha_presets_derive_kv_heads_and_width_at_every_size(size):
  for c in (gpt.get_config(f"size={size}"), mdlm.get_config(f"size={size}")):
    assert c.model.num_kv_heads == c.model.num_heads
    assert c.model.d_ff == 4 * c.model.d_model


def test_albert_embedding_width_follows_d_model():
  c = from_command_line("bert.py:size=tiny,arch=albert", "--config.model.d_model=256")
  assert c.model.embed_dim == 64
  c = from_command_line("bert.py:size=tiny,arch=albert", "--config.model.d_model=1024")
  assert c.model.embed_dim == 128


def test_saved_config_keeps_the_resolved_values():
  c = from_command_line(
    "gpt.py:size=tiny", "--config.model.num_heads=6", "--config.model.d_model=384"
  )
  loaded = saved_config(json.loads(c.to_json_best_effort()))
  assert (loaded.model.num_heads, loaded.model.num_kv_heads, loaded.model.d_ff) == (6, 6, 1536)
  llama_run = saved_config(json.loads(llama.get_config("size=XS").to_json_best_effort()))
  assert (llama_run.model.num_heads, llama_run.model.num_kv_heads) == (4, 2)  # GQA kept
  validate_config(loaded)


@pytest.mark.parametrize(
  "task, name, key, want",
  [
    ("classify", "glue/sst2", "data.text_field", "sentence"),
    ("classify", "glue/sst2:2.0.0", "data.text_field", "sentence"),
    ("classify", "jsonl:x.jsonl", "data.text_field", "text"),
    ("classify", "imdb_reviews", "data.text_field", "text"),
  ],
)
def test_task_fields_follow_the_source(task, name, key, want):
  c = from_command_line(f"bert.py:size=tiny,task={task}", f"--config.data.name={name}")
  section, _, leaf = key.partition(".")
  assert c[section][leaf] == want
  c = from_command_line(
    f"bert.py:size=tiny,task={task}", f"--config.{key}=mine", f"--config.data.name={name}"
  )
  assert c[section][leaf] == "mine"  # a field given on the command line wins


def test_classify_reads_a_jsonl_file_of_text_and_label_with_no_field_flags(tmp_path):
  path = tmp_path / "rows.jsonl"
  records = [{"text": f"example {i}", "label": i % 2} for i in range(10)]
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  c = from_command_line(
    "bert.py:size=tiny,task=classify",
    f"--config.data.name=jsonl:{path}",
    "--config.data.seq_len=16",
  )
  rows = load_labeled(c, ByteTokenizer(), "train", regression=False)
  assert rows["label"].tolist() == [r["label"] for r in records[:9]]  # the last 10% held out
  assert rows["segment_ids"].sum(1).tolist() == [len("example 0") + 2] * 9  # [CLS] text [SEP]


def test_the_dpo_losses_ablation_validates_at_every_grid_point(tmp_path, monkeypatch):
  from configs.ablations import dpo_losses
  from train.validation import validate_config

  for split in ("train", "eval"):
    (tmp_path / f"{split}.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
  monkeypatch.setattr(dpo_losses, "PAIRS", str(tmp_path))
  seen = set()
  for arg in dpo_losses.GRID:
    config = dpo_losses.get_config(arg)
    validate_config(config)
    seen.add(config.task.loss)
  assert seen == set(dpo_losses.LOSSES)
