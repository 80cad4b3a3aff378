"""Decoding throughput with a constraint and without, same model and settings, in one run;
and whether every constrained sample matches.

python -m bench.constrained_decoding --config=configs/gpt.py:size=S --batch_size=64 --num_tokens=256
python -m bench.constrained_decoding --config=configs/gpt.py:size=tiny --json_schema=user.json --batch_size=1000
python -m bench.constrained_decoding --workdir=runs/x --regex="[0-9]{3}-[a-z]+"

A decoder with random params (`--config`) or a run's checkpoint (`--workdir`) decodes
`--batch_size` rows of `--num_tokens` new tokens after `--prompt`, at `--temperature`, once
untimed per side (the compile), then `--rounds` times each, alternating. Both sides run the
same jitted loop for every step (rows that stopped keep stepping), so tokens/s counts
rows x steps. Each constrained sample is checked as its reader would: `re.fullmatch` for a
regex, membership for choices, `json.loads` and `jsonschema` for a schema.

Last line: tokens_per_sec=<unconstrained> constrained_tokens_per_sec=<...> ratio=<constrained
/ unconstrained> matched=<samples that match>/<samples> (of every round, the untimed one
included; a sample cut short by --num_tokens does not match, and is counted on the line
before)
"""

from __future__ import annotations

import json
import re
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from eval import constrain
from modeling import decoding
from modeling.transformer import Transformer
from train import console
from train.data import make_tokenizer
from train.trainer import load_for_inference
from train.validation import validate_config

config_flags.DEFINE_config_file(
  "config", "configs/gpt.py:size=S", "preset config of a decoder (random params)", lock_config=True
)
flags.DEFINE_string("workdir", None, "instead of --config: a decoder run's checkpoint")
flags.DEFINE_string("regex", None, "the constraint (default: DEFAULT_REGEX)")
flags.DEFINE_string("json_schema", None, "instead of --regex: a JSON schema file")
flags.DEFINE_list("choices", None, "instead of --regex: comma-separated choices")
flags.DEFINE_string("prompt", "Out: ", "the prompt of every row")
flags.DEFINE_integer("batch_size", 64, "rows decoded at once")
flags.DEFINE_integer("num_tokens", 128, "new tokens per row")
flags.DEFINE_float("temperature", 1.0, "0 is greedy")
flags.DEFINE_integer("rounds", 3, "timed runs of each side, alternating")
flags.DEFINE_integer("seed", 0, "params (with --config) and sampling seed")
flags.DEFINE_float("max_constraint_mib", constrain.MAX_TABLE_MIB, "the device tables' limit")
FLAGS = flags.FLAGS

# a sentence of at most 110 characters: done within the default --num_tokens in byte tokens
DEFAULT_REGEX = r"[A-Z][a-z]{0,9}(,? [a-z]{1,9}){0,9}\."


def load():
  """(model, params, tokenizer) of --workdir, or of --config with random params."""
  if FLAGS.workdir:
    config, model, params, tokenizer = load_for_inference(FLAGS.workdir)
  else:
    config = FLAGS.config
    wiring = validate_config(config)
    tokenizer = make_tokenizer(config.data.tokenizer)
    model, _ = wiring.build(config, tokenizer)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(FLAGS.seed), ids, ids, ids)["params"])
  if not isinstance(model, Transformer) or model.cfg.mask_kind != "causal":
    raise app.UsageError(f"model.family={config.model.family!r}: the benchmark times decoders")
  return model, params, tokenizer


def checker(constraint: constrain.Constraint):
  """text -> whether it matches, checked as the constraint's reader would."""
  if FLAGS.json_schema:
    import jsonschema  # the test extras' validator

    with open(FLAGS.json_schema, encoding="utf-8") as f:
      schema = json.load(f)

    def valid(text: str) -> bool:
      try:
        jsonschema.validate(json.loads(text), schema)
      except (ValueError, jsonschema.ValidationError):
        return False
      return True

    return valid
  if FLAGS.choices:
    return lambda text: text in FLAGS.choices
  pattern = re.compile(constraint.regex)  # Python's re reads the common syntax
  return lambda text: pattern.fullmatch(text) is not None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.setup(None)
  model, params, tokenizer = load()
  start = time.perf_counter()
  spec = dict(regex=FLAGS.regex, json_schema=FLAGS.json_schema, choices=FLAGS.choices)
  if not any(spec.values()):
    spec["regex"] = DEFAULT_REGEX
  try:
    c = constrain.build(tokenizer, model.cfg.vocab_size, max_mib=FLAGS.max_constraint_mib, **spec)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  build_s = time.perf_counter() - start
  table_mib = (c.next_SV.nbytes + c.automaton.mask_SW.nbytes + c.final_S.nbytes) / 2**20
  print(
    f"{c.source}: {c.num_states} states, device tables {table_mib:.2f} MiB "
    f"({c.next_SV.shape[0]} x {c.next_SV.shape[1]}), built in {build_s:.2f} s"
  )
  ids = decoding.prompt_ids(tokenizer, FLAGS.prompt)
  if ids.size + FLAGS.num_tokens > model.cfg.max_len:
    raise app.UsageError(
      f"--num_tokens={FLAGS.num_tokens}: the prompt ({ids.size} tokens) and the new tokens "
      f"must fit the context ({model.cfg.max_len})"
    )
  prompt_BP = np.tile(ids[None], (FLAGS.batch_size, 1))
  stops = tokenizer.specials.stop_ids
  matches = checker(c)
  times = {"free": [], "constrained": []}
  lengths = {"free": [], "constrained": []}
  matched = checked = unfinished = 0
  for i in range(FLAGS.rounds + 1):  # round 0 compiles, untimed
    for side, automaton in (("free", None), ("constrained", c.automaton)):
      t0 = time.perf_counter()
      out_BN = decoding.generate(
        model,
        params,
        prompt_BP,
        FLAGS.num_tokens,
        jax.random.fold_in(jax.random.key(FLAGS.seed), i),
        FLAGS.temperature,
        eos_id=stops,
        automaton=automaton,
      )
      seconds = time.perf_counter() - t0
      lengths[side] += [decoding.until_stop(o, stops).size for o in out_BN]
      if automaton is not None:
        accepted = [c.accepts(o, stops) for o in out_BN]
        checked += len(out_BN)
        unfinished += len(out_BN) - sum(accepted)
        matched += sum(
          a and matches(c.text(o, stops)) for a, o in zip(accepted, out_BN, strict=True)
        )
      if i:
        times[side].append(seconds)
        tps = FLAGS.batch_size * FLAGS.num_tokens / seconds
        print(f"round {i} {side}: {seconds:.3f} s, {tps:.0f} tokens/s", flush=True)
  free, constrained = (
    FLAGS.batch_size * FLAGS.num_tokens / float(np.median(times[k]))
    for k in ("free", "constrained")
  )
  for side in ("free", "constrained"):
    print(f"{side}: mean generated tokens before the stop {np.mean(lengths[side]):.1f}")
  print(f"constrained samples: {unfinished} of {checked} ran out of --num_tokens unfinished")
  print(f"device: {jax.devices()[0].device_kind}, batch {FLAGS.batch_size} x {FLAGS.num_tokens}")
  print(
    f"tokens_per_sec={free:.0f} constrained_tokens_per_sec={constrained:.0f} "
    f"ratio={constrained / free:.3f} matched={matched}/{checked}"
  )


if __name__ == "__main__":
  app.run(main)
