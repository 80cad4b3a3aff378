"""eval/harness.py: fourfold workdirs through lm-evaluation-harness itself, offline.

Tiny random-init workdirs (tests/eval/test_score.py's `write_workdir`); the repository's
task YAMLs (eval/harness_tasks) read their committed local files. lm_eval computes acc,
acc_norm and the perplexities; the tests compute the same from eval/loglik.py's Scorer and
eval/scoring.py (what `python -m eval.score` prints) and ask for equality.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import subprocess
import sys

import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

from eval import benchmarks, scoring
from eval.benchmarks import FEWSHOT_SEED
from eval.harness import FourfoldLM
from tests.eval.test_score import REPO, write_workdir

TASKS = os.path.join(REPO, "eval", "harness_tasks")
MC_FILE = os.path.join(TASKS, "data", "mc_sample.jsonl")
PPL_FILE = os.path.join(TASKS, "data", "ppl_sample.txt")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
  """No network, a fresh datasets cache, and the repository as the working directory (the
  YAMLs' data_files are relative to it)."""
  env = {"HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf"))}
  old = {k: os.environ.get(k) for k in env}
  cwd = os.getcwd()
  os.environ.update(env)
  os.chdir(REPO)
  yield env
  os.chdir(cwd)
  for k, v in old.items():
    if v is None:
      os.environ.pop(k)
    else:
      os.environ[k] = v


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  out = {}
  for preset in ("gpt", "t5", "mdlm", "bert"):
    out[preset] = str(tmp_path_factory.mktemp(preset))
    write_workdir(out[preset], preset)
  return out


def model(workdirs, preset: str) -> FourfoldLM:
  return FourfoldLM(workdir=workdirs[preset], batch_size=3, mc_samples=48)


def evaluate(lm: FourfoldLM, task: str) -> dict:
  manager = TaskManager(include_path=TASKS, include_defaults=False)
  return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)["results"][task]


def eval_main_mc(lm: FourfoldLM, shots: int) -> tuple[benchmarks.Prepared, dict[str, float]]:
  """eval.main's `mc:<MC_FILE>` task (its requests) and its acc, acc_norm and acc_bytes under
  the adapter's Scorer."""
  task = benchmarks.prepare(f"mc:{MC_FILE}", benchmarks.Options(), shots, FEWSHOT_SEED, 0)
  got = benchmarks.score(lm.scorer, task)
  return task, {m: got[m] for m in benchmarks.METRICS}


@pytest.mark.parametrize("preset,shots", [("gpt", 0), ("gpt", 2), ("t5", 0), ("mdlm", 0)])
def test_multiple_choice_through_lm_eval_equals_eval_mains(workdirs, preset, shots):
  """One local file two ways: lm_eval's fourfold_mc through the adapter, and eval.main's
  `mc:` task (eval/benchmarks.py: its own prompts, shots and metrics) on the same Scorer:
  the same (context, continuation) requests, log-likelihoods and metrics."""
  lm = model(workdirs, preset)
  manager = TaskManager(include_path=TASKS, include_defaults=False)
  out = lm_eval.simple_evaluate(
    model=lm, tasks=["fourfold_mc"], task_manager=manager, num_fewshot=shots, log_samples=True
  )
  samples = sorted(out["samples"]["fourfold_mc"], key=lambda s: s["doc_id"])
  task, want = eval_main_mc(lm, shots)
  assert [tuple(a) for s in samples for a in s["arguments"]] == task.requests
  lls = [ll for ll, _ in lm.scorer.loglikelihood(task.requests)]
  assert [r[0][0] for s in samples for r in s["resps"]] == lls
  got = out["results"]["fourfold_mc"]
  assert got["sample_len"] == 8
  assert {m: got[f"{m},none"] for m in benchmarks.METRICS} == want


@pytest.mark.parametrize("preset", ["gpt", "mdlm"])
def test_perplexity_task_is_eval_score_on_the_same_file(workdirs, preset):
  lm = model(workdirs, preset)
  got = evaluate(lm, "fourfold_ppl")
  s = lm.scorer
  text = scoring.read_text(PPL_FILE)
  options = {"mc_samples": 48} if preset == "mdlm" else {}
  score = scoring.score_text(
    s.config, s.model, s.params, s.tokenizer, text, batch_size=3, **options
  )
  words = len(re.split(r"\s+", text))
  assert got["bits_per_byte,none"] == pytest.approx(score.bits_per_byte, rel=1e-12)
  assert got["word_perplexity,none"] == pytest.approx(
    math.exp(-score.loglikelihood / words), rel=1e-12
  )


@pytest.mark.parametrize("preset", ["gpt", "t5", "bert"])
def test_lm_evals_token_split_is_the_scorers(workdirs, preset, monkeypatch):
  """TemplateLM.loglikelihood (lm_eval's code, with this model's tok_encode, prefix token
  and backend) hands _loglikelihood_tokens the tokens Scorer.encode_pair makes."""
  lm = model(workdirs, preset)
  pairs = [("Question: hi\nAnswer:", " yes"), ("", "abc"), ("The sky is  ", "blue"), ("a", "b")]
  monkeypatch.setattr(lm, "_loglikelihood_tokens", lambda reqs, **kw: [r[1:] for r in reqs])
  requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
  got = lm.loglikelihood(requests, disable_tqdm=True)
  assert got == [lm.scorer.encode_pair(c, x) for c, x in pairs]


def test_registered_model_reads_model_args_and_refuses_unknown_ones(workdirs):
  cls = get_model("fourfold")
  assert cls is FourfoldLM
  lm = cls.create_from_arg_string(
    f"workdir={workdirs['gpt']},mc_samples=4,stride=5",
    {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"},  # what the CLI passes
  )
  assert (lm.scorer.batch_size, lm.scorer.mc_samples, lm.scorer.stride) == (1, 4, 5)
  assert lm.get_model_info()["family"] == "decoder"
  lm = cls.create_from_arg_string(f"workdir={workdirs['gpt']},batch_size=3", {"batch_size": 1})
  assert lm.scorer.batch_size == 3  # model_args win over --batch_size
  with pytest.raises(ValueError, match=r"model_args \['temperature'\]: fourfold reads"):
    cls.create_from_arg_string(f"workdir={workdirs['gpt']},temperature=1")
  with pytest.raises(ValueError, match="batch_size='auto': fourfold takes a positive integer"):
    cls.create_from_arg_string(f"workdir={workdirs['gpt']},batch_size=auto")


def test_cli_runs_lm_eval_with_the_fourfold_model(workdirs, offline, tmp_path):
  out = tmp_path / "results"
  cmd = [
    sys.executable,
    "-m",
    "eval.harness",
    "--model",
    "fourfold",
    "--model_args",
    f"workdir={workdirs['gpt']},batch_size=3",
    "--tasks",
    "fourfold_mc,fourfold_ppl",
    "--include_path",
    "eval/harness_tasks",
    "--output_path",
    str(out),
  ]
  env = {**os.environ, **offline, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"\|fourfold_mc\s*\|\s*2\|none\s*\|\s*0\|acc\s", proc.stdout)
  (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
  with open(path) as f:
    results = json.load(f)["results"]
  lm = model(workdirs, "gpt")
  got = {m: results["fourfold_mc"][f"{m},none"] for m in benchmarks.METRICS}
  assert got == eval_main_mc(lm, 0)[1]
  s, text = lm.scorer, scoring.read_text(PPL_FILE)
  score = scoring.score_text(s.config, s.model, s.params, s.tokenizer, text)  # eval.score's
  assert results["fourfold_ppl"]["bits_per_byte,none"] == pytest.approx(score.bits_per_byte)
