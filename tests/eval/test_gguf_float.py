"""GGUF export of float decoders (eval/gguf_export.py write_float): Llama presets as
llama.cpp's `llama`, GPT presets as `gpt2`. Each tensor read back with gguf's reader equals
the fourfold weight it comes from, laid out here independently of the export's code (F32
exactly, F16 as float16 rounds, Q8_0 / Q4_0 within their block bounds); the metadata and
tokenizers; the refusals; and the RoPE row interleave keeps attention scores (NumPy float64
GGML NORM RoPE against fourfold's rotate-half)."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest

from eval import gguf_export
from modeling.rope import Rope, apply_rope
from tests.eval.test_gguf_export import field
from tests.tiny_models import random_params, tiny_config
from train import families
from train.data.tokenizers import ByteTokenizer, make_tokenizer

FIXTURES = "tests/fixtures/hf"
TYPES = ("F32", "F16", "Q8_0", "Q4_0")


def model(preset: str, **model_keys):
  config = tiny_config(preset, seq_len=16)
  config.model.update(model_keys)
  tokenizer = ByteTokenizer()
  cfg = families.resolve(config).transformer_config(config, tokenizer.vocab_size)
  return config, cfg, random_params(cfg), tokenizer


def interleave(rows: np.ndarray, heads: int) -> np.ndarray:
  """Rows of each head reordered i, i + K/2 -> 2i, 2i + 1, written out index by index."""
  k = rows.shape[0] // heads
  order = [h * k + j // 2 + (k // 2) * (j % 2) for h in range(heads) for j in range(k)]
  return rows[order]


def expected_llama(cfg, p) -> dict[str, np.ndarray]:
  """GGUF name -> the [out, in] matrix (or vector) llama.cpp should hold."""
  d = cfg.d_model
  out = {
    "token_embd.weight": p["embed"]["embedding"],
    "output_norm.weight": p["final_norm"]["scale"],
    "output.weight": np.asarray(p["head"]["kernel"]).T,
  }
  for i in range(cfg.num_layers):
    b, g = p[f"block_{i}"], f"blk.{i}."
    a, m = b["attn"], b["mlp"]
    out[g + "attn_norm.weight"] = b["attn_norm"]["scale"]
    out[g + "ffn_norm.weight"] = b["mlp_norm"]["scale"]
    out[g + "attn_q.weight"] = interleave(
      np.asarray(a["query"]["kernel"]).reshape(d, -1).T, cfg.num_heads
    )
    out[g + "attn_k.weight"] = interleave(
      np.asarray(a["key"]["kernel"]).reshape(d, -1).T, cfg.num_kv_heads
    )
    out[g + "attn_v.weight"] = np.asarray(a["value"]["kernel"]).reshape(d, -1).T
    out[g + "attn_output.weight"] = np.asarray(a["out"]["kernel"]).reshape(-1, d).T
    for ours, theirs in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
      out[g + theirs + ".weight"] = np.asarray(m[ours]["kernel"]).T
  return out


def expected_gpt2(cfg, p) -> dict[str, np.ndarray]:
  d = cfg.d_model
  out = {
    "token_embd.weight": p["embed"]["embedding"],
    "position_embd.weight": p["pos_embedding"],
    "output_norm.weight": p["final_norm"]["scale"],
    "output_norm.bias": p["final_norm"]["bias"],
  }
  for i in range(cfg.num_layers):
    b, g = p[f"block_{i}"], f"blk.{i}."
    a, m = b["attn"], b["mlp"]
    for ours, theirs in (("attn_norm", "attn_norm"), ("mlp_norm", "ffn_norm")):
      out[g + theirs + ".weight"] = b[ours]["scale"]
      out[g + theirs + ".bias"] = b[ours]["bias"]
    qkv = [np.asarray(a[n]["kernel"]).reshape(d, -1) for n in ("query", "key", "value")]
    out[g + "attn_qkv.weight"] = np.concatenate(qkv, 1).T
    out[g + "attn_qkv.bias"] = np.concatenate(
      [np.asarray(a[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]
    )
    out[g + "attn_output.weight"] = np.asarray(a["out"]["kernel"]).reshape(-1, d).T
    out[g + "attn_output.bias"] = a["out"]["bias"]
    for ours, theirs in (("up", "ffn_up"), ("down", "ffn_down")):
      out[g + theirs + ".weight"] = np.asarray(m[ours]["kernel"]).T
      out[g + theirs + ".bias"] = m[ours]["bias"]
  return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """(preset, type) -> (cfg, params, GGUF path), written once for the module."""
  out = {}
  for preset in ("llama", "gpt"):
    config, cfg, params, tokenizer = model(preset)
    for t in TYPES:
      path = str(tmp_path_factory.mktemp("gguf") / f"{preset}_{t}.gguf")
      gguf_export.write_float(config, cfg, params, tokenizer, path, t)
      out[preset, t] = cfg, params, path
  return out


def check_values(got: np.ndarray, want: np.ndarray, t: str, name: str) -> None:
  want = np.asarray(want, np.float32).reshape(got.shape)
  if t == "F32" or want.ndim == 1 or name == "position_embd.weight":
    np.testing.assert_array_equal(got, want, err_msg=name)
  elif t == "F16":
    np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
  else:  # per block of 32 along each row: Q8_0 rounds to amax / 127 steps, Q4_0 to amax / 8
    blocks = want.reshape(want.shape[0], -1, 32)
    step = np.abs(blocks).max(-1, keepdims=True) / (127 if t == "Q8_0" else 8)
    err = np.abs(got.reshape(blocks.shape) - blocks)
    # round to nearest (half a step), plus float16's rounding of the scale; Q4_0's grid
    # stops at 7 steps on the side of the block's largest value, so that value may move a step
    bound = step * (0.57 if t == "Q8_0" else 1.01)
    assert (err <= bound + 1e-7).all(), name
    assert err.mean() < 0.3 * step.mean(), name


@pytest.mark.parametrize("t", TYPES)
@pytest.mark.parametrize("preset", ["llama", "gpt"])
def test_tensors_read_back_as_fourfold_weights(exports, preset, t):
  cfg, params, path = exports[preset, t]
  want = (expected_llama if preset == "llama" else expected_gpt2)(cfg, params)
  reader = gguf.GGUFReader(path)
  by_name = {x.name: x for x in reader.tensors}
  assert set(by_name) == set(want)
  for name, x in by_name.items():
    w = np.asarray(want[name], np.float32)
    matrix = w.ndim == 2 and name != "position_embd.weight"
    assert x.tensor_type.name == (t if matrix else "F32"), name
    assert tuple(int(n) for n in x.shape) == w.shape[::-1], name  # ne0 (the input) first
    got = gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float32)
    check_values(got, w, t if matrix else "F32", name)


def test_metadata(exports):
  cfg, _, path = exports["llama", "Q8_0"]
  r = gguf.GGUFReader(path)
  assert field(r, "general.architecture") == "llama"
  assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
  assert field(r, "llama.block_count") == cfg.num_layers
  assert field(r, "llama.attention.head_count") == cfg.num_heads
  assert field(r, "llama.attention.head_count_kv") == cfg.num_kv_heads < cfg.num_heads
  assert field(r, "llama.rope.dimension_count") == cfg.head_dim
  assert field(r, "llama.rope.freq_base") == cfg.rope.theta
  assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
  assert field(r, "llama.context_length") == cfg.max_len
  assert field(r, "tokenizer.ggml.model") == "llama" and not field(
    r, "tokenizer.ggml.add_bos_token"
  )
  assert len(field(r, "tokenizer.ggml.tokens")) == 264
  cfg, _, path = exports["gpt", "F16"]
  r = gguf.GGUFReader(path)
  assert field(r, "general.architecture") == "gpt2"
  assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.norm_eps)
  assert field(r, "gpt2.context_length") == cfg.max_len == 16  # the position table's rows


def test_rope_interleave_keeps_attention_scores():
  """Scores of GGML's NORM RoPE (pairs 2i, 2i + 1, NumPy float64) on the interleaved rows ==
  fourfold's rotate-half RoPE (its own apply_rope, float32) on the original rows, per head."""
  rng = np.random.default_rng(0)
  heads, k, positions = 2, 8, 5
  q, kk = rng.standard_normal((2, positions, heads * k)).astype(np.float32)
  inv = Rope().inv_freqs(k)[0].astype(np.float64)
  pos = np.arange(positions)

  def ours(x):  # fourfold's own apply_rope on [B, L, H, K]
    y = apply_rope(x.reshape(1, positions, heads, k), pos[None], inv, 1.0)
    return np.asarray(y, np.float64)[0]

  def ggml_norm(x):
    x = x.reshape(positions, heads, k // 2, 2)
    ang = pos[:, None, None] * inv[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    return np.stack([x[..., 0] * c - x[..., 1] * s, x[..., 0] * s + x[..., 1] * c], -1).reshape(
      positions, heads, k
    )

  want = np.einsum("qhk,phk->hqp", ours(q), ours(kk))
  perm = gguf_export.interleave_rope_rows(np.eye(heads * k), heads)  # row j picks feature
  got = np.einsum("qhk,phk->hqp", ggml_norm(q @ perm.T), ggml_norm(kk @ perm.T))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(interleave(np.eye(heads * k), heads), perm)


def test_llama3_rope_scaling_is_written_as_frequency_divisors(tmp_path):
  scaling = dict(type="llama3", factor=8.0, original_max_len=8, high_freq_factor=4.0)
  config, cfg, params, tokenizer = model("llama", rope_scaling=scaling)
  path = str(tmp_path / "m.gguf")
  gguf_export.write_float(config, cfg, params, tokenizer, path, "F32")
  t = {x.name: x for x in gguf.GGUFReader(path).tensors}["rope_freqs.weight"]
  plain = Rope(theta=cfg.rope.theta).inv_freqs(cfg.head_dim)[0]
  scaled = cfg.rope.inv_freqs(cfg.head_dim)[0]
  np.testing.assert_allclose(plain / np.asarray(t.data), scaled, rtol=1e-6)
  assert not np.allclose(np.asarray(t.data), 1.0)  # the scaling changes some frequencies


@pytest.mark.parametrize(
  "preset, keys, message",
  [
    ("llama", dict(position="alibi"), r"llama architecture .*model.position='alibi'"),
    ("llama", dict(moe=dict(num_experts=4, top_k=2)), r"model.moe="),
    ("llama", dict(sliding_window=8), r"model.sliding_window=8"),
    ("llama", dict(rope_fraction=0.5), r"model.rope_fraction=0.5: llama.cpp"),
    (
      "llama",
      dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_len=8)),
      r"model.rope_scaling.type='yarn'",
    ),
    ("llama", dict(quant="bitnet158"), r"model.quant='bitnet158'"),
    ("gpt", dict(gelu="erf"), r"model.gelu='erf': llama.cpp's gpt2"),
    ("gpt", dict(tie_embeddings=False), r"gpt2 architecture .*model.tie_embeddings=False"),
    ("gpt", dict(norm="rmsnorm"), r"model.norm='rmsnorm'"),
  ],
)
def test_what_llama_cpp_cannot_compute_is_refused_naming_the_key(preset, keys, message):
  config = tiny_config(preset, seq_len=16)
  config.model.update(keys)
  with pytest.raises(ValueError, match=message):
    gguf_export.check_float_exportable(config, 264, "F16")


