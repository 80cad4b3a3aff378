"""GGUF export (eval/gguf_export.py): the file reads back with gguf's reader with the right
types, shapes, exact ternary values, scales, metadata and byte vocabulary."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from configs import bitnet, llama
from eval import gguf_export
from eval.packed import quantize_kernel
from modeling.vocab import NUM_SPECIAL
from train import trainer

LAYERS, D, F = 2, 256, 512


def tiny_bitnet(tfds_dir: str):
  c = bitnet.get_config("size=tiny")
  c.data.tfds_data_dir = tfds_dir
  c.data.seq_len = 16
  c.data.shuffle_window = 8
  c.train.update(
    dict(steps=2, batch_size=2, warmup_steps=0, eval_every=0, checkpoint_every=2, num_samples=0)
  )
  c.train.peak_tflops = 1.0
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("bitnet")
  trainer.run(tiny_bitnet(str(tmp_path_factory.mktemp("tfds"))), str(path))
  return str(path)


def field(reader: gguf.GGUFReader, key: str):
  f = reader.fields[key]
  if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
    if f.types[-1] == gguf.GGUFValueType.STRING:
      return [bytes(f.parts[i]).decode() for i in f.data]
    return [f.parts[i][0] for i in f.data]
  if f.types[0] == gguf.GGUFValueType.STRING:
    return bytes(f.parts[f.data[0]]).decode()
  return f.parts[f.data[0]][0]


@pytest.mark.parametrize("qtype, bits", [("TQ2_0", 2.0625), ("TQ1_0", 1.6875)])
def test_gguf_reads_back_with_ternary_types_shapes_and_values(workdir, tmp_path, qtype, bits):
  path = str(tmp_path / "model.gguf")
  measured = gguf_export.write_gguf(workdir, path, qtype)
  assert measured["bits_per_weight"] == pytest.approx(bits)
  tensors = gguf_export.read_tensors(path)
  shapes = {  # llama.cpp's order: ne0 (the input width) first
    "attn_q": (D, D),
    "attn_k": (D, D),
    "attn_v": (D, D),
    "attn_output": (D, D),
    "ffn_gate": (D, F),
    "ffn_up": (D, F),
    "ffn_down": (F, D),
  }
  for i in range(LAYERS):
    for name, shape in shapes.items():
      assert tensors[f"blk.{i}.{name}.weight"][:2] == (qtype, shape)
      assert tensors[f"blk.{i}.{name}.scale"][:2] == ("F32", (1,))
    for name, width in (
      ("attn_norm", D),
      ("attn_sub_norm", D),
      ("ffn_norm", D),
      ("ffn_sub_norm", F),
    ):
      assert tensors[f"blk.{i}.{name}.weight"][:2] == ("F32", (width,))
  assert tensors["token_embd.weight"][:2] == ("F32", (D, 264))
  assert tensors["output_norm.weight"][:2] == ("F32", (D,))
  assert "output.weight" not in tensors  # llama.cpp's bitnet graph ties the head
  ternary = [v for v in tensors.values() if v[0] == qtype]
  n = sum(int(np.prod(s)) for _, s, _ in ternary)
  assert 8 * sum(b for _, _, b in ternary) / n == pytest.approx(bits) and bits <= 2.1

  # the values llama.cpp multiplies are exactly fourfold's W_q, and the scales its scales
  _, _, params, _ = trainer.load_for_inference(workdir)
  reader = gguf.GGUFReader(path)
  by_name = {t.name: t for t in reader.tensors}
  for i, (module, kernel, name) in enumerate(
    [("attn", "query", "attn_q"), ("attn", "out", "attn_output"), ("mlp", "down", "ffn_down")]
  ):
    layer = params[f"block_{i % LAYERS}"]
    wq, scale = quantize_kernel("bitnet158", layer[module][kernel]["kernel"])
    t = by_name[f"blk.{i % LAYERS}.{name}.weight"]
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    wq = np.asarray(wq)  # rows are outputs: llama.cpp computes y[o] = sum_i W[o, i] x[i]
    want = {
      "query": lambda w: np.einsum("dhk->hkd", w).reshape(-1, w.shape[0]),
      "out": lambda w: np.einsum("hko->ohk", w).reshape(w.shape[-1], -1),
      "down": lambda w: w.T,
    }[kernel](wq)
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    assert set(np.unique(got)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(
      np.asarray(by_name[f"blk.{i % LAYERS}.{name}.scale"].data), [scale]
    )


def test_gguf_metadata_and_byte_vocabulary(workdir, tmp_path):
  path = str(tmp_path / "model.gguf")
  gguf_export.write_gguf(workdir, path)
  r = gguf.GGUFReader(path)
  assert field(r, "general.architecture") == "bitnet"
  assert field(r, "bitnet.block_count") == LAYERS
  assert field(r, "bitnet.embedding_length") == D
  assert field(r, "bitnet.feed_forward_length") == F
  assert field(r, "bitnet.attention.head_count") == 8
  assert field(r, "bitnet.rope.dimension_count") == D // 8
  assert field(r, "tokenizer.ggml.model") == "llama"
  tokens = field(r, "tokenizer.ggml.tokens")
  types = field(r, "tokenizer.ggml.token_type")
  assert len(tokens) == 264
  assert tokens[NUM_SPECIAL + 0x20] == "\u2581"  # llama.cpp's escaped space
  assert tokens[NUM_SPECIAL + 0x41] == "<0x41>" and types[NUM_SPECIAL + 0x41] == gguf.TokenType.BYTE
  assert tokens[1] == "</s>" and types[1] == gguf.TokenType.CONTROL
  assert field(r, "tokenizer.ggml.eos_token_id") == 1
  assert not field(r, "tokenizer.ggml.add_bos_token")
  assert not field(r, "tokenizer.ggml.add_space_prefix")


def test_export_refuses_what_llama_cpp_would_compute_differently(tmp_path):
  c = llama.get_config("size=tiny")
  c.model.quant = "bitnet158"
  with pytest.raises(ValueError, match=r"model.tie_embeddings=False: llama.cpp's bitnet"):
    gguf_export.check_exportable(c)
  c = bitnet.get_config("size=tiny")
  c.model.d_model, c.model.num_heads = 384, 12
  with pytest.raises(ValueError, match=r"model.d_model=384: must be a multiple of 256"):
    gguf_export.check_exportable(c)
  c = bitnet.get_config("size=tiny")
  c.model.quant = "none"
  with pytest.raises(ValueError, match=r"model.quant='none'"):
    gguf_export.check_exportable(c)
  gguf_export.check_exportable(bitnet.get_config("size=tiny"))
