"""SFT and DPO wiring: packed conversations and their loss mask, the SFT objective's mask,
decode prompts, DPO at the reference, the reference modes, vocabulary growth for template
tokens, and a DPO run resumed equal to an uninterrupted one."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import draw_params, tiny_config
from train import families, objectives, trainer
from train.data import chat
from train.data.tokenizers import ByteTokenizer
from train.metrics import read_metrics


def conversation(i: int) -> dict:
  word = "".join("abcdefgh"[(i * 7 + k * 3) % 8] for k in range(3 + i % 4))
  return {
    "messages": [
      {"role": "system", "content": "Answer in one word."},
      {"role": "user", "content": f"reverse: {word}"},
      {"role": "assistant", "content": word[::-1]},
    ]
  }


def preference(i: int) -> dict:
  word = "".join("abcdefgh"[(i * 5 + k) % 8] for k in range(4 + i % 3))
  return {"prompt": f"x = {word}", "chosen": f"print('{word}')", "rejected": f'print("{word}")'}


def write(path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return f"jsonl:{path}"


def config_for(task: str, data_name: str, seq_len: int = 48, **train):
  c = tiny_config("gpt", f"task={task}", name=data_name, seq_len=seq_len)
  c.train.update(
    dict(batch_size=4, steps=4, warmup_steps=0, schedule="constant", log_every=1)
    | dict(eval_every=0, checkpoint_every=2, peak_tflops=1.0, learning_rate=1e-3)
  )
  c.train.update(train)
  return c


@pytest.fixture(scope="module")
def sft_config(tmp_path_factory):
  name = write(tmp_path_factory.mktemp("sft") / "chat.jsonl", [conversation(i) for i in range(40)])
  return config_for("sft", name, seq_len=96)


def test_packed_rows_hold_whole_conversations_with_the_answer_masked(sft_config):
  """Each segment of a packed row is one conversation from its first token; the masked
  tokens of a segment are exactly its answer and the template's end of turn."""
  tok = ByteTokenizer()
  ids = chat.token_ids("chatml", tok)
  answers = {conversation(i)["messages"][-1]["content"] for i in range(40)}
  batch = next(iter(chat.sft_eval_batches(sft_config, tok, batch_size=4)))
  seen = 0
  for tokens, seg, pos, mask in zip(*(batch[k] for k in chat_keys()), strict=True):
    for s in set(seg[seg > 0].tolist()):
      where = seg == s
      assert pos[where].tolist() == list(range(where.sum()))
      assert tokens[where][0] == ids["<|im_start|>"]
      masked = tokens[where & (mask > 0)]
      assert masked[-1] == ids["<|im_end|>"]
      assert tok.decode(masked[:-1]) in answers
      seen += 1
  assert seen >= 4


def chat_keys():
  return ("tokens", "segment_ids", "positions", "loss_mask")


class FixedLogits:
  """A stand-in model whose logits ignore the tokens: the loss then depends on the labels
  alone, so the test sees which labels the objective counts."""

  def __init__(self, logits_BLV):
    self.logits_BLV = logits_BLV

  def apply(self, variables, tokens_BL, *args, **kwargs):
    return self.logits_BLV, None


def test_sft_loss_is_unchanged_by_any_label_outside_the_mask(sft_config):
  tok = ByteTokenizer()
  batch = {
    k: jnp.asarray(v)
    for k, v in next(iter(chat.sft_eval_batches(sft_config, tok, batch_size=2))).items()
  }
  b, n = batch["tokens"].shape
  model = FixedLogits(jax.random.normal(jax.random.key(0), (b, n, tok.vocab_size + 2)))
  sft = objectives.make_sft(sft_config.task, tok.vocab_size, tok.specials)
  base = float(sft(model, None, batch, None, True)["loss_sum"])
  changed = 0
  for i in range(b):
    for j in range(1, n):
      tokens = batch["tokens"].at[i, j].set((batch["tokens"][i, j] + 17) % tok.vocab_size)
      loss = float(sft(model, None, {**batch, "tokens": tokens}, None, True)["loss_sum"])
      inside = (
        bool(batch["loss_mask"][i, j])
        and batch["segment_ids"][i, j] == batch["segment_ids"][i, j - 1]
      )
      if inside:
        changed += loss != base
      else:
        assert loss == base, (i, j)
  assert changed == int(jnp.sum(batch["loss_mask"][:, 1:] * (batch["segment_ids"][:, 1:] > 0)))