def test_types_and_widths_are_checked():
  config = tiny_config("llama", seq_len=16)
  assert gguf_export.check_float_exportable(config, 264, "Q4_0") == "llama"
  with pytest.raises(ValueError, match=r"--gguf_type='TQ2_0': a float model"):
    gguf_export.check_float_exportable(config, 264, "TQ2_0")
  config.model.d_ff = 200
  gguf_export.check_float_exportable(config, 264, "F16")  # any width in float types
  with pytest.raises(ValueError, match=r"model.d_ff=200: must be a multiple of 32"):
    gguf_export.check_float_exportable(config, 264, "Q8_0")
  assert gguf_export.check_float_exportable(tiny_config("gpt", seq_len=16), 264) == "gpt2"


def written_vocab(tmp_path, spec: str) -> gguf.GGUFReader:
  config = tiny_config("llama", seq_len=16)
  config.data.tokenizer = spec
  tok = make_tokenizer(spec)
  path = str(tmp_path / "vocab.gguf")
  w = gguf.GGUFWriter(path, "llama")
  gguf_export.add_tokenizer(w, config, tok, tok.vocab_size + 3)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.close()
  return gguf.GGUFReader(path), tok


@pytest.mark.parametrize("name, pre", [("gpt2", "gpt2"), ("llama3", "llama-bpe")])
def test_byte_level_bpe_tokenizers_map_to_llama_cpp_gpt2(tmp_path, name, pre):
  import json

  r, tok = written_vocab(tmp_path, f"hf:{FIXTURES}/{name}")
  assert field(r, "tokenizer.ggml.model") == "gpt2"
  assert field(r, "tokenizer.ggml.pre") == pre
  tokens = field(r, "tokenizer.ggml.tokens")
  with open(f"{FIXTURES}/{name}/tokenizer.json") as f:
    tj = json.load(f)
  for text, i in list(tj["model"]["vocab"].items())[:50]:
    assert tokens[i] == text
  assert len(tokens) == tok.vocab_size + 3
  merges = field(r, "tokenizer.ggml.merges")
  assert merges[0] == " ".join(tj["model"]["merges"][0]) or merges[0] == tj["model"]["merges"][0]
  assert field(r, "tokenizer.ggml.eos_token_id") == tok.specials.eos


