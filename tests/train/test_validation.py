"""Config validation: bad values fail before compiling, naming key, value and what is allowed."""

import os
import re

import ml_collections
import pytest

from configs import bloom, gpt, llama, palm
from modeling.flops import matmul_params
from tests.tiny_models import tiny_config
from train import families, sharding
from train.validation import CHOICES, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(**changes):
  c = gpt.get_config("size=tiny")
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.mark.parametrize("preset", [gpt, llama, bloom, palm])
@pytest.mark.parametrize("size", ["tiny", "XS", "S", "M", "L", "1B"])
def test_every_preset_size_is_valid(preset, size):
  """Validation accepts it and returns its wiring; the model is the size's own."""
  c = preset.get_config(f"size={size}")
  wiring = validate_config(c)
  assert wiring == families.resolve(c) and wiring.family is families.FAMILIES["decoder"]
  cfg = wiring.transformer_config(c, 264)
  assert (cfg.d_model, cfg.num_layers) == (c.model.d_model, c.model.num_layers)
  assert cfg.num_heads * cfg.head_dim == cfg.d_model and cfg.num_heads % cfg.num_kv_heads == 0


@pytest.mark.parametrize("preset", [gpt, llama, bloom, palm])
def test_preset_sizes_grow_in_order(preset):
  sizes = ["tiny", "XS", "S", "M", "L", "1B"]
  params = []
  for size in sizes:
    c = preset.get_config(f"size={size}")
    params.append(matmul_params(families.resolve(c).transformer_config(c, 32000)))
  assert params == sorted(params) and len(set(params)) == len(sizes), dict(
    zip(sizes, params, strict=True)
  )


@pytest.mark.parametrize(
  "changes, pattern",
  [
    (
      {"model.d_model": 100, "model.num_heads": 3},
      r"model\.d_model=100: must be divisible by model\.num_heads=3",
    ),
    (
      {"model.num_heads": 4, "model.num_kv_heads": 3},
      r"model\.num_heads=4: must be divisible by model\.num_kv_heads=3",
    ),
    ({"data.name": "no_such_dataset_xyz"}, r"data\.name='no_such_dataset_xyz'.*pystdlib"),
    ({"data.eval_name": "text:/nonexistent/*.txt"}, r"data\.eval_name='text:/nonexistent/\*\.txt'"),
    ({"data.tokenizer": "wordpiece"}, r"data\.tokenizer='wordpiece'.*byte"),
    ({"data.tokenizer": "spm:/nonexistent.model"}, r"data\.tokenizer='spm:/nonexistent\.model'"),
    (
      {"model.family": "rnn"},
      r"model\.family='rnn': allowed \['decoder', 'diffusion', 'encdec', 'encoder'\]",
    ),
    ({"model.norm": "batchnorm"}, r"model\.norm='batchnorm': allowed \['layernorm', 'rmsnorm'\]"),
    (
      {"task.name": "classify"},
      r"task\.name='classify': model\.family='decoder' allows \['distill', 'dpo', 'pretrain', 'sft'\]",
    ),
    (
      {"model.norm_position": "middle"},
      r"model\.norm_position='middle': allowed \['pre', 'post'\]",
    ),
    ({"task.mask_prob": 1.5}, r"task\.mask_prob=1\.5: must be a probability"),
    (
      {"task.mask_token_prob": 0.8, "task.random_token_prob": 0.3},
      r"task\.random_token_prob=0\.3: task\.mask_token_prob \+ task\.random_token_prob must be <= 1",
    ),
    (
      {"model.share_layers": True, "model.scan_layers": False},
      r"model\.share_layers=True: not supported with model\.family='decoder'",
    ),
    ({"model.embed_dim": 16}, r"model\.embed_dim=16: must be 0 or model\.d_model=\d+ with a tied"),
    (
      {"model.share_layers": True, "model.scan_layers": True},
      r"model\.scan_layers=True: must be False with model\.share_layers=True",
    ),
    ({"model.quant": "int4"}, r"model\.quant='int4': allowed"),
    (
      {"train.batch_size": 6, "train.grad_accum": 4},
      r"train\.batch_size=6: must be divisible by train\.grad_accum=4",
    ),
    ({"train.steps": 0}, r"train\.steps=0: must be > 0"),
    (
      {"train.batch_size": 16, "data.shards": 3},
      r"data\.shards=3: allowed: a positive divisor of the global batch of 16 rows",
    ),
    ({"data.shards": 0}, r"data\.shards=0: must be > 0"),
    (
      {"data.doc_separator": "<|endoftext|>"},
      r"data\.doc_separator='<\|endoftext\|>': applies to text:<glob> sources only; "
      r"data\.name='pystdlib'",
    ),
    ({"data.span_bytes": 0}, r"data\.span_bytes=0: must be > 0"),
    ({"train.ema_decay": 1.0}, r"train\.ema_decay=1\.0: must be in \[0, 1\)"),
    ({"train.quant_warmup_steps": -1}, r"train\.quant_warmup_steps=-1: must be >= 0"),
    ({"train.quant_warmup_steps": 10}, r"train\.quant_warmup_steps=10: blends .* set model\.quant"),
    (
      {"model.quant": "bitnet158", "train.quant_warmup_steps": 10**9},
      r"train\.quant_warmup_steps=1000000000: must be at most train\.steps=",
    ),
    ({"train.quant_warmup_shape": "exp"}, r"train\.quant_warmup_shape='exp': allowed \['linear'"),
    ({"train.profile_steps": -1}, r"train\.profile_steps=-1: must be >= 0"),
    (
      {"train.profile_steps": 5, "train.profile_start": 0},
      r"train\.profile_start=0: must be a step of the run, 1 to train\.steps=",
    ),
    ({"model.max_len": 8}, r"model\.max_len=8: must be 0 or >= data\.seq_len"),
    ({"task.estimator": "exact"}, r"task\.estimator='exact': allowed \['time', 'count'\]"),
    (
      {"task.estimator": "count", "model.time_conditioning": True},
      r"task\.estimator='count': .* needs model\.time_conditioning=False",
    ),
    (
      {"model.attention_impl": "splash", "data.seq_len": 200},
      r"data\.seq_len=200: must be a multiple of 128",
    ),
    (
      {"model.block": "parallel", "model.norm_position": "post"},
      r"model\.block='parallel': needs model\.norm_position='pre'",
    ),
    (
      {"model.block": "interleaved"},
      r"model\.block='interleaved': allowed \['serial', 'parallel'\]",
    ),
    (
      {"model.embed_norm": True, "model.norm_position": "post"},
      r"model\.embed_norm=True: is for pre-norm stacks",
    ),
    (
      {"model.position": "alibi", "model.attention_impl": "splash", "data.seq_len": 128},
      r"model\.position='alibi': the splash kernel takes no bias",
    ),
  ],
)
def test_bad_values_are_named(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    validate_config(config(**changes))


def test_unknown_key_is_rejected():
  c = config()
  c.train.lerning_rate = 1e-3
  with pytest.raises(ValueError, match=r"train\.lerning_rate=0\.001: unknown key"):
    validate_config(c)


def test_preset_argument_errors():
  with pytest.raises(
    ValueError, match=r"size='XXL': allowed \['tiny', 'XS', 'S', 'M', 'L', '1B', '124M'"
  ):
    gpt.get_config("size=XXL")
  with pytest.raises(ValueError, match=r"'colour=red'.*\['size', 'task'\]"):
    llama.get_config("colour=red")
  with pytest.raises(ValueError, match=r"task='rlhf': allowed \['pretrain', 'sft', 'dpo'\]"):
    llama.get_config("task=rlhf")


@pytest.mark.parametrize(
  "mesh, devices, pattern",
  [
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "product 4 must equal the device count 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, 8, "8 devices do not divide by 3"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "at most one size may be -1"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, 8, r"mesh\.data=0"),
  ],
)
def test_bad_meshes(mesh, devices, pattern):
  with pytest.raises(ValueError, match=pattern):
    sharding.mesh_shape(ml_collections.ConfigDict(mesh), devices)


def test_mesh_minus_one_takes_the_rest():
  assert sharding.mesh_shape(
    ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 2}), 8
  ) == (2, 1, 2, 2)