def test_decode_prompts_end_where_the_answer_begins(sft_config):
  tok = ByteTokenizer()
  prompts, refs = chat.decode_prompts(sft_config, tok, 0)
  ids = chat.token_ids("chatml", tok)
  convs = chat.conversations(sft_config, "validation")
  assert len(prompts) == len(convs) == 4
  for prompt, ref, conv in zip(prompts, refs, convs, strict=True):
    whole, _ = chat.encode(conv, "chatml", tok, ids)
    answer = np.concatenate([prompt, tok.encode(ref), [ids["<|im_end|>"]]])
    assert ref == conv[-1]["content"]
    np.testing.assert_array_equal(whole[: answer.size], answer)
    assert tok.decode(prompt).endswith("assistant\n")


def test_sft_iterator_resumes_exactly(sft_config):
  tok = ByteTokenizer()
  it = chat.sft_train_iterator(sft_config, tok, batch_size=4, seed=3)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = next(it)
  again = chat.sft_train_iterator(sft_config, tok, batch_size=4, seed=3)
  again.set_state(state)
  got = next(again)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_encdec_sft_pairs_are_prompt_and_answer(sft_config):
  c = tiny_config("t5", "task=sft", name=sft_config.data.name)
  pairs = chat.ChatPairs(c, "train")
  source, target = pairs[0]
  word = conversation(0)["messages"][-1]["content"][::-1]
  assert source == f"System: Answer in one word.\nUser: reverse: {word}\nAssistant:"
  assert target == word[::-1]
  solo = chat.ChatPairs(c, "train")
  solo.convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]
  assert solo[0] == ("hi", "yo")


@pytest.fixture(scope="module")
def dpo_setup(tmp_path_factory):
  name = write(tmp_path_factory.mktemp("dpo") / "prefs.jsonl", [preference(i) for i in range(40)])
  config = config_for("dpo", name)
  tok = ByteTokenizer()
  wiring = families.resolve(config)
  model, _ = wiring.build(config, tok)
  params = draw_params(
    jax.eval_shape(model.init, jax.random.key(0), *[jnp.zeros((1, 8), jnp.int32)] * 3)["params"]
  )
  rows = chat.preference_rows(config, tok, "train")
  batch = {k: jnp.asarray(v[:8]) for k, v in rows.items()}
  return config, tok, model, params, batch


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo"])
def test_at_the_reference_dpo_is_ln2_rewards_zero_and_modes_agree(dpo_setup, loss):
  """Policy = reference: DPO's loss is ln 2 (cDPO's too, IPO's (1/(2 beta))^2), every reward
  and the accuracy 0; the precomputed reference gives the frozen one's sums (to float
  rounding: the stored log-probs come from another compile)."""
  config, tok, model, params, batch = dpo_setup
  task = config.task.copy_and_resolve_references()
  task.loss, task.label_smoothing = loss, 0.2
  frozen = objectives.make_dpo(task, tok.vocab_size, tok.specials)
  sums = jax.jit(lambda p, b: frozen(model, p, b, jax.random.key(0), True, reference=p))(
    params, batch
  )
  pairs = float(sums["weight"])
  assert pairs == 8
  want = {"dpo": math.log(2), "cdpo": math.log(2), "ipo": (1 / (2 * task.beta)) ** 2}[loss]
  assert abs(float(sums["loss_sum"]) / pairs - want) < 1e-6 * max(1.0, want)
  for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
    assert float(sums[key]) == 0.0, key
  c, r, _, _ = objectives.pair_logps(model, params, batch, jax.random.key(0), True)
  task.reference = "precomputed"
  pre = objectives.make_dpo(task, tok.vocab_size, tok.specials)
  stored = {**batch, "ref_logps": jnp.stack([c, r], -1)}
  sums_pre = jax.jit(lambda p, b: pre(model, p, b, jax.random.key(0), True))(params, stored)
  for key in [k for k in sums if k != "rewards/accuracy"]:  # accuracy: a strict > of ~0s
    np.testing.assert_allclose(float(sums_pre[key]), float(sums[key]), rtol=1e-5, atol=1e-5)


