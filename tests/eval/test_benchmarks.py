"""eval/benchmarks.py and `eval.main --tasks=...`: multiple-choice benchmarks.

Prompts are checked against lm-evaluation-harness itself: its Task objects built from the
installed YAMLs (hellaswag, arc_easy, mmlu_<subject>) over local copies of the same rows
(`custom_dataset`: no network), rendering the same items 0- and 5-shot with the same
few-shot seed. Our side reads the rows as it reads them for real: TFDS (mocked with rows in
the TFDS builders' own layouts) and MMLU / mc: JSONL files. Metrics are checked against
the harness's `process_results` and `mean_stderr`."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import datasets
import lm_eval
import numpy as np
import pytest
import tensorflow_datasets as tfds
from lm_eval.api.metrics import mean_stderr
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks._yaml_loader import load_yaml

from eval import benchmarks
from eval.evaluate import split_tasks
from eval.loglik import Scorer
from tests.tiny_models import abstract_init, draw_params, tiny_config
from train import families
from train.checkpoint import Checkpointer
from train.data import make_mc_task
from train.data.tokenizers import ByteTokenizer
from train.trainer import load_for_inference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LM_EVAL_TASKS = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
SEED = 1234
datasets.disable_progress_bars()

# ---- rows: Hugging Face layouts (the harness's) and the TFDS builders' layouts (ours)

HELLASWAG = [  # (activity_label, ctx_a, ctx_b, endings, label)
  (
    "Removing ice from car",
    "Then, the man writes over the snow covering the window of a car, and a woman wearing "
    "winter clothes smiles.",
    "then",
    [
      ", the man adds wax to the windshield and cuts it.",
      ", a person board a ski lift, while two men supporting the head of the person.",
      ", the man puts on a christmas coat, knitted with netting.",
      ", the man continues removing the snow on his car.",
    ],
    3,
  ),
  (
    "Health",
    "[header] How to cope with suicidal thoughts [title] Put off any plans. [step] Promise "
    "yourself that you'll wait 48 hours before doing anything.",
    "",
    [
      "[substeps] Remember, thoughts don't have the power to force you to act.  Even when",
      "[substeps] Call a friend [title] Sit down with a trusted person.",
      "Try to [header] stay away from the place.",
      "[title] Write it down. [step] Keeping a journal helps you cope.",
    ],
    0,
  ),
  (
    "Playing basketball",
    "A man in a NBA jersey dribbles the ball. He shoots from the line.",
    "the ball",
    [
      "goes in and the crowd cheers.",
      "is handed to a man in a red shirt.",
      "rolls under a car in the street.",
      "is kicked into the stands by a dog.",
    ],
    0,
  ),
]
VERBS = ["is", "starts", "keeps", "stops", "tries"]
HELLASWAG_TRAIN = [
  (
    f"Activity {i}",
    f"A person number {i} stands in a room. The person picks up tool {i}.",
    ["they", "the person", "", "we"][i % 4],
    [f"{v} working on part {i}." for v in VERBS[:4]],
    i % 4,
  )
  for i in range(12)
]

ARC = [  # (question, labels, texts, answerKey)
  (
    "An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
    "the most likely effect of this increase in rotation?",
    "ABCD",
    [
      "Planetary density will decrease.",
      "Planetary years will become longer.",
      "Planetary days will become shorter.",
      "Planetary gravity will become stronger.",
    ],
    "C",
  ),
  (
    "Which of these is a source of light?",
    "1234",
    ["the Moon", "the Sun", "a mirror", "a window"],
    "2",
  ),
  (
    "Most of the energy in a food chain comes from which source?",
    "ABCDE",
    ["soil", "water", "sunlight", "animals", "air"],
    "C",
  ),
]
ARC_TRAIN = [
  (f"Which unit measures quantity {i}?", "ABCD", [f"unit {i}{x}" for x in "wxyz"], "ABCD"[i % 4])
  for i in range(10)
]
ARC_NUMBERS = dict(zip("12345", "ABCDE", strict=True))  # the TFDS builder's relabeling


def hellaswag_hf(rows):
  return [
    dict(
      ind=i,
      activity_label=a,
      ctx_a=ca,
      ctx_b=cb,
      ctx=f"{ca} {cb}" if cb else ca,
      endings=e,
      source_id="activitynet~v_x",
      split="val",
      split_type="indomain",
      label=str(g),
    )
    for i, (a, ca, cb, e, g) in enumerate(rows)
  ]


def hellaswag_tfds(rows):
  """The TFDS builder's fields (text as the array_record source gives it: bytes); its
  `context` is HellaSwag's `ctx` (ctx_a + " " + ctx_b), no ctx_a / ctx_b."""
  return [
    {
      "context": (f"{ca} {cb}" if cb else ca).encode(),
      "endings": np.array([x.encode() for x in e], dtype=object),
      "activity_label": a.encode(),
      "label": np.int32(g),
      "split_type": b"indomain",
      "source_id": b"activitynet~v_x",
    }
    for a, ca, cb, e, g in rows
  ]


