"""How each Hugging Face architecture maps onto fourfold's models, both ways.

An `Arch` holds, for one `architectures` entry of a config.json:
  read_config   HF config.json -> fourfold `config.model` keys,
                refusing (naming the field) what the model cannot compute exactly
  write_config  a fourfold config -> HF config.json (both RoPE schemas, ties explicit)
  links         every tensor: HF names <-> fourfold param paths, with the reshapes,
                transposes and splits of fused projections between them

Import and export read the same links, so a name or a transpose is written once. fourfold
params are unscanned here (`block_{i}`): one tensor per layer, as the checkpoints store them.
Dense kernels are [in..., out...]; HF Linear weights are [out, in], GPT-2's Conv1D [in, out].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from modeling.transformer import TransformerConfig

# ---- tensors: HF names <-> param paths


@dataclasses.dataclass(frozen=True)
class Link:
  """HF tensors `hf` <-> fourfold params `ours` ('/'-joined paths)."""

  hf: tuple[str, ...]
  ours: tuple[str, ...]
  # (HF arrays, our shapes) -> our arrays
  to_ours: Callable[[list[np.ndarray], list[tuple]], list[np.ndarray]]
  # our arrays -> HF arrays
  to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]


def _same(hf: str, ours: str) -> Link:
  """Embeddings, norms, tables, vector biases: the same array."""
  return Link((hf,), (ours,), lambda a, shapes: [a[0].reshape(shapes[0])], lambda a: [a[0]])


def _bias(hf: str, ours: str) -> Link:
  """A bias [out] <-> a Dense bias of the kernel's out dims ([H, K] for attention)."""
  return Link(
    (hf,), (ours,), lambda a, shapes: [a[0].reshape(shapes[0])], lambda a: [a[0].reshape(-1)]
  )


def _flat_in(shape: tuple, n_in: int) -> int:
  return int(np.prod(shape[:n_in]))


def _linear(hf: str, ours: str, n_in: int = 1) -> Link:
  """An HF Linear weight [out, in] <-> a Dense kernel [*in, *out] (n_in input dims)."""
  return Link(
    (hf,),
    (ours,),
    lambda a, shapes: [a[0].T.reshape(shapes[0])],
    lambda a: [a[0].reshape(_flat_in(a[0].shape, n_in), -1).T],
  )


def _conv1d(hf: str, ours: str, n_in: int = 1) -> Link:
  """GPT-2's Conv1D weight [in, out] <-> a Dense kernel."""
  return Link(
    (hf,),
    (ours,),
    lambda a, shapes: [a[0].reshape(shapes[0])],
    lambda a: [a[0].reshape(_flat_in(a[0].shape, n_in), -1)],
  )


def _fused(hf: str, ours: tuple[str, ...], kind: str) -> Link:
  """One HF tensor holding several projections side by side (GPT-2's c_attn, Phi-3's
  qkv_proj and gate_up_proj) <-> one param each. kind: linear (split the out rows),
  conv1d (split the out columns), bias (split the vector)."""
  axis = {"linear": 0, "conv1d": 1, "bias": 0}[kind]

  def sizes(shapes):
    return [int(np.prod(s[1:] if kind != "bias" else s)) for s in shapes]

  def to_ours(a, shapes):
    parts = np.split(a[0], np.cumsum(sizes(shapes))[:-1], axis=axis)
    if kind == "linear":
      parts = [p.T for p in parts]
    return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]

  def to_hf(arrays):
    if kind == "bias":
      return [np.concatenate([x.reshape(-1) for x in arrays])]
    flat = [x.reshape(x.shape[0], -1) for x in arrays]  # [in, out]
    return [np.concatenate([f.T for f in flat], 0) if kind == "linear" else np.concatenate(flat, 1)]

  return Link((hf,), ours, to_ours, to_hf)


def _norm(hf: str, ours: str, bias: bool, names=("weight", "bias")) -> list[Link]:
  out = [_same(f"{hf}.{names[0]}", f"{ours}/scale")]
  return out + ([_same(f"{hf}.{names[1]}", f"{ours}/bias")] if bias else [])


def _dense(hf: str, ours: str, bias: bool, n_in: int = 1, make=_linear) -> list[Link]:
  out = [make(f"{hf}.weight", f"{ours}/kernel", n_in)]
  return out + ([_bias(f"{hf}.bias", f"{ours}/bias")] if bias else [])


# ---- config helpers


class Unsupported(ValueError):
  """An HF config value the model cannot compute exactly."""


def _require(hf: dict, key: str, allowed, default=None):
  value = hf.get(key, default)
  if value not in allowed:
    raise Unsupported(f"config.json {key}={value!r}: fourfold supports {list(allowed)}")
  return value


ROPE_KINDS = ("none", "linear", "llama3", "longrope")