def test_both_answers_of_a_pair_are_scored_on_the_answer_tokens_only(dpo_setup):
  config, tok, _, _, batch = dpo_setup
  row = {k: np.asarray(v[0]) for k, v in batch.items()}
  for side in ("chosen", "rejected"):
    answer = tok.decode(row[f"{side}_tokens"][row[f"{side}_mask"] > 0][:-1])
    assert answer == preference(0)[side]


def test_init_from_grows_the_vocabulary_by_the_template_rows(tmp_path):
  """A pretrained byte model (264 rows) starts an SFT model with chatml's 2 more: the saved
  rows are loaded first, the new ones initialized fresh."""
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("def f(x):\n  return x + 1\n" * 200)
  pre = config_for("pretrain", f"text:{corpus}", steps=1, checkpoint_every=1, num_samples=0)
  trainer.run(pre, str(tmp_path / "pre"))
  _, _, saved, _ = trainer.load_for_inference(str(tmp_path / "pre"))
  sft = config_for("sft", "jsonl:unused")
  sft.init_from = str(tmp_path / "pre")
  model, _ = families.resolve(sft).build(sft, ByteTokenizer())
  assert model.cfg.vocab_size == 266
  tx = trainer.make_optimizer(sft.train)
  mesh = trainer.sharding.make_mesh(sft.mesh)
  rules = trainer.sharding.rules(sft)
  _, shardings, _ = trainer.abstract_state(sft, model, tx, mesh, rules)
  with jax.set_mesh(mesh), trainer.nn.logical_axis_rules(rules):
    state = trainer.initial_state(sft, model, tx, shardings, mesh, rules)
  grown = np.asarray(state.params["embed"]["embedding"])
  assert grown.shape[0] == 266
  np.testing.assert_array_equal(grown[:264], np.asarray(saved["embed"]["embedding"]))
  assert np.abs(grown[264:]).sum() > 0


def test_dpo_resumed_equals_uninterrupted_with_a_rebuilt_reference(dpo_setup, tmp_path):
  """The frozen reference is never saved: a resumed run rebuilds it from the initial weights
  and logs the same losses and rewards as one straight run."""
  config = dpo_setup[0]
  trainer.run(config, str(tmp_path / "straight"))
  half = config.copy_and_resolve_references()
  half.train.steps = 2
  trainer.run(half, str(tmp_path / "resumed"))
  trainer.run(config, str(tmp_path / "resumed"))
  straight, resumed = (read_metrics(str(tmp_path / d)) for d in ("straight", "resumed"))
  keys = ("train/loss", "train/rewards/margin", "train/rewards/chosen")
  assert [m["step"] for m in resumed] == [1, 2, 3, 4]
  assert [[m[k] for k in keys] for m in resumed] == [[m[k] for k in keys] for m in straight]


def test_dpo_reference_free_losses_skip_the_reference(dpo_setup):
  config, tok, model, params, batch = dpo_setup
  task = config.task.copy_and_resolve_references()
  task.loss = "simpo"
  simpo = objectives.make_dpo(task, tok.vocab_size, tok.specials)
  sums = simpo(model, params, batch, jax.random.key(0), True)  # no reference given, none needed
  assert np.isfinite(float(sums["loss_sum"]))


def test_encdec_sft_evaluates_and_decodes_the_conversations(sft_config):
  """The seq2seq pipeline reads SFT's conversations (no inputs/targets fields), for
  teacher-forced evaluation and for decoded metrics."""
  from train.data import seq2seq

  c = tiny_config("t5", "task=sft", name=sft_config.data.name, seq_len=64, target_len=16)
  tok = ByteTokenizer()
  pairs = [chat.ChatPairs(c, "validation")]
  [(_, ids, inputs, refs)] = seq2seq.decode_sources(c, tok, 0, pairs)
  convs = chat.conversations(c, "validation")
  assert refs == [m[-1]["content"] for m in convs]
  assert tok.decode(ids[0][:-1]) == inputs[0] and inputs[0].endswith("Assistant:")
  batch = next(iter(seq2seq.seq2seq_eval_batches(c, tok, batch_size=2, pair_sets=pairs)))
  assert batch["targets"].shape == (2, 16) and (batch["targets_segment_ids"] > 0).any()
