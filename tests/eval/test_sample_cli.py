"""python -m eval.sample on a trained tiny workdir, and on untrained ones: constraints
(--regex, --json_schema, --choices) and --output."""

import json
import os
import subprocess
import sys

import jsonschema
import tensorflow_datasets as tfds

from configs import gpt
from tests.tiny_models import abstract_init, draw_params, tiny_config
from tests.train.test_trainer import tiny
from train import families, trainer
from train.checkpoint import Checkpointer
from train.data.tokenizers import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(workdir, *flags):
  cmd = [sys.executable, "-m", "eval.sample", f"--workdir={workdir}", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def test_sample_cli_greedy_is_deterministic_and_continues_the_prompt(tmp_path):
  with tfds.testing.mock_data(num_examples=8):
    trainer.run(tiny(gpt, steps=4), str(tmp_path))
  a = sample(tmp_path, "--prompt=abc", "--num_tokens=20", "--temperature=0", "--num_samples=2")
  assert a.returncode == 0, a.stderr
  texts = a.stdout.split("---- sample ")[1:]
  assert len(texts) == 2 and all(t.split("\n", 1)[1].startswith("abc") for t in texts)
  assert texts[0].split("\n", 1)[1] == texts[1].split("\n", 1)[1]  # greedy ignores the seed
  b = sample(
    tmp_path, "--prompt=abc", "--num_tokens=20", "--temperature=1.0", "--top_k=5", "--top_p=0.9"
  )
  assert b.returncode == 0 and "---- sample 1/1 (20 network calls, " in b.stdout
  # --steps belongs to the diffusion samplers: an AR model refuses it, naming its own flags.
  c = sample(tmp_path, "--prompt=abc", "--num_tokens=20", "--steps=8")
  assert c.returncode != 0 and "---- sample" not in c.stdout
  assert (
    "--steps: model.family='decoder' samplers read only ['--temperature', '--top_k'" in c.stderr
  )


def test_sample_cli_rejects_a_workdir_without_a_run(tmp_path):
  r = sample(tmp_path, "--prompt=abc")
  assert r.returncode != 0 and "no config.json" in r.stderr


# ---- constrained decoding and --output, on untrained workdirs (random params)

SCHEMA = {
  "type": "object",
  "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}, "ok": {"type": "boolean"}},
  "required": ["id", "ok"],
}


def random_workdir(workdir, preset: str, seq_len: int):
  """A workdir of `configs/<preset>.py:size=tiny` with random params at step 0."""
  config = tiny_config(preset, seq_len=seq_len)
  model, _ = families.resolve(config).build(config, ByteTokenizer())
  params = draw_params(abstract_init(model.cfg, type(model)))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  ckpt = Checkpointer(str(workdir), keep=1, async_save=False)
  ckpt.save(0, {"params": params}, None, force=True)
  ckpt.close()
  return str(workdir)


def shown_texts(stdout: str) -> list[str]:
  """The text under each sample header."""
  return [t.split("\n", 1)[1].removesuffix("\n") for t in stdout.split("---- sample ")[1:]]


def test_sample_cli_json_schema_and_choices_write_jsonl(tmp_path):
  workdir = random_workdir(tmp_path / "gpt", "gpt", 96)
  schema = tmp_path / "schema.json"
  schema.write_text(json.dumps(SCHEMA))
  out = tmp_path / "samples.jsonl"
  r = sample(
    workdir, "--prompt=JSON: ", f"--json_schema={schema}", "--num_tokens=60",
    "--temperature=1", "--num_samples=6", f"--output={out}",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"--json_schema={schema}: " in r.stdout and " states" in r.stdout
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(rows) == 6 and all(row["prompt"] == "JSON: " for row in rows)
  for row in rows:
    jsonschema.validate(json.loads(row["text"]), SCHEMA)
  assert shown_texts(r.stdout) == ["JSON: " + row["text"] for row in rows]
  assert len({row["text"] for row in rows}) > 1  # each sample its own draw
  r = sample(
    workdir, "--prompt=Answer: ", "--choices=yes,no,not (sure)", "--num_tokens=12",
    "--temperature=0", "--beam_size=2", f"--output={out}",
  )  # fmt: skip
  assert r.returncode == 0, r.stderr[-3000:]
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert row["text"] in ("yes", "no", "not (sure)")


def test_sample_cli_refuses_bad_constraints_before_decoding(tmp_path):
  workdir = random_workdir(tmp_path / "gpt", "gpt", 16)
  both = sample(workdir, "--regex=a", "--choices=a,b")
  assert both.returncode != 0 and "---- sample" not in both.stdout
  assert "--regex, --choices: give at most one constraint" in both.stderr
  big = sample(workdir, "--regex=[a-z]{200}", "--max_constraint_mib=0.1")
  assert big.returncode != 0 and "---- sample" not in big.stdout
  assert "201 states; " in big.stderr and "over the limit of 0.1 MiB" in big.stderr
  mdlm = random_workdir(tmp_path / "mdlm", "mdlm", 16)
  diffusion = sample(mdlm, "--prompt=abc", "--num_tokens=8", "--regex=[a-z]+")
  assert diffusion.returncode != 0 and "---- sample" not in diffusion.stdout
  assert "--regex: constrained decoding follows an automaton left to right" in diffusion.stderr