def read_rope(hf: dict, kinds: tuple[str, ...] = ROPE_KINDS) -> dict:
  """Our RoPE keys from either schema: transformers 5's `rope_parameters`, or the older
  top-level `rope_theta` / `rope_scaling` (and Phi-3's `original_max_position_embeddings`,
  `partial_rotary_factor`). `kinds`: the scalings the architecture computes as fourfold does
  (yarn: DeepSeek's, with MLA's softmax mscale)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  kind = {"su": "longrope", "default": "none"}.get(kind, kind)
  if kind not in kinds:
    names = ", ".join("default" if k == "none" else k for k in kinds)
    raise Unsupported(f"config.json rope type {kind!r}: fourfold supports {names}")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  max_len = hf.get("max_position_embeddings", 0)
  original = hf.get("original_max_position_embeddings") or params.get(
    "original_max_position_embeddings", max_len
  )
  scaling = {"type": kind}
  if kind in ("linear", "llama3"):
    scaling["factor"] = float(params["factor"])
  if kind == "llama3":
    scaling.update(
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_len=int(original),
    )
  if kind == "longrope":
    factor = params.get("factor") or max_len / original
    attention = params.get("attention_factor")
    if attention is None:
      attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling.update(
      original_max_len=int(original),
      short_factor=tuple(float(x) for x in params["short_factor"]),
      long_factor=tuple(float(x) for x in params["long_factor"]),
      attention_factor=float(attention),
    )
  if kind == "yarn":
    scaling.update(_read_yarn(params, max_len, original))
  return {"rope_theta": float(theta), "rope_fraction": float(fraction), "rope_scaling": scaling}


def _read_yarn(params: dict, max_len: int, original: int) -> dict:
  """YaRN as transformers' `_compute_yarn_parameters` reads it: factor defaults to
  max_position_embeddings / original, beta_fast / beta_slow to 32 / 1; cos and sin's factor
  comes from mscale / mscale_all_dim (an explicit attention_factor is refused)."""
  if params.get("attention_factor") is not None:
    raise Unsupported(
      f"config.json rope attention_factor={params['attention_factor']}: fourfold derives "
      "YaRN's cos / sin factor from mscale and mscale_all_dim"
    )
  _require(params, "truncate", (True,), True)
  return dict(
    factor=float(params.get("factor") or max_len / original),
    original_max_len=int(original),
    beta_fast=float(params.get("beta_fast") or 32.0),
    beta_slow=float(params.get("beta_slow") or 1.0),
    mscale=float(params.get("mscale") or 0.0),
    mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
  )


def write_rope(m) -> dict:
  """HF RoPE fields in both schemas, from `config.model`."""
  r = m.rope_scaling
  params: dict = {
    "rope_type": "default" if r.type == "none" else r.type,
    "rope_theta": m.rope_theta,
  }
  if r.type in ("linear", "llama3"):
    params["factor"] = r.factor
  if r.type == "llama3":
    params.update(
      low_freq_factor=r.low_freq_factor,
      high_freq_factor=r.high_freq_factor,
      original_max_position_embeddings=r.original_max_len,
    )
  if r.type == "longrope":
    params.update(
      short_factor=list(r.short_factor),
      long_factor=list(r.long_factor),
      attention_factor=r.attention_factor,
      original_max_position_embeddings=r.original_max_len,
    )
  if r.type == "yarn":
    params.update(
      factor=r.factor,
      original_max_position_embeddings=r.original_max_len,
      beta_fast=r.beta_fast,
      beta_slow=r.beta_slow,
    )
    params.update({k: r[k] for k in ("mscale", "mscale_all_dim") if r[k]})  # 0: unset
  if m.rope_fraction != 1.0:
    params["partial_rotary_factor"] = m.rope_fraction
  legacy = {k: v for k, v in params.items() if k != "rope_theta"}
  out = {"rope_theta": m.rope_theta, "rope_parameters": params}
  out["rope_scaling"] = None if r.type == "none" else {**legacy, "type": params["rope_type"]}
  if r.type == "longrope":
    out["original_max_position_embeddings"] = r.original_max_len
  if m.rope_fraction != 1.0:
    out["partial_rotary_factor"] = m.rope_fraction
  return out


GELU_ACTS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}
GELU_NAMES = {"tanh": "gelu_new", "erf": "gelu"}


# ---- the architectures


@dataclasses.dataclass(frozen=True)
class Arch:
  name: str  # the `architectures` entry
  model_type: str
  family: str
  task: dict  # task keys of the imported workdir
  read_config: Callable[[dict], dict]  # HF config.json -> config.model keys
  write_config: Callable  # config -> HF config fields
  links: Callable[[TransformerConfig], list[Link]]
  prefix: str = ""  # the base model's name prefix in the checkpoint ("transformer.")
  # HF tensors the model never reads: tied copies and buffers (regex-free suffix tests)
  ignored: tuple[str, ...] = ()
  # tensors of heads this architecture does not have (the NSP head of BERT checkpoints):
  # read past, and named in the import's log
  unused: tuple[str, ...] = ()
  # layers past num_layers (`model.layers.{i}.`, DeepSeek's multi-token-prediction module)
  # are read past too, and named in the log
  unused_layers: bool = False

  def reads_past(self, name: str, c: TransformerConfig) -> bool:
    """Whether the checkpoint tensor `name` is one the model of config `c` does not use."""
    if any(name.startswith(u) for u in self.unused):
      return True
    layer = name.split(".")[2] if name.startswith("model.layers.") else ""
    return self.unused_layers and layer.isdigit() and int(layer) >= c.num_layers


def _gpt2_config(hf: dict) -> dict:
  _require(hf, "scale_attn_by_inverse_layer_idx", (False, None), False)
  _require(hf, "scale_attn_weights", (True,), True)
  _require(hf, "tie_word_embeddings", (True,), True)
  _require(hf, "add_cross_attention", (False,), False)
  act = _require(hf, "activation_function", tuple(GELU_ACTS), "gelu_new")
  d = hf["n_embd"]
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["n_layer"],
    num_heads=hf["n_head"],
    num_kv_heads=hf["n_head"],
    d_model=d,
    d_ff=hf.get("n_inner") or 4 * d,
    max_len=hf["n_positions"],
    position="learned",
    norm="layernorm",
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    mlp="gelu",
    gelu=GELU_ACTS[act],
    use_bias=True,
    tie_embeddings=True,
    dropout=hf.get("resid_pdrop", 0.0),
  )


def _gpt2_write(m) -> dict:
  return dict(
    vocab_size=m.vocab_size,
    n_layer=m.num_layers,
    n_head=m.num_heads,
    n_embd=m.d_model,
    n_inner=m.d_ff,
    n_positions=m.max_len,
    layer_norm_epsilon=m.norm_eps,
    activation_function=GELU_NAMES[m.gelu],
    resid_pdrop=m.dropout,
    embd_pdrop=m.dropout,
    attn_pdrop=0.0,
    tie_word_embeddings=True,
  )


def _gpt2_links(c: TransformerConfig) -> list[Link]:
  out = [_same("wte.weight", "embed/embedding"), _same("wpe.weight", "pos_embedding")]
  for i in range(c.num_layers):
    h, b = f"h.{i}", f"block_{i}"
    qkv = tuple(f"{b}/attn/{p}/kernel" for p in ("query", "key", "value"))
    qkv_bias = tuple(f"{b}/attn/{p}/bias" for p in ("query", "key", "value"))
    out += _norm(f"{h}.ln_1", f"{b}/attn_norm", True)
    out += [
      _fused(f"{h}.attn.c_attn.weight", qkv, "conv1d"),
      _fused(f"{h}.attn.c_attn.bias", qkv_bias, "bias"),
    ]
    out += _dense(f"{h}.attn.c_proj", f"{b}/attn/out", True, 2, _conv1d)
    out += _norm(f"{h}.ln_2", f"{b}/mlp_norm", True)
    out += _dense(f"{h}.mlp.c_fc", f"{b}/mlp/up", True, 1, _conv1d)
    out += _dense(f"{h}.mlp.c_proj", f"{b}/mlp/down", True, 1, _conv1d)
  return out + _norm("ln_f", "final_norm", True)


def _llama_config(hf: dict, phi3: bool = False) -> dict:
  _require(hf, "hidden_act", ("silu",), "silu")
  bias = _require(hf, "attention_bias", (False, True), False)
  _require(hf, "mlp_bias", (bias,), False)
  window = hf.get("sliding_window") or 0
  if window and not phi3:
    raise Unsupported(f"config.json sliding_window={window}: not part of LlamaForCausalLM")
  heads = hf["num_attention_heads"]
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    d_model=hf["hidden_size"],
    d_ff=hf["intermediate_size"],
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    max_len=hf["max_position_embeddings"],
    position="rope",
    **read_rope(hf),
    norm="rmsnorm",
    norm_eps=hf.get("rms_norm_eps", 1e-6),
    mlp="swiglu",
    use_bias=bias,
    tie_embeddings=hf.get("tie_word_embeddings", False),
    sliding_window=window,
    dropout=hf.get("resid_pdrop", 0.0) if phi3 else 0.0,
  )


def _llama_write(m) -> dict:
  return dict(
    vocab_size=m.vocab_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    num_key_value_heads=m.num_kv_heads,
    hidden_size=m.d_model,
    intermediate_size=m.d_ff,
    head_dim=m.head_dim or m.d_model // m.num_heads,
    max_position_embeddings=m.max_len,
    rms_norm_eps=m.norm_eps,
    hidden_act="silu",
    attention_bias=m.use_bias,
    mlp_bias=m.use_bias,
    tie_word_embeddings=m.tie_embeddings,
    **write_rope(m),
  )


def _phi3_write(m) -> dict:
  return {**_llama_write(m), "sliding_window": m.sliding_window or None, "resid_pdrop": m.dropout}


def _decoder_tail(c: TransformerConfig, final: str) -> list[Link]:
  out = _norm(final, "final_norm", False)
  return out + ([] if c.tie_embeddings else [_linear("lm_head.weight", "head/kernel")])


def _llama_links(c: TransformerConfig) -> list[Link]:
  out = [_same("model.embed_tokens.weight", "embed/embedding")]
  for i in range(c.num_layers):
    h, b = f"model.layers.{i}", f"block_{i}"
    out += _norm(f"{h}.input_layernorm", f"{b}/attn_norm", False)
    for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      out += _dense(f"{h}.self_attn.{hf}", f"{b}/attn/{ours}", c.use_bias)
    out += _dense(f"{h}.self_attn.o_proj", f"{b}/attn/out", c.use_bias, 2)
    out += _norm(f"{h}.post_attention_layernorm", f"{b}/mlp_norm", False)
    for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
      out += _dense(f"{h}.mlp.{hf}", f"{b}/mlp/{ours}", c.use_bias)
  return out + _decoder_tail(c, "model.norm")


def _phi3_links(c: TransformerConfig) -> list[Link]:
  out = [_same("model.embed_tokens.weight", "embed/embedding")]
  for i in range(c.num_layers):
    h, b = f"model.layers.{i}", f"block_{i}"
    qkv = tuple(f"{b}/attn/{p}/kernel" for p in ("query", "key", "value"))
    out += _norm(f"{h}.input_layernorm", f"{b}/attn_norm", False)
    out += [_fused(f"{h}.self_attn.qkv_proj.weight", qkv, "linear")]
    out += _dense(f"{h}.self_attn.o_proj", f"{b}/attn/out", False, 2)
    out += _norm(f"{h}.post_attention_layernorm", f"{b}/mlp_norm", False)
    gate_up = (f"{b}/mlp/gate/kernel", f"{b}/mlp/up/kernel")
    out += [_fused(f"{h}.mlp.gate_up_proj.weight", gate_up, "linear")]
    out += _dense(f"{h}.mlp.down_proj", f"{b}/mlp/down", False)
  return out + _decoder_tail(c, "model.norm")


def _bloom_config(hf: dict) -> dict:
  _require(hf, "apply_residual_connection_post_layernorm", (False,), False)
  _require(hf, "tie_word_embeddings", (True,), True)
  d = hf.get("hidden_size") or hf["n_embed"]
  heads = hf.get("n_head") or hf["num_attention_heads"]
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=heads,
    d_model=d,
    d_ff=4 * d,
    position="alibi",
    embed_norm=True,
    norm="layernorm",
    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    mlp="gelu",
    gelu="tanh",
    use_bias=True,
    tie_embeddings=True,
    dropout=hf.get("hidden_dropout", 0.0),
  )


def _bloom_write(m) -> dict:
  if m.d_ff != 4 * m.d_model:
    raise Unsupported(f"model.d_ff={m.d_ff}: BLOOM's MLP is 4 x hidden_size={4 * m.d_model}")
  return dict(
    vocab_size=m.vocab_size,
    hidden_size=m.d_model,
    n_layer=m.num_layers,
    n_head=m.num_heads,
    layer_norm_epsilon=m.norm_eps,
    apply_residual_connection_post_layernorm=False,
    hidden_dropout=m.dropout,
    attention_dropout=0.0,
    tie_word_embeddings=True,
  )


def _bloom_qkv(hf: str, b: str, kind: str) -> Link:
  """BLOOM's query_key_value: per head, its query, key and value rows in turn ([H, 3, K]
  out rows, as `BloomAttention._reshape` splits them) <-> query, key, value [D, H, K]."""
  ours = "bias" if kind == "bias" else "kernel"
  names = tuple(f"{b}/attn/{p}/{ours}" for p in ("query", "key", "value"))

  def to_ours(a, shapes):
    h, k = shapes[0][-2:]
    x = a[0].reshape(h, 3, k, -1)  # [H, 3, K, D] (a bias: D = 1)
    if kind == "bias":
      return [x[:, i, :, 0].reshape(s) for i, s in enumerate(shapes)]
    return [x[:, i].transpose(2, 0, 1).reshape(s) for i, s in enumerate(shapes)]

  def to_hf(arrays):
    if kind == "bias":
      return [np.stack(arrays, axis=1).reshape(-1)]  # [H, 3, K]
    x = np.stack([w.transpose(1, 2, 0) for w in arrays], axis=1)  # [H, 3, K, D]
    return [x.reshape(-1, x.shape[-1])]

  return Link((f"{hf}.{kind}",), names, to_ours, to_hf)


def _bloom_links(c: TransformerConfig) -> list[Link]:
  out = [_same("word_embeddings.weight", "embed/embedding")]
  out += _norm("word_embeddings_layernorm", "embed_norm", True)
  for i in range(c.num_layers):
    h, b = f"h.{i}", f"block_{i}"
    out += _norm(f"{h}.input_layernorm", f"{b}/attn_norm", True)
    qkv = f"{h}.self_attention.query_key_value"
    out += [_bloom_qkv(qkv, b, "weight"), _bloom_qkv(qkv, b, "bias")]
    out += _dense(f"{h}.self_attention.dense", f"{b}/attn/out", True, 2)
    out += _norm(f"{h}.post_attention_layernorm", f"{b}/mlp_norm", True)
    out += _dense(f"{h}.mlp.dense_h_to_4h", f"{b}/mlp/up", True)
    out += _dense(f"{h}.mlp.dense_4h_to_h", f"{b}/mlp/down", True)
  return out + _norm("ln_f", "final_norm", True)


def _bert_config(hf: dict, roberta: bool = False) -> dict:
  act = _require(hf, "hidden_act", tuple(GELU_ACTS), "gelu")
  _require(hf, "position_embedding_type", ("absolute",), "absolute")
  _require(hf, "is_decoder", (False,), False)
  _require(hf, "tie_word_embeddings", (True,), True)
  offset = hf.get("pad_token_id", 1) + 1 if roberta else 0
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"],
    num_kv_heads=hf["num_attention_heads"],
    d_model=hf["hidden_size"],
    d_ff=hf["intermediate_size"],
    max_len=hf["max_position_embeddings"] - offset,
    position="learned",
    position_offset=offset,
    norm="layernorm",
    norm_eps=hf.get("layer_norm_eps", 1e-12),
    norm_position="post",
    mlp="gelu",
    gelu=GELU_ACTS[act],
    use_bias=True,
    tie_embeddings=True,
    type_vocab_size=hf.get("type_vocab_size", 2),
    dropout=hf.get("hidden_dropout_prob", 0.0),
  )


def _bert_write(m) -> dict:
  return dict(
    vocab_size=m.vocab_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    hidden_size=m.d_model,
    intermediate_size=m.d_ff,
    max_position_embeddings=m.max_len + m.position_offset,
    layer_norm_eps=m.norm_eps,
    hidden_act=GELU_NAMES[m.gelu],
    type_vocab_size=m.type_vocab_size,
    hidden_dropout_prob=m.dropout,
    attention_probs_dropout_prob=m.dropout,
    position_embedding_type="absolute",
    tie_word_embeddings=True,
  )


def _roberta_write(m) -> dict:
  return {**_bert_write(m), "pad_token_id": m.position_offset - 1}


def _bert_body(c: TransformerConfig, p: str) -> list[Link]:
  e = f"{p}embeddings"
  out = [
    _same(f"{e}.word_embeddings.weight", "embed/embedding"),
    _same(f"{e}.position_embeddings.weight", "pos_embedding"),
  ]
  if c.type_vocab_size:
    out.append(_same(f"{e}.token_type_embeddings.weight", "type_embedding"))
  out += _norm(f"{e}.LayerNorm", "embed_norm", True)
  for i in range(c.num_layers):
    h, b = f"{p}encoder.layer.{i}", f"block_{i}"
    for name in ("query", "key", "value"):
      out += _dense(f"{h}.attention.self.{name}", f"{b}/attn/{name}", True)
    out += _dense(f"{h}.attention.output.dense", f"{b}/attn/out", True, 2)
    out += _norm(f"{h}.attention.output.LayerNorm", f"{b}/attn_norm", True)
    out += _dense(f"{h}.intermediate.dense", f"{b}/mlp/up", True)
    out += _dense(f"{h}.output.dense", f"{b}/mlp/down", True)
    out += _norm(f"{h}.output.LayerNorm", f"{b}/mlp_norm", True)
  return out


def _bert_mlm_links(c: TransformerConfig) -> list[Link]:
  t = "cls.predictions"
  out = _bert_body(c, "bert.")
  out += _dense(f"{t}.transform.dense", "mlm_transform", True)
  out += _norm(f"{t}.transform.LayerNorm", "mlm_norm", True)
  return out + [_same(f"{t}.bias", "mlm_bias")]


def _bert_model_links(c: TransformerConfig) -> list[Link]:
  return _bert_body(c, "") + _dense("pooler.dense", "pooler", True)


def _roberta_links(c: TransformerConfig) -> list[Link]:
  out = _bert_body(c, "roberta.")
  out += _dense("lm_head.dense", "mlm_transform", True)
  out += _norm("lm_head.layer_norm", "mlm_norm", True)
  return out + [_same("lm_head.bias", "mlm_bias")]


def _deberta_config(hf: dict) -> dict:
  """DeBERTa-v2/v3 as DebertaV2ForMaskedLM computes it: no enhanced mask decoder (its MLM
  head reads the last layer; fourfold's emd_layers is 0 here)."""
  act = _require(hf, "hidden_act", tuple(GELU_ACTS), "gelu")
  _require(hf, "relative_attention", (True,), False)
  atts = hf.get("pos_att_type") or []
  atts = atts.split("|") if isinstance(atts, str) else atts
  if sorted(atts) != ["c2p", "p2c"]:
    raise Unsupported(f"config.json pos_att_type={atts!r}: fourfold supports ['p2c', 'c2p']")
  _require(hf, "share_att_key", (True,), False)
  _require(hf, "norm_rel_ebd", ("layer_norm",), "none")
  _require(hf, "position_biased_input", (False,), True)
  _require(hf, "type_vocab_size", (0,), 0)
  _require(hf, "conv_kernel_size", (0, None), 0)
  _require(hf, "embedding_size", (hf["hidden_size"], None), None)
  max_len, max_rel = hf["max_position_embeddings"], hf.get("max_relative_positions", -1)
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"],
    num_kv_heads=hf["num_attention_heads"],
    d_model=hf["hidden_size"],
    d_ff=hf["intermediate_size"],
    max_len=max_len,
    position="disentangled",
    position_buckets=max(hf.get("position_buckets", -1), 0),
    max_relative_positions=max_rel if max_rel >= 1 else max_len,
    emd_layers=0,
    norm="layernorm",
    norm_eps=hf.get("layer_norm_eps", 1e-7),
    norm_position="post",
    mlp="gelu",
    gelu=GELU_ACTS[act],
    use_bias=True,
    tie_embeddings=True,
    type_vocab_size=0,
    dropout=hf.get("hidden_dropout_prob", 0.0),
  )