def arc_hf(rows):
  return [
    dict(id=f"q{i}", question=q, choices=dict(text=t, label=list(labels)), answerKey=key)
    for i, (q, labels, t, key) in enumerate(rows)
  ]


def arc_tfds(rows):
  def cls(x):  # ClassLabel(names=A..E) of the relabeled key
    return "ABCDE".index(ARC_NUMBERS.get(x, x))

  return [
    {
      "id": f"q{i}".encode(),
      "question": q.encode(),
      "choices": {
        "text": np.array([x.encode() for x in t], dtype=object),
        "label": np.array([cls(x) for x in labels]),
      },
      "answerKey": np.int64(cls(key)),
    }
    for i, (q, labels, t, key) in enumerate(rows)
  ]


TFDS_ROWS = {
  ("hellaswag", "validation"): hellaswag_tfds(HELLASWAG),
  ("hellaswag", "train"): hellaswag_tfds(HELLASWAG_TRAIN),
  ("ARC-Easy", "test"): arc_tfds(ARC),
  ("ARC-Easy", "train"): arc_tfds(ARC_TRAIN),
}


def mock_tfds():
  def source(builder, split, **kw):
    name = builder.builder_config.name if builder.name == "ai2_arc" else builder.name
    return TFDS_ROWS[name, split]

  return tfds.testing.mock_data(as_data_source_fn=source)


def mmlu_rows():
  """Two subjects, test and dev rows in cais/mmlu's layout (ours too)."""
  test, dev = [], []
  for subject in ("abstract_algebra", "high_school_european_history"):
    for i in range(3):
      test.append(
        dict(
          question=f"  Find the order of element {i} in the {subject} group.\n",
          choices=[f"{i}", f"{i + 1}", f"{2 * i}", "infinite"],
          answer=i % 4,
          subject=subject,
        )
      )
    for i in range(6):
      dev.append(
        dict(
          question=f"Dev question {i} of {subject}?",
          choices=["yes", "no", "maybe", "never"],
          answer=(i + 1) % 4,
          subject=subject,
        )
      )
  return test, dev


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


# ---- the harness's side


