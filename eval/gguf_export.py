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
before it looks pieces up), with no space prefix and no BOS. The same ternary values can be
written in an ordinary type instead (F32, F16: exactly; Q8_0, Q4_0: rounded by their block
scales), for comparing file sizes and speeds on one model.

Float decoders (`model.quant=none`) are written as llama.cpp's `llama` architecture (RoPE,
RMSNorm, SwiGLU, grouped-query attention, optional biases, tied or untied head) or `gpt2`
(learned positions, LayerNorm, tanh GELU, biases, fused QKV), whichever computes the model
exactly: the tensors are the Hugging Face export's (eval/hf_arch.py, LlamaForCausalLM /
GPT2LMHeadModel, whose round trip already refuses every config key Llama or GPT-2 lacks),
renamed by `gguf`'s own HF -> GGUF tensor map. llama.cpp's `llama` rotates pairs of
neighbouring features (GGML's NORM RoPE) where fourfold rotates halves, so each head's query
and key rows are interleaved (i, i + K/2 -> 2i, 2i + 1), as llama.cpp's converter does; the
scores are unchanged. Linear and llama3 RoPE scaling are written as `rope_freqs`, the
per-frequency divisors llama.cpp applies. Matrices are F32, F16, Q8_0 or Q4_0
(`gguf.quants`); norms, biases and the position table stay F32. The tokenizer: fourfold's
byte-level vocabulary as above, a SentencePiece model (`spm:` or an `hf:` tokenizer.model)
as llama.cpp's `llama` tokenizer, or an `hf:` byte-level BPE tokenizer.json as its `gpt2`
tokenizer where its pre-tokenizer is one llama.cpp names (GPT-2's, Llama 3's).
"""

from __future__ import annotations

import dataclasses
import json
import os

import gguf
import jax
import numpy as np
from flax import traverse_util

from eval.hf_arch import ARCHITECTURES
from eval.hf_io import mismatches, unstack_layers
from eval.packed import quantize_kernel
from modeling.vocab import NUM_SPECIAL, UNK_ID
from train.trainer import load_for_inference

ARCH = "bitnet"
Q = gguf.GGMLQuantizationType
TERNARY_TYPES = {"TQ2_0": Q.TQ2_0, "TQ1_0": Q.TQ1_0}
FLOAT_TYPES = {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0, "Q4_0": Q.Q4_0}
GGUF_TYPES = {**TERNARY_TYPES, **FLOAT_TYPES}
FILE_TYPES = {
  "TQ2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
  "TQ1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
  "F32": gguf.LlamaFileType.ALL_F32,
  "F16": gguf.LlamaFileType.MOSTLY_F16,
  "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
  "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
# llama.cpp architecture -> the Hugging Face architecture whose tensors and checks it shares
FLOAT_ARCHS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
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


def default_type(config) -> str:
  """--gguf_type's default: TQ2_0 for a BitNet model, F16 for a float one."""
  return "TQ2_0" if config.model.quant in ("bitnet158", "bitnet1") else "F16"


def _check_rows(config, gguf_type: str) -> None:
  """Every matrix row (an input width) must hold whole blocks of the type."""
  block = gguf.GGML_QUANT_SIZES[GGUF_TYPES[gguf_type]][0]
  m = config.model
  widths = {
    "model.d_model": m.d_model,
    "model.d_ff": m.d_ff,
    "model.head_dim x model.num_heads": m.num_heads * (m.head_dim or m.d_model // m.num_heads),
  }
  for key, width in widths.items():
    if width % block:
      raise ValueError(
        f"{key}={width}: must be a multiple of {block}, the block of llama.cpp's {gguf_type} rows"
      )


def check_exportable(config, gguf_type: str = "TQ2_0") -> None:
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
  if gguf_type not in GGUF_TYPES:
    raise ValueError(f"--gguf_type={gguf_type!r}: allowed {list(GGUF_TYPES)}")
  _check_rows(config, gguf_type)


def check_float_exportable(config, vocab_size: int, gguf_type: str = "F16") -> str:
  """The llama.cpp architecture, 'llama' or 'gpt2', that computes the float decoder of
  `config` exactly; otherwise a ValueError naming the config key."""
  m = config.model
  if m.family != "decoder":
    raise ValueError(f"model.family={m.family!r}: GGUF export writes decoders")
  if m.quant != "none":
    raise ValueError(
      f"model.quant={m.quant!r}: a float export needs 'none' (bitnet158 and bitnet1 runs are "
      "written as llama.cpp's bitnet architecture)"
    )
  if gguf_type not in FLOAT_TYPES:
    raise ValueError(
      f"--gguf_type={gguf_type!r}: a float model is written as {list(FLOAT_TYPES)} (the "
      "ternary types hold a BitNet model's ternary weights)"
    )
  if m.position == "rope" and m.rope_fraction != 1.0:
    raise ValueError(
      f"model.rope_fraction={m.rope_fraction}: llama.cpp's llama architecture rotates every "
      "feature of a head (rope.dimension_count = head_dim)"
    )
  if m.position == "rope" and m.rope_scaling.type not in ("none", "linear", "llama3"):
    raise ValueError(
      f"model.rope_scaling.type={m.rope_scaling.type!r}: llama.cpp's llama architecture takes "
      "per-frequency divisors only (none, linear, llama3), not a cos / sin factor"
    )
  guess = "gpt2" if m.position == "learned" else "llama"
  problems = {}
  for name in (guess, *(a for a in FLOAT_ARCHS if a != guess)):
    problems[name] = mismatches(config, ARCHITECTURES[FLOAT_ARCHS[name]], vocab_size)
    if not problems[name]:
      break
  else:
    raise ValueError(
      f"llama.cpp's {guess} architecture cannot compute this model exactly: "
      + "; ".join(problems[guess])
    )
  if name == "gpt2" and m.gelu != "tanh":
    raise ValueError(
      f"model.gelu={m.gelu!r}: llama.cpp's gpt2 architecture computes the tanh approximation"
    )
  if gguf_type in ("Q8_0", "Q4_0"):
    _check_rows(config, gguf_type)
  return name


def layer_params(params, i: int, scanned: bool) -> dict:
  if scanned:
    return jax.tree.map(lambda a: a[i], params["blocks"])
  return params[f"block_{i}"]


def as_rows(path: tuple[str, str], kernel: np.ndarray) -> np.ndarray:
  """A fourfold kernel [in..., out...] as llama.cpp's [out, in] matrix (rows = outputs)."""
  if path == ("attn", "out"):  # [heads, head_dim, D]
    return kernel.reshape(-1, kernel.shape[-1]).T
  return kernel.reshape(kernel.shape[0], -1).T  # [D, heads, head_dim] or [D, F] / [F, D]


def encode_matrix(rows: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Q | None]:
  """A [out, in] float matrix as (data, raw_dtype) for GGUFWriter.add_tensor in the type."""
  rows = np.ascontiguousarray(rows, np.float32)
  if gguf_type == "F32":
    return rows, None
  if gguf_type == "F16":
    return rows.astype(np.float16), None
  qtype = GGUF_TYPES[gguf_type]
  return gguf.quants.quantize(rows, qtype), qtype


def interleave_rope_rows(x: np.ndarray, heads: int) -> np.ndarray:
  """Query / key rows [heads x K, ...] from the rotate-half layout (features i, i + K/2 turn
  together) to GGML's NORM RoPE layout (2i, 2i + 1): row 2i takes i, row 2i + 1 takes i + K/2."""
  k = x.shape[0] // heads
  return x.reshape(heads, 2, k // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


# ---- tokenizers


def byte_vocab() -> tuple[list[str], list[float], list[int]]:
  """(tokens, scores, types) of the byte-level vocabulary in SentencePiece form."""
  t = gguf.TokenType
  tokens, types = list(SPECIAL_NAMES), [t.CONTROL] * NUM_SPECIAL
  types[UNK_ID] = t.UNKNOWN
  for b in range(256):
    tokens.append("\u2581" if b == 0x20 else f"<0x{b:02X}>")
    types.append(t.NORMAL if b == 0x20 else t.BYTE)
  return tokens, [0.0] * len(tokens), [int(x) for x in types]


def _spm_vocab(path: str) -> tuple[list[str], list[float], list[int], bool]:
  """A SentencePiece model's pieces, scores, types and whether it adds a dummy space prefix."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2

  sp = spm.SentencePieceProcessor(model_file=path)
  t = gguf.TokenType
  tokens, scores, types = [], [], []
  for i in range(sp.get_piece_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(float(sp.get_score(i)))
    kind = t.NORMAL
    for test, value in (
      (sp.is_unknown, t.UNKNOWN),
      (sp.is_control, t.CONTROL),
      (sp.is_unused, t.UNUSED),
      (sp.is_byte, t.BYTE),
    ):
      if test(i):
        kind = value
    types.append(int(kind))
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return tokens, scores, types, bool(proto.normalizer_spec.add_dummy_prefix)


# tokenizer.json pre-tokenizers llama.cpp knows (its `tokenizer.ggml.pre`), by their JSON
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
LLAMA3_REGEX = (
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
  "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


def _bpe_pre(pre: dict | None) -> str | None:
  """llama.cpp's name for a tokenizer.json pre-tokenizer, or None."""
  if pre == GPT2_PRE:
    return "gpt2"
  steps = (pre or {}).get("pretokenizers") or []
  if (
    len(steps) == 2
    and steps[0].get("type") == "Split"
    and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
    and steps[0].get("behavior") == "Isolated"
    and steps[1].get("type") == "ByteLevel"
    and not steps[1].get("use_regex")
  ):
    return "llama-bpe"
  return None


def _bpe_vocab(path: str, spec: str) -> tuple[list[str], list[int], list[str], str]:
  """A byte-level BPE tokenizer.json: (tokens, types, merges, llama.cpp pre-tokenizer)."""
  with open(path) as f:
    tj = json.load(f)
  model = tj.get("model") or {}
  if (
    model.get("type") != "BPE"
    or model.get("byte_fallback")
    or (tj.get("decoder") or {}).get("type") != "ByteLevel"
  ):
    raise ValueError(
      f"data.tokenizer={spec!r}: {path} is not a byte-level BPE (model {model.get('type')!r}); "
      "llama.cpp's gpt2 tokenizer needs one"
    )
  if tj.get("normalizer"):
    raise ValueError(
      f"data.tokenizer={spec!r}: {path} has a normalizer ({tj['normalizer'].get('type')!r}), "
      "which llama.cpp's BPE tokenizer does not run"
    )
  pre = _bpe_pre(tj.get("pre_tokenizer"))
  if pre is None:
    raise ValueError(
      f"data.tokenizer={spec!r}: {path}'s pre_tokenizer is not one llama.cpp names here "
      "(GPT-2's ByteLevel regex, Llama 3's Split): " + json.dumps(tj.get("pre_tokenizer"))[:200]
    )
  by_id = {i: tok for tok, i in model["vocab"].items()}
  t = gguf.TokenType
  types = {i: int(t.NORMAL) for i in by_id}
  for added in tj.get("added_tokens") or []:
    by_id[added["id"]] = added["content"]
    types[added["id"]] = int(t.CONTROL if added.get("special") else t.USER_DEFINED)
  size = max(by_id) + 1
  tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
  kinds = [types.get(i, int(t.UNUSED)) for i in range(size)]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  return tokens, kinds, merges, pre


def add_tokenizer(w: gguf.GGUFWriter, config, tokenizer, vocab_size: int) -> None:
  """The run's tokenizer as llama.cpp's tokenizer.ggml.* keys, padded to the model's
  `vocab_size` rows with unused tokens; refused (naming data.tokenizer) where llama.cpp has
  no tokenizer that splits text the same way."""
  spec = config.data.tokenizer
  scores, merges, space_prefix, pre = None, [], False, "default"
  if tokenizer.is_byte_level:
    model, (tokens, scores, types) = "llama", byte_vocab()
  elif spec.startswith("spm:"):
    model, (tokens, scores, types, space_prefix) = "llama", _spm_vocab(tokenizer.path)
  elif spec.startswith("hf:") and tokenizer.path.endswith(".model"):
    model, (tokens, scores, types, space_prefix) = "llama", _spm_vocab(tokenizer.path)
    if tokenizer.vocab_size > len(tokens):
      raise ValueError(
        f"data.tokenizer={spec!r}: {tokenizer.vocab_size - len(tokens)} added tokens past the "
        "SentencePiece vocabulary; llama.cpp's llama tokenizer reads the pieces only"
      )
  elif spec.startswith("hf:"):
    model = "gpt2"
    tokens, types, merges, pre = _bpe_vocab(tokenizer.path, spec)
  else:
    raise ValueError(f"data.tokenizer={spec!r}: no llama.cpp tokenizer for it")
  if len(tokens) > vocab_size:
    raise ValueError(
      f"data.tokenizer={spec!r}: {len(tokens)} tokens, more than the model's {vocab_size} rows"
    )
  extra = vocab_size - len(tokens)
  tokens = tokens + [f"<unused{i}>" for i in range(len(tokens), vocab_size)]
  types = types + [int(gguf.TokenType.UNUSED)] * extra
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  if scores is not None:
    w.add_token_scores(scores + [0.0] * extra)
  if merges:
    w.add_token_merges(merges)
  s = tokenizer.specials
  for add, value in (
    (w.add_bos_token_id, s.bos),
    (w.add_eos_token_id, s.eos),
    (w.add_unk_token_id, s.unk),
    (w.add_pad_token_id, s.pad),
  ):
    if value is not None:
      add(value)
  w.add_add_bos_token(bool(s.add_bos))
  w.add_add_eos_token(False)
  if model == "llama":
    w.add_add_space_prefix(space_prefix)


# ---- writing


def write_gguf(workdir: str, output: str, gguf_type: str = "") -> dict[str, float]:
  """Writes the GGUF file of a workdir (`gguf_type` empty: `default_type`); returns what it
  measured (the matrices' weights and bits per weight, the file's size)."""
  config, model, params, tokenizer = load_for_inference(workdir)
  gguf_type = gguf_type or default_type(config)
  name = os.path.basename(os.path.abspath(workdir))
  params = jax.device_get(params)
  if config.model.quant in ("bitnet158", "bitnet1"):
    return write_bitnet(config, model.cfg, params, tokenizer, output, gguf_type, name)
  return write_float(config, model.cfg, params, tokenizer, output, gguf_type, name)


def _finish(w: gguf.GGUFWriter, output: str, params, matrix_weights: int, matrix_bytes: int):
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  n_all = sum(x.size for x in jax.tree.leaves(params))
  return {
    "matrix_weights": matrix_weights,
    "bits_per_weight": 8 * matrix_bytes / matrix_weights,
    "file_bytes": os.path.getsize(output),
    "parameters": n_all,
    "all_float32_bytes": 4 * n_all,
  }


def _add_shape(w: gguf.GGUFWriter, cfg, name: str) -> None:
  """The model's name and shape keys, common to every architecture fourfold writes."""
  w.add_name(name or "fourfold")
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)


def write_bitnet(config, cfg, params, tokenizer, output: str, gguf_type: str, name: str = ""):
  """llama.cpp's bitnet architecture: each projection's ternary values W_q in `gguf_type`
  and its absmean scale as a separate float32 `scale` tensor."""
  check_exportable(config, gguf_type)
  if not tokenizer.is_byte_level:
    raise ValueError(
      f"data.tokenizer={config.data.tokenizer!r}: the bitnet GGUF export writes the byte-level "
      "vocabulary only so far"
    )
  m = config.model
  w = gguf.GGUFWriter(output, ARCH)
  _add_shape(w, cfg, name)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope.theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(FILE_TYPES[gguf_type])
  add_tokenizer(w, config, tokenizer, cfg.vocab_size)

  w.add_tensor("token_embd.weight", np.asarray(params["embed"]["embedding"], np.float32))
  w.add_tensor("output_norm.weight", np.asarray(params["final_norm"]["scale"], np.float32))
  matrix_weights = matrix_bytes = 0
  for i in range(cfg.num_layers):
    layer = layer_params(params, i, cfg.scan_layers)
    for path, norm in NORMS.items():
      scale = layer
      for p in path:
        scale = scale[p]
      w.add_tensor(f"blk.{i}.{norm}.weight", np.asarray(scale["scale"], np.float32))
    for path, proj in PROJECTIONS.items():
      wq, scale = quantize_kernel(m.quant, layer[path[0]][path[1]]["kernel"])
      data, raw = encode_matrix(as_rows(path, np.asarray(wq)), gguf_type)
      w.add_tensor(f"blk.{i}.{proj}.weight", data, raw_dtype=raw)
      w.add_tensor(f"blk.{i}.{proj}.scale", np.asarray([scale], np.float32))
      matrix_weights += int(np.prod(wq.shape))
      matrix_bytes += data.nbytes
  return _finish(w, output, params, matrix_weights, matrix_bytes)


def write_float(config, cfg, params, tokenizer, output: str, gguf_type: str, name: str = ""):
  """A float decoder as llama.cpp's `llama` or `gpt2` architecture (see the module docstring)."""
  arch_name = check_float_exportable(config, tokenizer.vocab_size, gguf_type)
  arch = ARCHITECTURES[FLOAT_ARCHS[arch_name]]
  flat = traverse_util.flatten_dict(unstack_layers(params), sep="/")
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[arch_name]
  names = gguf.get_tensor_name_map(gguf_arch, cfg.num_layers)
  w = gguf.GGUFWriter(output, arch_name)
  _add_shape(w, cfg, name)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(FILE_TYPES[gguf_type])
  if arch_name == "llama":
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
      w.add_key_length(cfg.head_dim)
      w.add_value_length(cfg.head_dim)
  else:
    w.add_layer_norm_eps(cfg.norm_eps)
  add_tokenizer(w, config, tokenizer, cfg.vocab_size)

  matrix_weights = matrix_bytes = 0
  for link in arch.links(cfg):
    for hf_name, x in zip(link.hf, link.to_hf([flat[p] for p in link.ours]), strict=True):
      gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
      if gname is None:
        raise ValueError(f"{hf_name}: gguf's {arch_name} tensor map has no name for it")
      x = np.asarray(x, np.float32)
      if arch_name == "gpt2" and x.ndim == 2 and gname.startswith("blk."):
        x = x.T  # GPT-2's Conv1D [in, out] -> [out, in]
      for proj, heads in (("attn_q.", cfg.num_heads), ("attn_k.", cfg.num_kv_heads)):
        if arch_name == "llama" and proj in gname:
          x = interleave_rope_rows(x, heads)
      if x.ndim == 2 and gname != "position_embd.weight":
        data, raw = encode_matrix(x, gguf_type)
        matrix_weights += x.size
        matrix_bytes += data.nbytes
      else:
        data, raw = np.ascontiguousarray(x), None
      w.add_tensor(gname, data, raw_dtype=raw)
  if arch_name == "llama" and cfg.rope.scaling != "none":
    plain, _ = dataclasses.replace(cfg.rope, scaling="none").inv_freqs(cfg.head_dim)
    scaled, _ = cfg.rope.inv_freqs(cfg.head_dim)
    w.add_tensor("rope_freqs.weight", (plain / scaled).astype(np.float32))
  return _finish(w, output, params, matrix_weights, matrix_bytes)


def read_tensors(path: str) -> dict[str, tuple[str, tuple[int, ...], int]]:
  """name -> (GGML type name, shape as llama.cpp sees it (ne0 first), bytes), from `gguf`'s reader."""
  reader = gguf.GGUFReader(path)
  return {
    t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_bytes))
    for t in reader.tensors
  }