def _deberta_write(m) -> dict:
  return dict(
    vocab_size=m.vocab_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    hidden_size=m.d_model,
    intermediate_size=m.d_ff,
    max_position_embeddings=m.max_len,
    layer_norm_eps=m.norm_eps,
    hidden_act=GELU_NAMES[m.gelu],
    hidden_dropout_prob=m.dropout,
    attention_probs_dropout_prob=m.dropout,
    relative_attention=True,
    position_buckets=m.position_buckets or -1,
    max_relative_positions=m.max_relative_positions,
    pos_att_type=["p2c", "c2p"],
    share_att_key=True,
    norm_rel_ebd="layer_norm",
    position_biased_input=False,
    type_vocab_size=0,
    legacy=True,
    tie_word_embeddings=True,
  )


def _deberta_links(c: TransformerConfig) -> list[Link]:
  e, t = "deberta.embeddings", "cls.predictions"
  out = [_same(f"{e}.word_embeddings.weight", "embed/embedding")]
  out += _norm(f"{e}.LayerNorm", "embed_norm", True)
  out.append(_same("deberta.encoder.rel_embeddings.weight", "rel_embed/embedding"))
  out += _norm("deberta.encoder.LayerNorm", "rel_embed/norm", True)
  for i in range(c.num_layers):
    h, b = f"deberta.encoder.layer.{i}", f"block_{i}"
    for name in ("query", "key", "value"):
      out += _dense(f"{h}.attention.self.{name}_proj", f"{b}/attn/{name}", True)
    out += _dense(f"{h}.attention.output.dense", f"{b}/attn/out", True, 2)
    out += _norm(f"{h}.attention.output.LayerNorm", f"{b}/attn_norm", True)
    out += _dense(f"{h}.intermediate.dense", f"{b}/mlp/up", True)
    out += _dense(f"{h}.output.dense", f"{b}/mlp/down", True)
    out += _norm(f"{h}.output.LayerNorm", f"{b}/mlp_norm", True)
  out += _dense(f"{t}.transform.dense", "mlm_transform", True)
  out += _norm(f"{t}.transform.LayerNorm", "mlm_norm", True)
  return out + [_same(f"{t}.bias", "mlm_bias")]