def harness_task(cfg: str | dict, splits: dict[str, list[dict]]):
  """lm_eval's Task of a YAML file (or a config), its dataset replaced by local rows."""
  cfg = dict(load_yaml(cfg) if isinstance(cfg, str) else cfg)
  cfg.pop("dataset_path", None)
  cfg["custom_dataset"] = lambda **kw: datasets.DatasetDict(
    {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
  )
  task = ConfigurableTask(config=cfg)
  return task


def harness_requests(task, shots: int) -> list[list[tuple[str, str]]]:
  """Each evaluated doc's (context, continuation) pairs, in the harness's order."""
  task.set_fewshot_seed(SEED)
  out = []
  for doc in task.eval_docs:
    ctx = task.fewshot_context(doc, shots)
    out.append([tuple(i.arguments) for i in task.construct_requests(doc, ctx)])
  return out


def ours(task: benchmarks.Prepared) -> list[list[tuple[str, str]]]:
  out, k = [], 0
  for item in task.items:
    out.append(task.requests[k : k + len(item.choices)])
    k += len(item.choices)
  return out


# ---- golden renders


@pytest.mark.parametrize("shots", [0, 5])
def test_hellaswag_renders_as_the_harness(shots):
  task = harness_task(
    os.path.join(LM_EVAL_TASKS, "hellaswag", "hellaswag.yaml"),
    {"train": hellaswag_hf(HELLASWAG_TRAIN), "validation": hellaswag_hf(HELLASWAG)},
  )
  with mock_tfds():
    mine = benchmarks.prepare("hellaswag", benchmarks.Options(), shots, SEED)
  assert ours(mine) == harness_requests(task, shots)
  if shots == 0:  # the golden text of the first item
    assert mine.requests[3] == (
      "Removing ice from car: Then, the man writes over the snow covering the window of a "
      "car, and a woman wearing winter clothes smiles. Then",
      " , the man continues removing the snow on his car.",
    )


@pytest.mark.parametrize("shots", [0, 5])
def test_arc_renders_as_the_harness(shots):
  task = harness_task(
    os.path.join(LM_EVAL_TASKS, "arc", "arc_easy.yaml"),
    {"train": arc_hf(ARC_TRAIN), "validation": arc_hf(ARC_TRAIN[:1]), "test": arc_hf(ARC)},
  )
  with mock_tfds():
    mine = benchmarks.prepare("arc_easy", benchmarks.Options(), shots, SEED)
  assert ours(mine) == harness_requests(task, shots)
  assert [i.gold for i in mine.items] == [2, 1, 2]
  if shots == 0:
    assert mine.requests[4] == (
      "Question: Which of these is a source of light?\nAnswer:",
      " the Moon",
    )


@pytest.mark.parametrize("shots", [0, 5])
def test_mmlu_renders_as_the_harness(tmp_path, shots):
  test, dev = mmlu_rows()
  write_jsonl(tmp_path / "test.jsonl", test)
  write_jsonl(tmp_path / "dev.jsonl", dev)
  expected = []
  for subject in ("abstract_algebra", "high_school_european_history"):
    task = harness_task(
      os.path.join(LM_EVAL_TASKS, "mmlu", "default", f"mmlu_{subject}.yaml"),
      {
        "test": [r for r in test if r["subject"] == subject],
        "dev": [r for r in dev if r["subject"] == subject],
      },
    )
    expected += harness_requests(task, shots)
  mine = benchmarks.prepare("mmlu", benchmarks.Options(mmlu_dir=str(tmp_path)), shots, SEED)
  assert ours(mine) == expected
  if shots == 0:
    assert mine.requests[0] == (
      "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
      "Find the order of element 0 in the abstract_algebra group.\nA. 0\nB. 1\nC. 0\n"
      "D. infinite\nAnswer:",
      " A",
    )


def test_mmlu_subject_lines_are_the_harness_descriptions():
  folder = os.path.join(LM_EVAL_TASKS, "mmlu", "default")
  subjects = 0
  for name in sorted(os.listdir(folder)):
    if name.startswith("mmlu_") and name.endswith(".yaml"):
      cfg = load_yaml(os.path.join(folder, name), resolve_func=False, recursive=False)
      assert benchmarks.mmlu_header(cfg["dataset_name"]) == cfg["description"], name
      subjects += 1
  assert subjects == 57


MC_YAML = dict(  # what `mc:<path>` renders, as a harness task (the YAML to ship beside it)
  task="mc_local",
  output_type="multiple_choice",
  test_split="test",
  fewshot_split="test",
  doc_to_text="question",
  doc_to_choice="choices",
  doc_to_target="answer",
  metric_list=[
    {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in benchmarks.METRICS
  ],
)


def mc_rows(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "x", "longer choice", "日本語"]
  return [
    dict(
      question=f"q{i}: {' '.join(rng.sample(words, 3))}",
      choices=rng.sample(words, rng.randint(2, 5)),
      answer=0,
    )
    for i in range(n)
  ]


@pytest.mark.parametrize("shots", [0, 3])
def test_mc_file_renders_as_a_harness_task_over_the_same_file(tmp_path, shots):
  rows = mc_rows(8)
  path = write_jsonl(tmp_path / "mc.jsonl", rows)
  task = harness_task(MC_YAML, {"test": rows})
  mine = benchmarks.prepare(f"mc:{path}", benchmarks.Options(), shots, SEED)
  assert ours(mine) == harness_requests(task, shots)
  for item, reqs in zip(mine.items, ours(mine), strict=True):
    assert all(item.query not in ctx.split("\n\n")[:-1] for ctx, _ in reqs)  # never its own shot


def test_metrics_are_the_harness_process_results():
  rows = mc_rows(300, seed=1)
  task = harness_task(MC_YAML, {"test": rows})
  rng = np.random.default_rng(0)
  per_item, items = [], []
  for doc in task.eval_docs:
    lengths = np.array([len(c) for c in doc["choices"]])
    lls = (-rng.uniform(0.5, 1.5, lengths.size) * lengths).tolist()
    theirs = task.process_results(doc, [(ll, False) for ll in lls])
    item = benchmarks.Item(doc["question"], tuple(doc["choices"]), doc["answer"])
    mine = benchmarks.item_metrics(item, lls)
    assert mine == {m: theirs[m] for m in benchmarks.METRICS}
    per_item.append(mine)
    items.append(item)
  total = benchmarks.aggregate(per_item, items)
  for m in benchmarks.METRICS:
    x = [r[m] for r in per_item]
    assert total[m] == pytest.approx(np.mean(x), abs=1e-12)
    assert total[f"{m}_stderr"] == pytest.approx(mean_stderr(x), abs=1e-12)
  # the three differ here: choices of one length in characters and another in bytes
  assert len({total[m] for m in benchmarks.METRICS}) == 3
  assert total["chance"] == pytest.approx(np.mean([1 / len(r["choices"]) for r in rows]))


# ---- bad input


def test_bad_rows_are_skipped_and_counted(tmp_path):
  rows = [
    dict(question="ok", choices=["a", "b"], answer=1),
    dict(question="index past the end", choices=["a", "b"], answer=2),
    dict(question="negative index", choices=["a", "b"], answer=-1),
    dict(question="one choice", choices=["a"], answer=0),
    dict(question="empty choice", choices=["a", ""], answer=0),
    dict(question="ok too", choices=["a", "b", "c"], answer=0),
  ]
  path = write_jsonl(tmp_path / "mc.jsonl", rows)
  task = benchmarks.prepare(f"mc:{path}", benchmarks.Options())
  assert [i.query for i in task.items] == ["ok", "ok too"]
  assert task.skipped == collections.Counter(
    {
      "answer index outside the choices": 2,
      "fewer than two choices": 1,
      "an empty choice (acc_norm divides by its length)": 1,
    }
  )


def test_unknown_tasks_and_missing_inputs_are_refused_clearly(tmp_path):
  with pytest.raises(
    ValueError, match="known: hellaswag, arc_easy, arc_challenge, mmlu, mc:<path.jsonl>"
  ):
    benchmarks.benchmark("hellaswog")
  with pytest.raises(ValueError, match="no such file"):
    benchmarks.prepare(f"mc:{tmp_path / 'none.jsonl'}", benchmarks.Options())
  with pytest.raises(ValueError, match="give --mmlu_dir"):
    benchmarks.prepare("mmlu", benchmarks.Options())
  path = write_jsonl(tmp_path / "mc.jsonl", [dict(question="q", answer=0)])
  with pytest.raises(ValueError, match=r"row 1 has no \['choices'\]"):
    benchmarks.prepare(f"mc:{path}", benchmarks.Options())
  path = write_jsonl(tmp_path / "mc.jsonl", mc_rows(3))
  with pytest.raises(ValueError, match="--num_fewshot=3: the few-shot pool has 3 rows; 4 needed"):
    benchmarks.prepare(f"mc:{path}", benchmarks.Options(), num_fewshot=3)


# ---- eval.main on tiny workdirs, every family through eval/loglik.py's Scorer

CONTEXT = 64  # the tiny models' context (tokens = bytes): every request below fits


def write_workdir(workdir, preset: str) -> str:
  """configs/<preset>.py:size=tiny with random params, as eval.import_hf writes a workdir."""
  config = tiny_config(preset, seq_len=CONTEXT)
  model, _ = families.resolve(config).build(config, ByteTokenizer())
  params = draw_params(abstract_init(model.cfg, type(model)))
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  ckpt = Checkpointer(str(workdir), keep=1, async_save=False)
  ckpt.save(0, {"params": params}, None, force=True)
  ckpt.close()
  return str(workdir)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mc")
  return {p: write_workdir(root / p, p) for p in ("gpt", "mdlm", "t5", "bert")}


@pytest.fixture(scope="module")
def stdlib_mc(tmp_path_factory):
  """30 stdlib items (make_mc_task, short enough for the tiny context), 2 bad rows after."""
  files = make_mc_task.stdlib_files("validation")
  rows = make_mc_task.make_items(files, 30, random.Random(0), context=36, continuation=12)
  rows += [
    dict(question="q", choices=["a"], answer=0),
    dict(question="q", choices=["a", "b"], answer=5),
  ]
  return write_jsonl(tmp_path_factory.mktemp("mcdata") / "eval.jsonl", rows)


def reference_lls(workdir: str, reqs: list[tuple[str, str]]) -> np.ndarray:
  """log p(continuation | context) of each request in one padded forward pass, float64
  log-softmax in NumPy: no sorting, bucketing or truncation (every request fits)."""
  config, model, params, tokenizer = load_for_inference(workdir)
  rows = []
  for ctx, cont in reqs:
    ids, n_ctx = tokenizer.encode(ctx + cont), len(tokenizer.encode(ctx))
    assert len(ids) <= CONTEXT
    rows.append((ids, n_ctx))
  tokens = np.zeros((len(rows), CONTEXT), np.int32)
  seg = np.zeros_like(tokens)
  for r, (ids, _) in enumerate(rows):
    tokens[r, : len(ids)], seg[r, : len(ids)] = ids, 1
  pos = np.broadcast_to(np.arange(CONTEXT, dtype=np.int32), tokens.shape)
  logits, _ = model.apply({"params": params}, tokens, pos, np.maximum(seg, 1))
  logits = np.asarray(logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logp -= logits.max(-1, keepdims=True)
  return np.array(
    [sum(logp[r, t - 1, ids[t]] for t in range(n, len(ids))) for r, (ids, n) in enumerate(rows)]
  )


def run_main(*flags):
  cmd = [sys.executable, "-m", "eval.main", *flags]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_eval_main_scores_every_family_and_the_decoders_numbers_are_a_forward_pass(
  workdirs, stdlib_mc, tmp_path
):
  with open(os.path.join(workdirs["gpt"], "eval_results.json"), "w") as f:
    json.dump({"pretrain": {"eval/loss": 1.5}}, f)  # an earlier result, kept
  plots = tmp_path / "plots"
  order = [workdirs[p] for p in ("gpt", "mdlm", "t5", "bert")]
  out = run_main(
    f"--workdir={','.join(order)}",
    f"--tasks=mc:{stdlib_mc}",
    "--mc_samples=2",
    f"--plot_dir={plots}",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  task = f"mc:{stdlib_mc}"
  assert (
    f"{task}: skipped 2 rows (1 fewer than two choices, 1 answer index outside the choices)"
    in out.stdout
  )
  results = {}
  for p, w in workdirs.items():
    with open(os.path.join(w, "eval_results.json")) as f:
      results[p] = json.load(f)
    assert results[p][task]["items"] == 30 and results[p][task]["skipped"] == 2
    assert (
      f"| {task} | acc | {results[p][task]['acc']:.4f} |"
      in open(os.path.join(w, "eval_results.md")).read()
    )
  assert results["gpt"]["pretrain"] == {"eval/loss": 1.5}
  assert "pseudo-log-likelihood" in results["bert"][task]["scored_by"]
  assert "ELBO" in results["mdlm"][task]["scored_by"]
  # the decoder's acc and acc_norm: argmax of a direct forward pass's log-likelihoods
  prepared = benchmarks.prepare(task, benchmarks.Options())
  lls = reference_lls(workdirs["gpt"], prepared.requests)
  per_item, k = [], 0
  for item in prepared.items:
    per_item.append(benchmarks.item_metrics(item, lls[k : k + len(item.choices)]))
    k += len(item.choices)
  expected = benchmarks.aggregate(per_item, prepared.items)
  scored = Scorer.from_workdir(workdirs["gpt"]).loglikelihood(prepared.requests)
  np.testing.assert_allclose([ll for ll, _ in scored], lls, atol=1e-4)
  for m in ("acc", "acc_norm", "acc_bytes", "acc_stderr"):
    assert results["gpt"][task][m] == pytest.approx(expected[m], abs=1e-12), m
  # the printed table: one column per workdir
  row = next(line.split() for line in out.stdout.splitlines() if line.startswith(f"{task} acc "))
  assert row[2:] == [f"{results[p][task]['acc']:.4f}" for p in ("gpt", "mdlm", "t5", "bert")]
  assert (plots / "eval_mc_eval.png").is_file()
  assert (
    open(plots / "eval_compare.md").read().startswith("| task | metric | gpt | mdlm | t5 | bert |")
  )


def test_a_chart_shows_each_workdirs_metrics_and_chance():
  results = {
    "runs/ar": {
      "mc:x.jsonl": {
        "acc": 0.6,
        "acc_stderr": 0.05,
        "acc_norm": 0.55,
        "acc_bytes": 0.5,
        "chance": 0.25,
      }
    },
    "runs/mdlm": {"mc:x.jsonl": {"acc": 0.4, "acc_norm": 0.35, "acc_bytes": 0.3, "chance": 0.25}},
  }
  fig = benchmarks.task_figure(results, "mc:x.jsonl")
  ax = fig.axes[0]
  heights = [round(p.get_height(), 6) for p in ax.patches]
  assert heights == [0.6, 0.4, 0.55, 0.35, 0.5, 0.3]  # acc of each workdir, then acc_norm, ...
  assert [t.get_text() for t in ax.get_xticklabels()] == ["ar", "mdlm"]
  assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [0.25]


def test_eval_main_refuses_an_unknown_task_listing_the_known_ones():
  assert split_tasks(["pretrain", "mc:x.jsonl", "arc_easy"]) == (
    ["pretrain"],
    ["mc:x.jsonl", "arc_easy"],
  )
  with pytest.raises(ValueError) as e:
    split_tasks(["arc_easy", "hellaswog"])
  assert (
    "unknown task 'hellaswog'; known: the benchmarks hellaswag, arc_easy, arc_challenge, mmlu, "
    "mc:<path.jsonl>, or the workdir's own task.name (one of " in str(e.value)
  )
  assert "classify" in str(e.value) and "pretrain" in str(e.value)
