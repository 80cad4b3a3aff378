"""GGUF for llama.cpp: a BitNet decoder written as llama.cpp's `bitnet` architecture.

llama.cpp's BITNET graph is: token embedding; per layer RMSNorm, q/k/v projections, RoPE
(NEOX: rotate-half), attention, SubLN RMSNorm, output projection, residual; RMSNorm, SwiGLU
(gate, up), SubLN RMSNorm, down projection, residual; final RMSNorm; logits from the token
embedding (tied). Each projection may carry a per-tensor `scale` that multiplies its
output. That is `configs/bitnet.py`'s model, which `check_exportable` insists on.

Each quantized kernel is written as its ternary values W_q in a ternary GGUF type (TQ2_0:
2.06 bits per weight, or TQ1_0: 1.69) whose block scales are exactly 1, and its absmean
scale as the tensor's separate float32 `scale`, so the weights llama.cpp multiplies are
exactly fourfold's W_q * scale. Embedding and norms stay float32. The tokenizer is the
byte-level vocabulary in SentencePiece form: eight control tokens, then `<0xNN>` byte
tokens, except that byte 0x20 is the piece U+2581 (llama.cpp writes spaces as U+2581
before it looks pieces up), with no space prefix and no BOS.
"""

from __future__ import annotations

import os

import gguf
import jax
import numpy as np

from eval.packed import quantize_kernel
from modeling.vocab import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, UNK_ID
from train.trainer import load_for_inference

ARCH = "bitnet"
TERNARY_TYPES = {"TQ2_0": gguf.GGMLQuantizationType.TQ2_0, "TQ1_0": gguf.GGMLQuantizationType.TQ1_0}
SPECIAL_NAMES = ["<pad>", "</s>", "<s>", "<mask>", "<cls>", "<sep>", "<unk>", "<unused7>"]
# fourfold (module, kernel) -> llama.cpp tensor; how to lay the kernel out as [out, in]
PROJECTIONS = {
  ("attn", "query"): "attn_q",
  ("attn", "key"): "attn_k",
  ("attn", "value"): "attn_v",
  ("attn", "out"): "attn_output",
  ("mlp", "gate"): "ffn_gate",
  ("mlp", "up"): "ffn_up",
  ("mlp", "down"): "ffn_down",
}
NORMS = {
  ("attn_norm",): "attn_norm",
  ("attn", "sub_norm"): "attn_sub_norm",
  ("mlp_norm",): "ffn_norm",
  ("mlp", "sub_norm"): "ffn_sub_norm",
}
BLOCK = 256  # elements per block of llama.cpp's ternary types, along each row


def check_exportable(config) -> None:
  """Raises ValueError unless the run is a model llama.cpp's BITNET graph computes exactly."""
  m = config.model
  need = {
    "model.family": (m.family, "decoder"),
    "model.position": (m.position, "rope"),
    "model.norm": (m.norm, "rmsnorm"),
    "model.mlp": (m.mlp, "swiglu"),
    "model.use_bias": (m.use_bias, False),
    "model.tie_embeddings": (m.tie_embeddings, True),
    "model.sliding_window": (m.sliding_window, 0),
    "model.attention": (m.attention, "mha"),
  }
  for key, (value, wanted) in need.items():
    if value != wanted:
      raise ValueError(
        f"{key}={value!r}: llama.cpp's bitnet architecture needs {wanted!r} "
        "(train from configs/bitnet.py)"
      )
  if m.quant not in ("bitnet158", "bitnet1"):
    raise ValueError(f"model.quant={m.quant!r}: GGUF export writes bitnet158 or bitnet1 weights")
  head_dim = m.head_dim or m.d_model // m.num_heads
  if head_dim * m.num_heads != m.d_model:
    raise ValueError(
      f"model.head_dim={head_dim} x model.num_heads={m.num_heads} != model.d_model={m.d_model}: "
      "llama.cpp's bitnet architecture needs them equal"
    )
  for key in ("d_model", "d_ff"):
    if m[key] % BLOCK:
      raise ValueError(
        f"model.{key}={m[key]}: must be a multiple of {BLOCK}, the block of llama.cpp's "
        "ternary tensor types"
      )


def layer_params(params, i: int, scanned: bool) -> dict:
  if scanned:
    return jax.tree.map(lambda a: a[i], params["blocks"])
  return params[f"block_{i}"]