def _deepseek_config(hf: dict) -> dict:
  """DeepseekV3ForCausalLM (DeepSeek-V3, Kimi K2, Moonlight): MLA, the first
  first_k_dense_replace layers dense, the rest fine-grained MoE with sigmoid routing."""
  _require(hf, "hidden_act", ("silu",), "silu")
  _require(hf, "attention_bias", (False,), False)
  _require(hf, "scoring_func", ("sigmoid",), "sigmoid")  # the remote code's config keys
  _require(hf, "topk_method", ("noaux_tc",), "noaux_tc")
  _require(hf, "moe_layer_freq", (1,), 1)
  if hf.get("quantization_config"):
    method = hf["quantization_config"].get("quant_method")
    raise Unsupported(
      f"config.json quantization_config (quant_method={method!r}): import a bfloat16 / "
      "float32 checkpoint (the published FP8 weights need dequantizing first)"
    )
  if not hf.get("norm_topk_prob", True):
    raise Unsupported(
      "config.json norm_topk_prob=False: fourfold's router always normalizes the chosen "
      "experts' weights (modeling/moe.py route)"
    )
  if not hf.get("rope_interleave", True):
    raise Unsupported(
      "config.json rope_interleave=False: fourfold imports DeepSeek's interleaved rotary "
      "layout (the published checkpoints', transformers' default)"
    )
  eps = hf.get("rms_norm_eps", 1e-6)
  if eps != 1e-6:
    raise Unsupported(
      f"config.json rms_norm_eps={eps}: transformers normalizes MLA's latents with 1e-6 "
      "whatever rms_norm_eps says, fourfold with model.norm_eps everywhere; 1e-6 only"
    )
  heads = hf["num_attention_heads"]
  _require(hf, "num_key_value_heads", (heads, None), heads)
  rope = read_rope(hf, (*ROPE_KINDS, "yarn"))
  if rope["rope_scaling"]["type"] != "yarn":
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    _require(params, "mscale_all_dim", (0, 0.0, None), None)
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=heads,
    d_model=hf["hidden_size"],
    d_ff=hf["intermediate_size"],
    max_len=hf["max_position_embeddings"],
    position="rope",
    **rope,
    norm="rmsnorm",
    norm_eps=eps,
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=hf.get("tie_word_embeddings", False),
    attention="mla",
    mla=dict(
      q_lora_rank=hf.get("q_lora_rank") or 0,
      kv_lora_rank=hf["kv_lora_rank"],
      qk_nope_head_dim=hf["qk_nope_head_dim"],
      qk_rope_head_dim=hf["qk_rope_head_dim"],
      v_head_dim=hf["v_head_dim"],
    ),
    moe=dict(
      num_experts=hf["n_routed_experts"],
      top_k=hf["num_experts_per_tok"],
      num_shared_experts=hf.get("n_shared_experts") or 0,
      expert_d_ff=hf["moe_intermediate_size"],
      first_dense_layers=hf.get("first_k_dense_replace") or 0,
      routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
      n_group=hf.get("n_group") or 1,
      topk_group=hf.get("topk_group") or 1,
    ),
  )


