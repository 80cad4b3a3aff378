"""Every config key fourfold reads, with its default and a one-line comment.

Presets (`configs/gpt.py`, `configs/llama.py`, ...) start from `get_config()`
and override. Any key can be overridden from the command line, e.g.
`--config.train.steps=100`. `parse_args` reads a preset's argument string
(`configs/llama.py:size=S,foo=bar`).
"""

from __future__ import annotations

import functools

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  # Derived keys follow the keys they come from, through presets and `--config.x=y`
  # overrides, until they are set themselves (ml_collections one-way field references; a
  # run's config.json holds the resolved values):
  #   model.num_kv_heads      = model.num_heads (MHA); Llama presets set GQA counts
  #   model.d_ff              = 4 x model.d_model; Llama, T5 and BitNet presets set their own
  #   model.embed_dim         = min(128, model.d_model // 4) in configs/bert.py:arch=albert
  #   data.text_field         configs/bert.py:task=classify: 'sentence' while data.name is
  #                           glue/sst2, else 'text' (JSONL records {"text", "label"})
  # Keys whose 0 means "derived", resolved where they are read:
  #   model.vocab_size = the tokenizer's, model.head_dim = d_model // num_heads,
  #   model.max_len = data.seq_len, model.embed_dim = d_model,
  #   model.num_decoder_layers = model.num_layers, data.target_len = span corruption's
  #   need / data.seq_len, train.eval_batch_size = train.batch_size.
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds init, data order and in-step randomness (dropout, masks)
  c.init_from = ""  # a run's workdir or step dir to start from when the workdir has none

  c.data = ml_collections.ConfigDict()
  c.data.name = "pystdlib"  # TFDS name (lm1b, tiny_shakespeare, c4/en, ...), pystdlib, text:<glob>, jsonl:<glob>, arrayrecord:<dir> (python -m train.data.prepare)
  c.data.eval_name = ""  # separate evaluation source; empty: local sources hold out their last 10%
  c.data.eval_split = ""  # TFDS split(s) evaluated, e.g. validation+test; empty: validation, else test; local sources: unused
  c.data.tokenizer = "byte"  # byte | spm:<SentencePiece .model> | hf:<Hugging Face model dir>
  c.data.text_field = "text"  # the text feature of TFDS examples / the text key of JSONL records
  c.data.seq_len = 256  # packed sequence length in tokens
  c.data.tfds_data_dir = ""  # TFDS data dir; empty: TFDS's default (~/tensorflow_datasets)
  c.data.shuffle_window = 4096  # packed sequences shuffled together (window shuffle after packing)
  c.data.shards = 1  # training streams packed apart, each giving batch_size/shards rows of every batch; any process count
  c.data.doc_separator = ""  # text:<glob>: the string between documents (e.g. <|endoftext|>); empty: a document per file
  c.data.span_bytes = 1 << 20  # text:<glob>: longer documents are read in pieces of at most this many bytes
  c.data.target_len = 0  # encdec: decoder length; 0: what span corruption needs / data.seq_len

  c.model = ml_collections.ConfigDict()
  c.model.family = "decoder"  # decoder | encoder | encdec (T5) | diffusion (train/families.py)
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
  c.model.num_layers = 4  # transformer blocks (encdec: of the encoder)
  c.model.num_decoder_layers = 0  # encdec: decoder blocks; 0: model.num_layers
  c.model.num_heads = 4  # query heads
  # key/value heads: follows num_heads (MHA) unless set; 1 is MQA, in between is GQA
  c.model.num_kv_heads = c.model.get_oneway_ref("num_heads")
  c.model.d_model = 128  # model width
  c.model.d_ff = c.model.get_ref("d_model") * 4  # MLP hidden width: follows 4 x d_model unless set
  c.model.head_dim = 0  # 0: d_model // num_heads
  c.model.max_len = 0  # longest position the model supports; 0: data.seq_len
  c.model.position = "learned"  # learned | rope | relative (T5) | alibi | disentangled | none
  c.model.rel_buckets = 32  # relative: buckets of T5's log-spaced relative positions
  c.model.rel_max_distance = 128  # relative: distances from here on share the last bucket
  c.model.position_buckets = 256  # disentangled: DeBERTa's log buckets per side; 0: exact
  c.model.max_relative_positions = 512  # disentangled: the distance the last bucket reaches
  c.model.emd_layers = 0  # disentangled MLM: enhanced mask decoder passes; 0: none
  c.model.neighbor_mix = 0  # encoder / diffusion: each position also reads a zero-initialized linear map of its +-N neighbours' embeddings; 0: off
  c.model.rope_theta = 10000.0  # RoPE base frequency
  c.model.rope_fraction = 1.0  # share of each head's features RoPE rotates (partial_rotary_factor)
  c.model.rope_scaling = ml_collections.ConfigDict()  # RoPE context extension (modeling/rope.py)
  c.model.rope_scaling.type = "none"  # none | linear | llama3 | longrope (Phi-3) | yarn
  c.model.rope_scaling.factor = 1.0  # linear, llama3, yarn: the context extension factor
  c.model.rope_scaling.low_freq_factor = 1.0  # llama3: scale wavelengths > original_max_len / this
  c.model.rope_scaling.high_freq_factor = 4.0  # llama3: keep wavelengths < original_max_len / this
  c.model.rope_scaling.original_max_len = 0  # llama3, longrope, yarn: the pretraining context
  c.model.rope_scaling.short_factor = ()  # longrope: per-frequency divisors within original_max_len
  c.model.rope_scaling.long_factor = ()  # longrope: per-frequency divisors past it
  c.model.rope_scaling.attention_factor = 1.0  # longrope: cos and sin are multiplied by it
  c.model.rope_scaling.beta_fast = 32.0  # yarn: dims turning > this often in original_max_len kept
  c.model.rope_scaling.beta_slow = 1.0  # yarn: dims turning < this often divided by factor
  c.model.rope_scaling.mscale = 1.0  # yarn: cos and sin's temperature factor (modeling/rope.py)
  c.model.rope_scaling.mscale_all_dim = 0.0  # yarn: and of MLA's softmax scale (V3: 1); 0: none
  c.model.position_offset = 0  # learned positions: the table row of position 0 (RoBERTa: 2)
  c.model.norm = "layernorm"  # layernorm | rmsnorm
  c.model.norm_eps = 1e-5  # epsilon of the norms
  c.model.mlp = "gelu"  # gelu | relu (T5) | swiglu (Llama) | geglu (T5 v1.1 gated-GELU)
  c.model.gelu = "tanh"  # tanh | erf: every GELU (MLP, GeGLU, MLM head); BERT uses erf
  c.model.scale_attention = True  # logits scaled by 1/sqrt(head_dim); False: T5 (unscaled)
  c.model.use_bias = True  # biases in dense layers and LayerNorm
  c.model.tie_embeddings = True  # LM head shares the token embedding matrix
  c.model.dropout = 0.0  # dropout on embeddings, attention output and MLP output
  c.model.sliding_window = 0  # >0: each query sees this many keys, itself included
  c.model.attention = "mha"  # mha (multi-head, GQA, MQA) | mla (multi-head latent: DeepSeek-V2/V3)
  c.model.mla = ml_collections.ConfigDict()  # attention=mla: its sizes (modeling/mla.py)
  c.model.mla.q_lora_rank = 0  # query latent rank; 0: queries straight from x (DeepSeek-V3: 1536)
  c.model.mla.kv_lora_rank = 128  # rank of the cached key/value latent c_KV (DeepSeek-V3: 512)
  c.model.mla.qk_nope_head_dim = 32  # per-head query/key features without RoPE (DeepSeek-V3: 128)
  c.model.mla.qk_rope_head_dim = 16  # rotary query/key features, one key for all heads (V3: 64)
  c.model.mla.v_head_dim = 32  # each head's value features (DeepSeek-V3: 128)
  c.model.attention_impl = "xla"  # xla | cudnn (GPU) | splash (Pallas TPU; seq_len % 128 == 0)
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32)
  c.model.scan_layers = False  # nn.scan over layers: faster compiles; off is faster on CPU
  c.model.remat = "none"  # none | full | dots (save matmul outputs) | dots_no_batch
  c.model.quant = "none"  # none | bitnet158 (ternary) | bitnet1 (binary): 8-bit activations, QAT
  c.model.norm_position = "pre"  # pre (x + f(norm(x))) | post (norm(x + f(x)), BERT)
  c.model.block = "serial"  # serial (attention, then MLP) | parallel (one norm, PaLM)
  c.model.embed_norm = False  # a norm right after the embeddings of a pre-norm stack (BLOOM)
  c.model.type_vocab_size = 0  # token-type (sentence A/B) embeddings, BERT: 2; 0: none
  c.model.embed_dim = 0  # factorized embedding width (ALBERT); 0: d_model
  c.model.share_layers = False  # all layers share one set of weights (ALBERT)
  c.model.time_conditioning = False  # diffusion: the model sees the time t (MDLM works without)
  c.model.lora = ml_collections.ConfigDict()  # LoRA on the blocks' linear layers
  c.model.lora.rank = 0  # adapter rank; 0: no adapters, every parameter trains
  c.model.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.model.lora.targets = "attn/(query|key|value|out)$"  # regex over paths: attn/query, mlp/up
  c.model.lora.base_quant = "none"  # frozen base: none | nf4 (QLoRA) | ternary (BitNet, packed)
  c.model.lora.base_dtype = "float32"  # a float base is held in float32 | bfloat16
  c.model.moe = ml_collections.ConfigDict()  # mixture of experts, DeepSeek-V3 (modeling/moe.py)
  c.model.moe.num_experts = 0  # routed experts; 0: every layer keeps the dense MLP
  c.model.moe.top_k = 1  # routed experts per token
  c.model.moe.num_shared_experts = 0  # one SwiGLU of this times expert_d_ff, added unweighted
  c.model.moe.expert_d_ff = 0  # each expert's SwiGLU width; 0: model.d_ff
  c.model.moe.first_dense_layers = 0  # the first layers keep the dense MLP (DeepSeek-V3: 3)
  c.model.moe.routed_scaling_factor = 1.0  # the routed experts' normalized gates are scaled by it
  c.model.moe.n_group = 1  # expert groups for group-limited routing; 1: no groups
  c.model.moe.topk_group = 1  # groups kept per token (by the sum of each group's 2 best scores)
  c.model.moe.capacity_factor = 0.0  # > 0: capacity factor (overflow dropped); <= 0: dropless
  c.model.moe.impl = "ragged"  # ragged (all-to-all when mesh.expert > 1) | dense (reference)
  c.model.moe.bias_update_rate = 0.0  # bias += rate * sign(mean load - load) each step; 0: off
  c.model.moe.balance_loss = 0.0  # weight of the sequence-wise balance loss L_Bal; 0: off

  c.task = ml_collections.ConfigDict()
  c.task.name = "pretrain"  # pretrain | classify | regress | ner | embed | seq2seq | sft | dpo
  c.task.mask_prob = 0.15  # MLM: share of ordinary tokens selected for prediction
  c.task.mask_token_prob = 0.8  # MLM: selected tokens replaced by [MASK]
  c.task.random_token_prob = 0.1  # MLM: selected tokens replaced by a random token (rest kept)
  c.task.num_labels = 0  # classes of a classification head
  c.task.label_field = "label"  # the label (NER: tags) feature / JSONL key of labeled examples
  c.task.text_pair_field = ""  # second text of pair tasks (STS-B's sentence2); empty: none
  c.task.tokens_field = "tokens"  # NER: the list-of-words feature / JSONL key
  c.task.tag_names = ""  # NER: comma-separated tag names; empty: the TFDS feature's names
  c.task.temperature = 0.05  # embed: softmax temperature of the in-batch contrastive loss
  c.task.min_score = 4.0  # embed: training pairs scored below this are not positives
  c.task.pooling = "cls"  # sequence pooling: cls (first token) | mean | pooler (BERT's)
  c.task.schedule = "loglinear"  # diffusion noise schedule: loglinear | cosine | polynomial
  c.task.schedule_exponent = 1.0  # diffusion: the exponent of the polynomial schedule 1 - t^w
  c.task.estimator = "time"  # diffusion training NELBO draw: time (t ~ U(0,1), w(t)) | count (k ~ U{1..n} masked, weight n/k; time-independent models; eval always time)
  c.task.eval_t_samples = 4  # diffusion: time draws averaged per evaluation batch
  c.task.noise_density = 0.15  # encdec pretrain: share of tokens hidden in spans (T5)
  c.task.mean_span_length = 3.0  # encdec pretrain: mean length of a hidden span
  c.task.num_sentinels = 100  # encdec: sentinel ids appended after the tokenizer's vocabulary
  c.task.mixture = ""  # seq2seq: 'source@rate;source@rate' (Flan-style mixture); empty: data.name
  c.task.templates = "t5"  # seq2seq, TFDS: t5 (task prefix) | flan (an instruction per example)
  c.task.inputs_field = "inputs"  # seq2seq: the JSONL key (or TFDS feature) of the input text
  c.task.targets_field = "targets"  # seq2seq: the JSONL key (or TFDS feature) of the target text
  c.task.eval_decode = 256  # seq2seq, sft: eval examples decoded (EM, ROUGE, BLEU); 0: none
  c.task.beam_size = 1  # seq2seq evaluation decoding: 1 is greedy
  c.task.length_penalty = 0.6  # beam search: GNMT length penalty exponent alpha
  c.task.template = "chatml"  # sft, dpo: chatml | phi3 | llama2 | plain | completion
  c.task.messages_field = "messages"  # sft: the JSONL key of a {role, content} list
  c.task.prompt_field = "prompt"  # sft, dpo: the JSONL key of a prompt (text or messages)
  c.task.response_field = "response"  # sft: the JSONL key of a response (with prompt_field)
  c.task.chosen_field = "chosen"  # dpo: the JSONL key of the preferred answer
  c.task.rejected_field = "rejected"  # dpo: the JSONL key of the dispreferred answer
  c.task.loss = "dpo"  # dpo: dpo | cdpo | ipo | orpo | simpo (train/preference.py)
  c.task.beta = 0.1  # dpo: beta of the implicit reward (orpo: the odds-ratio weight)
  c.task.label_smoothing = 0.0  # cdpo: the probability that a preference label is flipped
  c.task.simpo_gamma = 0.5  # simpo: the target reward margin gamma
  c.task.reference = "frozen"  # dpo: frozen (initial weights) | adapter_base | precomputed
  # task.name=distill (docs/distillation.md): DistilBERT's loss, weights as its paper's
  c.task.teacher = ""  # distill: the teacher run's workdir or step dir (same family, tokenizer)
  c.task.distill_temperature = 2.0  # distill: softmax temperature T of the KD term (times T^2)
  c.task.distill_kd_weight = 5.0  # distill: weight of T^2 KL(teacher || student) (DistilBERT 5)
  c.task.distill_task_weight = 2.0  # distill: weight of the student's own objective (DistilBERT 2)
  c.task.distill_cos_weight = 1.0  # distill: weight of 1 - cos of final hidden states; 0: off
  c.task.distill_init = "none"  # distill: none | every_other (from teacher layers 0, s, 2s, ..)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimizer steps
  c.train.batch_size = 16  # global batch, in sequences
  c.train.grad_accum = 1  # microbatches per step; batch_size must divide by it
  c.train.learning_rate = 1e-3  # peak learning rate
  c.train.min_learning_rate = 1e-4  # learning rate at the end of the decay
  c.train.warmup_steps = 50  # linear warmup from 0
  c.train.schedule = "cosine"  # cosine | linear | constant (after warmup) | two_stage (BitNet)
  c.train.cooldown_start = 0.5  # two_stage: share of the steps before the cooldown (stage 2)
  c.train.cooldown_learning_rate = 3e-4  # two_stage: stage 2's peak rate; weight decay is 0 then
  c.train.b1 = 0.9  # AdamW beta1
  c.train.b2 = 0.99  # AdamW beta2
  c.train.weight_decay = 0.1  # AdamW decoupled weight decay, on matrices only
  c.train.grad_clip = 1.0  # global gradient-norm clip; 0 disables
  c.train.ema_decay = 0.0  # > 0: evaluate, sample and export an EMA of the params; 0: off
  c.train.quant_warmup_steps = 0  # steps blending float into model.quant (conversion); 0: none
  c.train.quant_warmup_shape = "linear"  # linear | cosine: the blend's lambda against the step
  c.train.log_every = 50  # steps between train metric lines
  c.train.eval_every = 250  # steps between evaluations (and at the end); 0 disables
  c.train.eval_steps = 32  # batches per evaluation (always the first ones); 0: whole split
  c.train.eval_batch_size = 0  # 0: train.batch_size
  c.train.checkpoint_every = 250  # steps between checkpoints (and at the end)
  c.train.keep_checkpoints = 3  # checkpoints kept in the workdir
  c.train.profile_steps = 0  # steps traced by the JAX profiler into <workdir>/tensorboard; 0: none
  c.train.profile_start = 3  # the first traced step (step 1 compiles)
  c.train.peak_tflops = 0.0  # per-device peak for perf/mfu; 0: measure a float32 matmul
  c.train.num_samples = 3  # samples printed at the end of a run; 0: none
  c.train.sample_tokens = 200  # tokens per end-of-run sample
  c.train.sample_prompts = "def |import |class "  # '|'-separated prompts for end-of-run samples

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel size (replicas); -1: the devices left over
  c.mesh.expert = 1  # expert-parallel size: MoE experts split over it; data-parallel elsewhere
  c.mesh.fsdp = -1  # FSDP size: params and optimizer state split over it; -1: the devices left over
  c.mesh.tensor = 1  # tensor-parallel size

  # logical axis name -> mesh axis (or axes); the whole sharding strategy.
  c.logical_axis_rules = (
    ("act_batch", ("data", "expert", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("factor", None),
    ("labels", None),
    ("lora_rank", None),
    ("latent", "fsdp"),  # MLA latents: q_b and kv_b split their input rank over fsdp
    ("quant_blocks", "fsdp"),
    ("expert", "expert"),
  )

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # host:port of process 0; empty: single process
  c.distributed.num_processes = 0  # processes in all; needed with coordinator_address
  c.distributed.process_id = -1  # this process, 0 .. num_processes - 1; needed with it too
  return c


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's config from its config.json: keys added since it was saved keep their defaults,
  and the axis rules are tuples again."""
  c = get_config()
  c.update(saved)
  c.logical_axis_rules = tuple(
    (k, tuple(v) if isinstance(v, list) else v) for k, v in c.logical_axis_rules
  )
  return c


def derived(node: ml_collections.ConfigDict, key: str, fn) -> ml_collections.FieldReference:
  """A one-way reference to `fn(node[key])`: it follows `key` through later overrides until
  it is set itself. (ml_collections' public reference ops are arithmetic; this applies any
  function the same way, as `get_oneway_ref` does.)"""
  return node.get_ref(key)._apply_op(fn)


def source_field(c: ml_collections.ConfigDict, source: str, there: str, elsewhere: str):
  """A field name that is `there` while `data.name` is the TFDS dataset `source` (any
  version), else `elsewhere`: a task preset's feature names follow its data source."""
  return derived(c.data, "name", functools.partial(_field_for, source, there, elsewhere))


def _field_for(source: str, there: str, elsewhere: str, name: str) -> str:
  return there if name.split(":")[0] == source else elsewhere


def parse_args(arg: str | None, defaults: dict[str, str]) -> dict[str, str]:
  """Parses a preset argument string `k=v,k2=v2` against known keys."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(
        f"config argument {item!r}: expected key=value with key in {sorted(defaults)}"
      )
    out[key] = value
  return out


# post-training tasks a preset's `task=` argument sets up: (task keys, train keys)
POST_TRAINING = {
  "sft": (
    {"name": "sft"},
    dict(learning_rate=3e-4, min_learning_rate=3e-5, warmup_steps=20, steps=500, eval_every=100),
  ),
  "dpo": (
    {"name": "dpo"},
    dict(learning_rate=5e-5, min_learning_rate=5e-6, warmup_steps=20, steps=300, eval_every=100),
  ),
}


def post_training(c: ml_collections.ConfigDict, task: str) -> None:
  """A preset's `task=sft|dpo` (docs/post_training.md): conversations or preference pairs
  from data.name=jsonl:<glob>, fine-tuning rates, no weight decay, no end-of-run samples
  (their prompts are not conversations); `task=pretrain` changes nothing."""
  if task == "pretrain":
    return
  task_keys, train_keys = choose("task", task, {"pretrain": None, **POST_TRAINING})
  c.task.update(task_keys)
  c.train.update(dict(weight_decay=0.0, num_samples=0, checkpoint_every=100, **train_keys))


def choose(name: str, value: str, table: dict) -> dict:
  """Looks `value` up in `table`, naming the allowed values on failure."""
  if value not in table:
    raise ValueError(f"config argument {name}={value!r}: allowed {list(table)}")
  return table[value]