def test_readme_quickstart_is_two_commands():
  readme = open(os.path.join(REPO, "README.md")).read()
  block = re.search(r"## Quickstart\n.*?```bash\n(.*?)```", readme, re.S).group(1)
  lines = block.strip().splitlines()
  assert len(lines) == 2 and "train.main" in lines[0] and "pytest" in lines[1]


def listed_values(comment: str) -> tuple[str, ...]:
  """The `a | b | c` values of a base.py comment: parentheses dropped, then the last word
  before the first bar and the first word after each."""
  while re.search(r"\([^()]*\)", comment):
    comment = re.sub(r"\([^()]*\)", "", comment)
  first, *rest = comment.split("|")
  return (re.findall(r"\w+", first)[-1], *(re.findall(r"\w+", part)[0] for part in rest))


def test_base_comments_list_exactly_the_allowed_values():
  """Each choice key's comment in configs/base.py names the values validation allows."""
  source = open(os.path.join(REPO, "configs", "base.py")).read()
  for key, allowed in CHOICES.items():
    line = re.search(rf"^\s*c\.{re.escape(key)} = .*?# (.*)$", source, re.M)
    assert line, key
    assert sorted(listed_values(line.group(1))) == sorted(allowed), key


def test_a_tokenizer_without_the_special_tokens_a_task_needs_is_refused():
  """GPT-2's tokenizer has no [MASK] (MLM) and no [CLS] (labeled tasks); diffusion masks with
  fourfold's own ids."""
  import pathlib

  gpt2 = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "hf" / "gpt2"
  for preset, options, message in (
    ("bert", "arch=bert", "no mask token, and masked language modeling"),
    ("bert", "arch=bert,task=classify", "no cls token"),
    ("mdlm", "", "model.family='diffusion' masks and stops"),
  ):
    config = tiny_config(preset, options)
    config.data.tokenizer = f"hf:{gpt2}"
    config.model.vocab_size = 384
    with pytest.raises(ValueError, match=f"data.tokenizer='hf:.*': .*{message}"):
      validate_config(config)