def _deepseek_write(m) -> dict:
  a, e = m.mla, m.moe
  if m.attention != "mla" or not e.num_experts:
    raise Unsupported("DeepseekV3ForCausalLM: model.attention='mla' with model.moe.num_experts > 0")
  if e.num_experts // e.n_group < 2:
    raise Unsupported(
      f"model.moe.n_group={e.n_group}: transformers scores a group by its 2 best experts, so "
      "each group needs >= 2"
    )
  return dict(
    vocab_size=m.vocab_size,
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    num_key_value_heads=m.num_heads,
    hidden_size=m.d_model,
    intermediate_size=m.d_ff,
    max_position_embeddings=m.max_len,
    rms_norm_eps=m.norm_eps,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=m.tie_embeddings,
    q_lora_rank=a.q_lora_rank or None,
    kv_lora_rank=a.kv_lora_rank,
    qk_nope_head_dim=a.qk_nope_head_dim,
    qk_rope_head_dim=a.qk_rope_head_dim,
    v_head_dim=a.v_head_dim,
    rope_interleave=True,
    n_routed_experts=e.num_experts,
    num_experts_per_tok=e.top_k,
    n_shared_experts=e.num_shared_experts,
    moe_intermediate_size=e.expert_d_ff or m.d_ff,
    first_k_dense_replace=e.first_dense_layers,
    routed_scaling_factor=e.routed_scaling_factor,
    n_group=e.n_group,
    topk_group=e.topk_group,
    norm_topk_prob=True,
    num_nextn_predict_layers=0,
    **write_rope(m),
  )