def test_sentencepiece_tokenizer_maps_to_llama_cpp_llama(tmp_path):
  import sentencepiece as spm

  r, tok = written_vocab(tmp_path, f"hf:{FIXTURES}/llama2")
  sp = spm.SentencePieceProcessor(model_file=f"{FIXTURES}/llama2/tokenizer.model")
  assert field(r, "tokenizer.ggml.model") == "llama"
  tokens, scores = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.scores")
  for i in range(sp.get_piece_size()):
    assert tokens[i] == sp.id_to_piece(i) and scores[i] == pytest.approx(sp.get_score(i))
  assert field(r, "tokenizer.ggml.add_space_prefix")
  assert field(r, "tokenizer.ggml.add_bos_token") == tok.specials.add_bos


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused(tmp_path):
  import json
  import shutil

  d = tmp_path / "tok"
  shutil.copytree(f"{FIXTURES}/gpt2", d)
  with open(d / "tokenizer.json") as f:
    tj = json.load(f)
  tj["pre_tokenizer"] = {"type": "Whitespace"}
  with open(d / "tokenizer.json", "w") as f:
    json.dump(tj, f)
  with pytest.raises(ValueError, match=r"data.tokenizer='hf:.*pre_tokenizer is not one llama.cpp"):
    written_vocab(tmp_path, f"hf:{d}")


def test_bitnet_ternary_values_in_ordinary_types(tmp_path):
  """A BitNet model's ternary values written as F16 read back exactly (the scale separate)."""
  from configs import bitnet

  config = bitnet.get_config("size=tiny")
  config.data.seq_len = 16
  tokenizer = ByteTokenizer()
  cfg = families.resolve(config).transformer_config(config, tokenizer.vocab_size)
  cfg = dataclasses.replace(cfg, num_layers=1)
  config.model.num_layers = 1
  params = random_params(cfg)
  path = str(tmp_path / "b.gguf")
  out = gguf_export.write_bitnet(config, cfg, params, tokenizer, path, "F16")
  assert out["bits_per_weight"] == 16
  t = {x.name: x for x in gguf.GGUFReader(path).tensors}["blk.0.ffn_down.weight"]
  got = gguf.quants.dequantize(t.data, t.tensor_type)
  wq, _ = gguf_export.quantize_kernel("bitnet158", params["block_0"]["mlp"]["down"]["kernel"])
  np.testing.assert_array_equal(got, np.asarray(wq).T)
