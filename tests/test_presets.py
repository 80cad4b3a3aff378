"""The published presets are the published models: each has the shape of the transformers
config of the same published model, and exactly transformers' parameter count.

tests/fixtures/hf/param_counts.json holds, for every published preset, the transformers
class, its config and its parameter count (written by tests/fixtures/hf/param_counts.py with
torch, offline); this test reads only the JSON and builds our model as shapes
(`jax.eval_shape`), so it needs no torch and compiles nothing.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import flax.linen as nn
import jax
import pytest

from configs import bert, bloom, deepseek, gpt, llama, palm, phi3, t5
from modeling.transformer import TransformerConfig
from tests.tiny_models import abstract_init
from train.data.tokenizers import ByteTokenizer
from train.validation import validate_config

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "param_counts.json"
COUNTS = json.loads(FIXTURE.read_text())["presets"]


def preset_config(preset: str):
  """The config `--config=configs/<preset>` gives, e.g. preset 'gpt.py:size=124M'."""
  file, _, arg = preset.partition(":")
  return importlib.import_module(f"configs.{file.removesuffix('.py')}").get_config(arg)


def published_presets() -> set[str]:
  """Every published size the preset files declare, as preset strings."""
  names = {f"gpt.py:size={s}" for s in gpt.PUBLISHED}
  names |= {f"llama.py:size={s}" for s in llama.PUBLISHED}
  names |= {f"phi3.py:size={s}" for s in phi3.SIZES}
  names |= {f"bloom.py:size={s}" for s in bloom.PUBLISHED}
  names |= {f"deepseek.py:size={s}" for s in deepseek.PUBLISHED}
  names |= {f"bert.py:arch={a},size={s}" for a, sizes in bert.PUBLISHED.items() for s in sizes}
  names |= {f"t5.py:variant={v},size={s}" for v, sizes in t5.PUBLISHED.items() for s in sizes}
  return names


def in_transformers_keys(config_class: str, c: TransformerConfig) -> dict:
  """Our frozen model config in the keys of the transformers config class."""
  if config_class == "GPT2Config":
    return dict(
      n_layer=c.num_layers,
      n_embd=c.d_model,
      n_head=c.num_heads,
      vocab_size=c.vocab_size,
      n_positions=c.max_len,
      layer_norm_epsilon=c.norm_eps,
      activation_function={"tanh": "gelu_new", "erf": "gelu"}[c.gelu],
      tie_word_embeddings=c.tie_embeddings,
    )
  if config_class in ("LlamaConfig", "Phi3Config"):
    keys = dict(
      num_hidden_layers=c.num_layers,
      hidden_size=c.d_model,
      num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads,
      intermediate_size=c.d_ff,
      vocab_size=c.vocab_size,
      max_position_embeddings=c.max_len,
      rms_norm_eps=c.norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": c.rope.theta},
      tie_word_embeddings=c.tie_embeddings,
    )
    return keys | ({"sliding_window": c.sliding_window} if config_class == "Phi3Config" else {})
  if config_class == "DeepseekV3Config":
    r, mla, moe = c.rope, c.mla, c.moe
    return dict(
      vocab_size=c.vocab_size,
      hidden_size=c.d_model,
      intermediate_size=c.d_ff,
      moe_intermediate_size=moe.expert_d_ff,
      num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads,
      n_shared_experts=moe.num_shared_experts,
      n_routed_experts=moe.num_experts,
      routed_scaling_factor=moe.routed_scaling_factor,
      kv_lora_rank=mla.kv_lora_rank,
      q_lora_rank=mla.q_lora_rank,
      qk_rope_head_dim=mla.qk_rope_head_dim,
      v_head_dim=mla.v_head_dim,
      qk_nope_head_dim=mla.qk_nope_head_dim,
      n_group=moe.n_group,
      topk_group=moe.topk_group,
      num_experts_per_tok=moe.top_k,
      first_k_dense_replace=moe.first_dense_layers,
      max_position_embeddings=c.max_len,
      rms_norm_eps=c.norm_eps,
      tie_word_embeddings=c.tie_embeddings,
      rope_parameters={
        "rope_type": r.scaling,
        "rope_theta": r.theta,
        "factor": r.factor,
        "original_max_position_embeddings": r.original_max_len,
        "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow,
        "mscale": r.mscale,
        "mscale_all_dim": r.mscale_all_dim,
      },
    )
  if config_class == "BloomConfig":
    return dict(
      n_layer=c.num_layers,
      hidden_size=c.d_model,
      n_head=c.num_heads,
      vocab_size=c.vocab_size,
      layer_norm_epsilon=c.norm_eps,
      tie_word_embeddings=c.tie_embeddings,
    )
  if config_class in ("BertConfig", "RobertaConfig"):
    return dict(
      num_hidden_layers=c.num_layers,
      hidden_size=c.d_model,
      num_attention_heads=c.num_heads,
      intermediate_size=c.d_ff,
      vocab_size=c.vocab_size,
      max_position_embeddings=c.max_len + c.position_offset,
      type_vocab_size=c.type_vocab_size,
      layer_norm_eps=c.norm_eps,
      hidden_act={"erf": "gelu", "tanh": "gelu_new"}[c.gelu],
    )
  assert config_class == "T5Config", config_class
  return dict(
    num_layers=c.num_layers,
    num_decoder_layers=c.num_decoder_layers,
    d_model=c.d_model,
    num_heads=c.num_heads,
    d_kv=c.head_dim,
    d_ff=c.d_ff,
    vocab_size=c.vocab_size,
    layer_norm_epsilon=c.norm_eps,
    relative_attention_num_buckets=c.rel_buckets,
    relative_attention_max_distance=c.rel_max_distance,
    feed_forward_proj={"geglu": "gated-gelu", "relu": "relu"}[c.mlp],
    tie_word_embeddings=c.tie_embeddings,
  )


def model_config(preset: str):
  """(validated run config, frozen model config, flax module) of a preset, as train.main
  builds them with the default (byte) tokenizer."""
  config = preset_config(preset)
  wiring = validate_config(config)
  return config, wiring.transformer_config(config, ByteTokenizer().vocab_size), wiring.family.model


def test_every_published_preset_has_a_transformers_count():
  assert published_presets() == set(COUNTS)


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_published_preset_has_the_transformers_config(preset):
  expected = COUNTS[preset]
  _, cfg, _ = model_config(preset)
  ours = in_transformers_keys(expected["config_class"], cfg)
  assert ours == {k: expected["config"][k] for k in ours}


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_published_preset_has_the_transformers_parameter_count(preset):
  _, cfg, module = model_config(preset)
  abstract = abstract_init(cfg, module)
  # transformers keeps DeepSeek-V3's balancing bias (our `expert_bias`) as a buffer
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract))
  count = sum(x.size for path, x in leaves if "expert_bias" not in jax.tree_util.keystr(path))
  assert count == COUNTS[preset]["params"], f"{preset}: {COUNTS[preset]['transformers_class']}"


@pytest.mark.parametrize("preset", sorted(COUNTS))
def test_published_preset_scans_and_trains_within_its_context(preset):
  config, cfg, _ = model_config(preset)
  assert config.model.scan_layers
  assert 128 <= config.data.seq_len <= cfg.max_len


def test_a_published_size_of_another_arch_is_refused_naming_the_archs():
  with pytest.raises(ValueError, match=r"size='base'.*\['bert', 'roberta'\].*arch='modern'"):
    bert.get_config("size=base")
  with pytest.raises(ValueError, match=r"size='large': allowed \[.*'small', 'base'\]"):
    t5.get_config("variant=original,size=large")


@pytest.mark.parametrize("size", sorted(palm.PUBLISHED))
def test_palm_sizes_have_the_papers_parameter_counts(size):
  """PaLM has no transformers class. Its count by hand: per layer q and o (d x h x 256 each),
  one shared k and v (d x 256 each), SwiGLU's three d x 4d matrices and one norm scale; a
  tied 256k-row embedding and the final norm. That equals Table 1's 8.63B, 62.50B, 540.35B
  within one unit of the last printed digit (the table rounds 62.4957B up, 540.3565B down)."""
  _, cfg, module = model_config(f"palm.py:size={size}")
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_init(cfg, module))))
  d, h, k, f = cfg.d_model, cfg.num_heads, 256, 4 * cfg.d_model
  layer = 2 * d * h * k + 2 * d * k + 3 * d * f + d
  assert count == cfg.num_layers * layer + 256_000 * d + d
  assert abs(count - palm.PAPER_PARAMS[size]) < 1e7, f"{count:,}"