def _rope_rows(link: Link, block: int, rope: int) -> Link:
  """DeepSeek's checkpoints lay each rotary block out interleaved (features 2i, 2i + 1 turn
  together), fourfold's RoPE rotates halves (i, i + rope / 2): the last `rope` of every
  `block` output rows of the HF tensor are reordered evens-then-odds on import, back on
  export. (transformers' interleaved RoPE returns the rotated features in the half layout,
  so the scores are the same.)"""
  evens_odds = np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
  back = np.argsort(evens_odds)

  def permute(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    rows = x.reshape(-1, block, *x.shape[1:])
    rows = np.concatenate([rows[:, : block - rope], rows[:, block - rope :][:, order]], axis=1)
    return rows.reshape(x.shape)

  return Link(
    link.hf,
    link.ours,
    lambda a, shapes: link.to_ours([permute(a[0], evens_odds)], shapes),
    lambda a: [permute(x, back) for x in link.to_hf(a)],
  )


def _experts(hf: list[str], ours: str) -> Link:
  """One Linear weight [out, in] per expert <-> the stacked expert kernel [E, in, out]."""
  return Link(
    tuple(hf),
    (ours,),
    lambda a, shapes: [np.stack([w.T for w in a]).reshape(shapes[0])],
    lambda a: [np.ascontiguousarray(w.T) for w in a[0]],
  )


def _deepseek_links(c: TransformerConfig) -> list[Link]:
  m, e = c.mla, c.moe
  qk, rope = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim
  out = [_same("model.embed_tokens.weight", "embed/embedding")]
  for i in range(c.num_layers):
    h, b = f"model.layers.{i}", f"block_{i}"
    s, a = f"{h}.self_attn", f"{b}/attn"
    out += _norm(f"{h}.input_layernorm", f"{b}/attn_norm", False)
    if m.q_lora_rank:
      out += [_linear(f"{s}.q_a_proj.weight", f"{a}/q_a/kernel")]
      out += _norm(f"{s}.q_a_layernorm", f"{a}/q_norm", False)
      out += [_rope_rows(_linear(f"{s}.q_b_proj.weight", f"{a}/q_b/kernel"), qk, rope)]
    else:
      out += [_rope_rows(_linear(f"{s}.q_proj.weight", f"{a}/query/kernel"), qk, rope)]
    kv_a = _linear(f"{s}.kv_a_proj_with_mqa.weight", f"{a}/kv_a/kernel")
    out += [_rope_rows(kv_a, m.kv_lora_rank + rope, rope)]
    out += _norm(f"{s}.kv_a_layernorm", f"{a}/kv_norm", False)
    out += [_linear(f"{s}.kv_b_proj.weight", f"{a}/kv_b/kernel")]
    out += [_linear(f"{s}.o_proj.weight", f"{a}/out/kernel", 2)]
    out += _norm(f"{h}.post_attention_layernorm", f"{b}/mlp_norm", False)
    mlp = ("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")
    if not e.is_moe(i):
      out += [_linear(f"{h}.mlp.{hf}.weight", f"{b}/mlp/{ours}/kernel") for hf, ours in mlp]
      continue
    g, moe = f"{h}.mlp", f"{b}/moe"
    out += [_linear(f"{g}.gate.weight", f"{moe}/router")]
    out += [_same(f"{g}.gate.e_score_correction_bias", f"{moe}/expert_bias")]
    for hf, ours in mlp:
      names = [f"{g}.experts.{j}.{hf}.weight" for j in range(e.num_experts)]
      out += [_experts(names, f"{moe}/expert_{ours}")]
    if e.num_shared_experts:
      shared = f"{g}.shared_experts"
      out += [_linear(f"{shared}.{hf}.weight", f"{moe}/shared/{ours}/kernel") for hf, ours in mlp]
  return out + _decoder_tail(c, "model.norm")


T5_MLPS = {
  "relu": ("relu", "erf"),
  "gated-gelu": ("geglu", "tanh"),
  "gated-silu": ("swiglu", "tanh"),
}


def _t5_config(hf: dict) -> dict:
  ff = _require(hf, "feed_forward_proj", tuple(T5_MLPS), "relu")
  mlp, gelu = T5_MLPS[ff]
  layers = hf["num_layers"]
  tied = hf.get("tie_word_embeddings", True)
  if tied and not hf.get("scale_decoder_outputs", True):
    raise Unsupported(
      "config.json tie_word_embeddings=true with scale_decoder_outputs=false: fourfold ties "
      "T5's head only with the d_model^-0.5 output scale of the original T5"
    )
  return dict(
    vocab_size=hf["vocab_size"],
    num_layers=layers,
    num_decoder_layers=hf.get("num_decoder_layers") or layers,
    num_heads=hf["num_heads"],
    num_kv_heads=hf["num_heads"],
    d_model=hf["d_model"],
    d_ff=hf["d_ff"],
    head_dim=hf["d_kv"],
    position="relative",
    rel_buckets=hf.get("relative_attention_num_buckets", 32),
    rel_max_distance=hf.get("relative_attention_max_distance", 128),
    norm="rmsnorm",
    norm_eps=hf.get("layer_norm_epsilon", 1e-6),
    mlp=mlp,
    gelu=gelu,
    use_bias=False,
    scale_attention=False,
    tie_embeddings=tied,
    dropout=hf.get("dropout_rate", 0.0),
  )


def _t5_write(m) -> dict:
  mlp = {v[0]: k for k, v in T5_MLPS.items()}
  return dict(
    vocab_size=m.vocab_size,
    num_layers=m.num_layers,
    num_decoder_layers=m.num_decoder_layers or m.num_layers,
    num_heads=m.num_heads,
    d_model=m.d_model,
    d_ff=m.d_ff,
    d_kv=m.head_dim or m.d_model // m.num_heads,
    relative_attention_num_buckets=m.rel_buckets,
    relative_attention_max_distance=m.rel_max_distance,
    layer_norm_epsilon=m.norm_eps,
    feed_forward_proj=mlp[m.mlp],
    dense_act_fn={"relu": "relu", "geglu": "gelu_new", "swiglu": "silu"}[m.mlp],
    is_gated_act=m.mlp != "relu",
    tie_word_embeddings=m.tie_embeddings,
    scale_decoder_outputs=m.tie_embeddings,
    dropout_rate=m.dropout,
    is_encoder_decoder=True,
  )


def _t5_mlp(c: TransformerConfig, h: str, b: str) -> list[Link]:
  if c.mlp == "relu":
    names = (("wi", "up"), ("wo", "down"))
  else:
    names = (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))
  return [_linear(f"{h}.DenseReluDense.{hf}.weight", f"{b}/mlp/{o}/kernel") for hf, o in names]