def as_rows(path: tuple[str, str], kernel: np.ndarray) -> np.ndarray:
  """A fourfold kernel [in..., out...] as llama.cpp's [out, in] matrix (rows = outputs)."""
  if path == ("attn", "out"):  # [heads, head_dim, D]
    return kernel.reshape(-1, kernel.shape[-1]).T
  return kernel.reshape(kernel.shape[0], -1).T  # [D, heads, head_dim] or [D, F] / [F, D]


def byte_vocab() -> tuple[list[str], list[float], list[int]]:
  """(tokens, scores, types) of the byte-level vocabulary in SentencePiece form."""
  t = gguf.TokenType
  tokens, types = list(SPECIAL_NAMES), [t.CONTROL] * NUM_SPECIAL
  types[UNK_ID] = t.UNKNOWN
  for b in range(256):
    tokens.append("\u2581" if b == 0x20 else f"<0x{b:02X}>")
    types.append(t.NORMAL if b == 0x20 else t.BYTE)
  return tokens, [0.0] * len(tokens), [int(x) for x in types]


def write_gguf(workdir: str, output: str, ternary_type: str = "TQ2_0") -> dict[str, float]:
  """Writes the GGUF file; returns what it measured (bits per ternary weight, sizes)."""
  config, model, params, tokenizer = load_for_inference(workdir)
  check_exportable(config)
  if not tokenizer.is_byte_level:
    raise ValueError(
      f"data.tokenizer={config.data.tokenizer!r}: GGUF export writes the byte-level vocabulary "
      "only so far"
    )
  if ternary_type not in TERNARY_TYPES:
    raise ValueError(f"--gguf_type={ternary_type!r}: allowed {list(TERNARY_TYPES)}")
  qtype = TERNARY_TYPES[ternary_type]
  cfg, m = model.cfg, config.model
  params = jax.device_get(params)
  w = gguf.GGUFWriter(output, ARCH)
  w.add_name(os.path.basename(os.path.abspath(workdir)))
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope.theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(
    gguf.LlamaFileType.MOSTLY_TQ2_0 if ternary_type == "TQ2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0
  )
  tokens, scores, types = byte_vocab()
  tokens += [f"<unused{i}>" for i in range(len(tokens), cfg.vocab_size)]
  scores += [0.0] * (cfg.vocab_size - len(scores))
  types += [int(gguf.TokenType.UNUSED)] * (cfg.vocab_size - len(types))
  w.add_tokenizer_model("llama")
  w.add_tokenizer_pre("default")
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(BOS_ID)
  w.add_eos_token_id(EOS_ID)
  w.add_unk_token_id(UNK_ID)
  w.add_pad_token_id(PAD_ID)
  w.add_add_bos_token(False)
  w.add_add_eos_token(False)
  w.add_add_space_prefix(False)

  w.add_tensor("token_embd.weight", np.asarray(params["embed"]["embedding"], np.float32))
  w.add_tensor("output_norm.weight", np.asarray(params["final_norm"]["scale"], np.float32))
  ternary_weights = ternary_bytes = 0
  for i in range(cfg.num_layers):
    layer = layer_params(params, i, cfg.scan_layers)
    for path, name in NORMS.items():
      scale = layer
      for p in path:
        scale = scale[p]
      w.add_tensor(f"blk.{i}.{name}.weight", np.asarray(scale["scale"], np.float32))
    for path, name in PROJECTIONS.items():
      wq, scale = quantize_kernel(m.quant, layer[path[0]][path[1]]["kernel"])
      rows = np.ascontiguousarray(as_rows(path, wq).astype(np.float32))
      data = gguf.quants.quantize(rows, qtype)
      w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=qtype)
      w.add_tensor(f"blk.{i}.{name}.scale", np.asarray([scale], np.float32))
      ternary_weights += rows.size
      ternary_bytes += data.nbytes
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  n_all = sum(x.size for x in jax.tree.leaves(params))
  return {
    "ternary_weights": ternary_weights,
    "ternary_bits_per_weight": 8 * ternary_bytes / ternary_weights,
    "file_bytes": os.path.getsize(output),
    "all_float32_bytes": 4 * n_all,
  }


def read_tensors(path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
  """name -> (GGML type name, shape as llama.cpp sees it (ne0 first), bytes), from `gguf`'s reader."""
  reader = gguf.GGUFReader(path)
  return {
    t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes))
    for t in reader.tensors
  }