def _t5_attention(h: str, b: str) -> list[Link]:
  names = (("q", "query"), ("k", "key"), ("v", "value"))
  out = [_linear(f"{h}.{hf}.weight", f"{b}/{ours}/kernel") for hf, ours in names]
  return out + [_linear(f"{h}.o.weight", f"{b}/out/kernel", 2)]


def _t5_links(c: TransformerConfig) -> list[Link]:
  out = [_same("shared.weight", "embed/embedding")]
  for side, layers in (
    ("encoder", c.num_layers),
    ("decoder", c.num_decoder_layers or c.num_layers),
  ):
    rel = f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    out.append(_same(rel, f"{side}_rel_bias/embedding"))
    for i in range(layers):
      h, b = f"{side}.block.{i}.layer", f"{side}_block_{i}"
      out += _t5_attention(f"{h}.0.SelfAttention", f"{b}/attn")
      out += _norm(f"{h}.0.layer_norm", f"{b}/attn_norm", False)
      mlp = 1
      if side == "decoder":
        out += _t5_attention(f"{h}.1.EncDecAttention", f"{b}/cross_attn")
        out += _norm(f"{h}.1.layer_norm", f"{b}/cross_norm", False)
        mlp = 2
      out += _t5_mlp(c, f"{h}.{mlp}", b)
      out += _norm(f"{h}.{mlp}.layer_norm", f"{b}/mlp_norm", False)
    out += _norm(f"{side}.final_layer_norm", f"{side}_final_norm", False)
  return out + ([] if c.tie_embeddings else [_linear("lm_head.weight", "head/kernel")])


PRETRAIN = {"name": "pretrain"}
ARCHITECTURES = {
  a.name: a
  for a in (
    Arch(
      "GPT2LMHeadModel",
      "gpt2",
      "decoder",
      PRETRAIN,
      _gpt2_config,
      _gpt2_write,
      _gpt2_links,
      prefix="transformer.",
      ignored=("lm_head.weight", ".attn.bias", ".attn.masked_bias"),
    ),
    Arch(
      "LlamaForCausalLM",
      "llama",
      "decoder",
      PRETRAIN,
      _llama_config,
      _llama_write,
      _llama_links,
      ignored=("rotary_emb.inv_freq",),
    ),
    Arch(
      "Phi3ForCausalLM",
      "phi3",
      "decoder",
      PRETRAIN,
      lambda hf: _llama_config(hf, phi3=True),
      _phi3_write,
      _phi3_links,
      ignored=("rotary_emb.inv_freq",),
    ),
    Arch(
      "BloomForCausalLM",
      "bloom",
      "decoder",
      PRETRAIN,
      _bloom_config,
      _bloom_write,
      _bloom_links,
      prefix="transformer.",
      ignored=("lm_head.weight",),
    ),
    Arch(
      "DeepseekV3ForCausalLM",
      "deepseek_v3",
      "decoder",
      PRETRAIN,
      _deepseek_config,
      _deepseek_write,
      _deepseek_links,
      ignored=("rotary_emb.inv_freq",),
      unused_layers=True,
    ),
    Arch(
      "BertForMaskedLM",
      "bert",
      "encoder",
      PRETRAIN,
      _bert_config,
      _bert_write,
      _bert_mlm_links,
      ignored=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "position_ids"),
      unused=("bert.pooler.", "cls.seq_relationship."),
    ),
    Arch(
      "BertModel",
      "bert",
      "encoder",
      {"name": "embed", "pooling": "pooler"},
      _bert_config,
      _bert_write,
      _bert_model_links,
      ignored=("position_ids",),
    ),
    Arch(
      "RobertaForMaskedLM",
      "roberta",
      "encoder",
      PRETRAIN,
      lambda hf: _bert_config(hf, roberta=True),
      _roberta_write,
      _roberta_links,
      ignored=("lm_head.decoder.weight", "lm_head.decoder.bias", "position_ids"),
      unused=("roberta.pooler.",),
    ),
    Arch(
      "DebertaV2ForMaskedLM",
      "deberta-v2",
      "encoder",
      PRETRAIN,
      _deberta_config,
      _deberta_write,
      _deberta_links,
      ignored=("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "position_ids"),
      unused=("lm_predictions.", "mask_predictions."),
    ),
    Arch(
      "T5ForConditionalGeneration",
      "t5",
      "encdec",
      {"name": "seq2seq"},
      _t5_config,
      _t5_write,
      _t5_links,
      ignored=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"),
    ),
  )
}


def arch_of(hf_config: dict) -> Arch:
  """The Arch of a config.json's `architectures`, or an error listing the supported ones."""
  names = hf_config.get("architectures") or []
  for name in names:
    if name in ARCHITECTURES:
      return ARCHITECTURES[name]
  raise Unsupported(f"config.json architectures={names}: fourfold imports {sorted(ARCHITECTURES)}")
