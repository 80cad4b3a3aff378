"""Multiple-choice benchmarks in lm-evaluation-harness's prompt formats (`python -m eval.main
--tasks=hellaswag,arc_easy,arc_challenge,mmlu,mc:<path.jsonl>`).

Every item is a query and its choices. The model scores each choice as a continuation of
the context: one request (context, " " + choice) per choice, the context being the item's
header (MMLU's subject line), its shots (query + " " + right choice + "\\n\\n" each) and
its query, as the harness's task YAMLs render them (target delimiter " ", few-shot
delimiter "\\n\\n"):

  hellaswag      `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`,
                 choices `preprocess(ending)` (lm_eval/tasks/hellaswag/utils.py); TFDS's
                 validation split, shots from its train split
  arc_easy,      `Question: {question}\\nAnswer:`, choices the answers' texts; TFDS
  arc_challenge  `ai2_arc/ARC-Easy|ARC-Challenge`'s test split, shots from train
  mmlu           "The following are multiple choice questions (with answers) about
                 {subject}.\\n\\n", then `{question.strip()}\\nA. ...\\nB. ...\\nC. ...\\nD.
                 ...\\nAnswer:`, choices "A".."D"; `<mmlu_dir>/test.jsonl`, shots the first
                 of the subject's `<mmlu_dir>/dev.jsonl` rows
  mc:<path>      the row's `question` as is, choices its `choices`; shots from the same
                 file, never the item itself

Shots are drawn as the harness's samplers draw them: for hellaswag, ARC and mc:, one
`random.Random(fewshot_seed)` per task, `sample(pool, n)` per item in order (`n + 1`,
the item removed, where the harness compares the pool with the evaluated split: hellaswag,
whose YAML has no test split, and mc:); for MMLU the first n rows (`first_n`).

Metrics (the harness's `process_results` for multiple choice): `acc` (the choice of
highest log-likelihood is right), `acc_norm` (log-likelihood divided by the choice's length
in characters, the delimiter not counted), `acc_bytes` (by its UTF-8 bytes), each with its
standard error over items; `chance` (the mean of 1 / choices), `items`, `skipped` (rows
refused: an answer index outside the choices, fewer than two choices, an empty choice).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import random
import re
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from train.data import sources

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
METRICS = ("acc", "acc_norm", "acc_bytes")
FEWSHOT_SEED = 1234  # lm_eval.simple_evaluate's default fewshot_random_seed


@dataclasses.dataclass(frozen=True)
class Item:
  """One multiple-choice question as the harness renders it."""

  query: str  # doc_to_text: what the choices continue
  choices: tuple[str, ...]  # doc_to_choice, without the target delimiter
  gold: int  # index of the right choice
  header: str = ""  # the task's description before the shots: MMLU's subject line
  group: str = ""  # the few-shot pool it draws from: MMLU's subject


@dataclasses.dataclass
class Docs:
  items: list[Item]  # evaluated, in order
  pool: Callable[[], list[Item]]  # the few-shot pool, loaded when shots are asked for
  skipped: collections.Counter  # reason -> rows refused


@dataclasses.dataclass(frozen=True)
class Benchmark:
  load: Callable[[Options], Docs]
  first_n: bool = False  # shots are the pool's first rows (MMLU), else drawn at random
  pool_has_item: bool = False  # the harness removes the evaluated item from its shots


@dataclasses.dataclass(frozen=True)
class Options:
  data_dir: str = ""  # TFDS data dir; "": TFDS's default
  mmlu_dir: str = ""  # test.jsonl and dev.jsonl of MMLU


# ---- rows -> items


def check_row(choices: Sequence[str], gold) -> str | None:
  """Why a row cannot be scored, or None."""
  if len(choices) < 2:
    return "fewer than two choices"
  if isinstance(gold, bool) or not isinstance(gold, int | np.integer):
    return "answer is not an integer index"
  if not 0 <= gold < len(choices):
    return "answer index outside the choices"
  if any(not c for c in choices):
    return "an empty choice (acc_norm divides by its length)"
  return None


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def hellaswag_preprocess(text: str) -> str:
  """lm_eval/tasks/hellaswag/utils.py `preprocess`: WikiHow's bracket tags removed."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def hellaswag_item(activity_label: str, ctx_a: str, ctx_b: str, endings, label) -> Item:
  """A HellaSwag row (the Hugging Face layout) as the harness's `process_docs` makes it."""
  query = hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
  return Item(query, tuple(hellaswag_preprocess(e) for e in endings), label)


_SENTENCE_END = re.compile(r"[.!?] ")


def split_context(ctx: str) -> tuple[str, str]:
  """(ctx_a, ctx_b) of HellaSwag's `ctx` = ctx_a + " " + ctx_b, the only context TFDS keeps.

  ctx_b (lower case in `ctx`, capitalized by the harness) is the start of the sentence the
  endings complete: the text after the last ". ", "! " or "? ". A context that ends a
  sentence, or has no sentence end, is taken as ctx_a alone (WikiHow rows have no ctx_b).
  """
  ends = list(_SENTENCE_END.finditer(ctx))
  if not ends or ctx.rstrip()[-1:] in (".", "!", "?"):
    return ctx, ""
  cut = ends[-1].end()
  return ctx[: cut - 1], ctx[cut:]


def _hellaswag_tfds(row) -> tuple[Item, int]:
  ctx_a, ctx_b = split_context(_text(row["context"]))
  endings = [_text(e) for e in row["endings"]]
  item = hellaswag_item(_text(row["activity_label"]), ctx_a, ctx_b, endings, 0)
  return item, int(row["label"])


def _arc_tfds(row) -> tuple[Item, int]:
  labels = [int(x) for x in row["choices"]["label"]]
  answer = int(row["answerKey"])
  gold = labels.index(answer) if answer in labels else -1
  query = f"Question: {_text(row['question'])}\nAnswer:"
  return Item(query, tuple(_text(t) for t in row["choices"]["text"]), 0), gold


def mmlu_header(subject: str) -> str:
  """The description of the harness's mmlu_<subject>.yaml."""
  return (
    "The following are multiple choice questions (with answers) about "
    f"{subject.replace('_', ' ')}.\n\n"
  )


def mmlu_item(question: str, choices: Sequence[str], answer: int, subject: str) -> Item:
  """An MMLU row as lm_eval/tasks/mmlu/default renders it."""
  letters = "ABCD"
  lines = [question.strip(), *(f"{x}. {c}" for x, c in zip(letters, choices, strict=True))]
  return Item("\n".join(lines) + "\nAnswer:", tuple(letters), answer, mmlu_header(subject), subject)


def _with(item_fn):
  """A row -> (Item, gold) function whose Item carries the gold."""

  def make(row):
    item, gold = item_fn(row)
    return dataclasses.replace(item, gold=gold)

  return make


def _collect(rows, make: Callable, choices_of: Callable, skipped: collections.Counter):
  """Items of the rows that pass `check_row`; the others counted in `skipped` by reason."""
  items = []
  for row in rows:
    item = make(row)
    reason = check_row(choices_of(row, item), item.gold)
    if reason:
      skipped[reason] += 1
    else:
      items.append(item)
  return items


def _tfds_rows(name: str, split: str, options: Options, feature: str) -> Sequence:
  cfg = ml_collections.ConfigDict({"tfds_data_dir": options.data_dir, "eval_split": split})
  # tfds_split reads "validation" as data.eval_split: the split given here.
  where = "train" if split == "train" else "validation"
  return sources.tfds_split(name, where, cfg, "--tasks", {f"--tasks ({name})": feature})


def _tfds_loader(name: str, split: str, feature: str, make: Callable) -> Callable:
  def load(options: Options) -> Docs:
    skipped = collections.Counter()
    items = _collect(
      _tfds_rows(name, split, options, feature), make, lambda r, i: i.choices, skipped
    )

    def pool():  # its bad rows are left out, not counted: they are not evaluated
      rows = _tfds_rows(name, "train", options, feature)
      return _collect(rows, make, lambda r, i: i.choices, collections.Counter())

    return Docs(items, pool, skipped)

  return load


def read_jsonl(path: str, flag: str, name: str) -> list[dict]:
  """The rows of a JSONL file; a missing file or a bad line is refused naming the flag."""
  if not os.path.isfile(path):
    raise ValueError(f"{flag}={name}: no such file {path!r}")
  return [row for *_, row in sources.jsonl_lines(path, flag, name)]


def _mc_item(row: dict, path: str, n: int, keys: tuple[str, ...]) -> dict:
  missing = [k for k in keys if k not in row]
  if missing:
    raise ValueError(f"{path}: row {n} has no {missing}; a row needs {list(keys)}")
  if not isinstance(row["choices"], list) or not all(isinstance(c, str) for c in row["choices"]):
    raise ValueError(f"{path}: row {n}: 'choices' must be a list of strings")
  return row


def _mc_loader(path: str) -> Callable:
  def load(options: Options) -> Docs:
    del options
    rows = read_jsonl(path, "--tasks", f"mc:{path}")
    keys = ("question", "choices", "answer")
    rows = [_mc_item(r, path, n, keys) for n, r in enumerate(rows, 1)]
    skipped = collections.Counter()
    items = _collect(
      rows,
      lambda r: Item(str(r["question"]), tuple(r["choices"]), r["answer"]),
      lambda r, i: i.choices,
      skipped,
    )
    return Docs(items, lambda: items, skipped)

  return load


def _mmlu_rows(options: Options, split: str) -> list[dict]:
  if not options.mmlu_dir:
    raise ValueError(
      "--tasks=mmlu: give --mmlu_dir, a folder with test.jsonl and dev.jsonl "
      "(docs/benchmark_tasks.md says how to make them once)"
    )
  path = os.path.join(options.mmlu_dir, f"{split}.jsonl")
  keys = ("question", "choices", "answer", "subject")
  return [
    _mc_item(r, path, n, keys)
    for n, r in enumerate(read_jsonl(path, "--mmlu_dir", os.path.dirname(path)), 1)
  ]


def _mmlu_items(rows: list[dict], skipped: collections.Counter) -> list[Item]:
  good = [r for r in rows if len(r["choices"]) == 4]  # the YAML's template reads four
  if len(good) < len(rows):
    skipped["not four choices (MMLU's template)"] += len(rows) - len(good)
  make = lambda r: mmlu_item(r["question"], r["choices"], r["answer"], r["subject"])  # noqa: E731
  return _collect(good, make, lambda r, i: r["choices"], skipped)


def _mmlu(options: Options) -> Docs:
  skipped = collections.Counter()
  items = _mmlu_items(_mmlu_rows(options, "test"), skipped)
  return Docs(
    items, lambda: _mmlu_items(_mmlu_rows(options, "dev"), collections.Counter()), skipped
  )


BENCHMARKS: dict[str, Benchmark] = {
  "hellaswag": Benchmark(
    _tfds_loader("hellaswag", "validation", "context", _with(_hellaswag_tfds)),
    pool_has_item=True,  # its YAML has no test split: the harness compares None with None
  ),
  "arc_easy": Benchmark(_tfds_loader("ai2_arc/ARC-Easy", "test", "question", _with(_arc_tfds))),
  "arc_challenge": Benchmark(
    _tfds_loader("ai2_arc/ARC-Challenge", "test", "question", _with(_arc_tfds))
  ),
  "mmlu": Benchmark(_mmlu, first_n=True),
}
KNOWN = (*BENCHMARKS, "mc:<path.jsonl>")


def is_benchmark(name: str) -> bool:
  return name in BENCHMARKS or name.startswith("mc:")


def benchmark(name: str) -> Benchmark:
  """The benchmark called `name`; an unknown name is refused listing the known ones."""
  if name in BENCHMARKS:
    return BENCHMARKS[name]
  if name.startswith("mc:") and len(name) > 3:
    return Benchmark(_mc_loader(name[3:]), pool_has_item=True)
  raise ValueError(f"--tasks: unknown benchmark {name!r}; known: {', '.join(KNOWN)}")


# ---- prompts


class Shots:
  """The shots of each item in turn, drawn as the harness's samplers draw them."""

  def __init__(self, bench: Benchmark, pool: list[Item], n: int, seed: int):
    self.bench, self.n, self.rnd = bench, n, random.Random(seed)
    self.pools = collections.defaultdict(list)
    for item in pool:
      self.pools[item.group].append(item)

  def draw(self, item: Item) -> list[Item]:
    if self.n == 0:
      return []
    pool = self.pools[item.group]
    need = self.n + (1 if self.bench.pool_has_item else 0)
    if len(pool) < need:
      where = f" for subject {item.group!r}" if item.group else ""
      raise ValueError(
        f"--num_fewshot={self.n}: the few-shot pool{where} has {len(pool)} rows; {need} needed"
      )
    if not self.bench.pool_has_item:
      return pool[: self.n] if self.bench.first_n else self.rnd.sample(pool, self.n)
    if self.bench.first_n:
      return [d for d in pool if d != item][: self.n]
    shots = [d for d in self.rnd.sample(pool, self.n + 1) if d != item][: self.n]
    if len(shots) < self.n:  # copies of the item were drawn: as the harness, draw again
      shots = self.rnd.sample([d for d in pool if d != item], self.n)
    return shots


def context(item: Item, shots: Sequence[Item]) -> str:
  """The harness's `fewshot_context`: header, shots with their right answers, the query."""
  solved = (s.query + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
  return item.header + "".join(solved) + item.query


def requests(item: Item, shots: Sequence[Item]) -> list[tuple[str, str]]:
  """(context, continuation) of each choice, as the harness's `construct_requests`."""
  ctx = context(item, shots)
  return [(ctx, TARGET_DELIMITER + c) for c in item.choices]


# ---- metrics


def item_metrics(item: Item, lls: Sequence[float]) -> dict[str, float]:
  """acc, acc_norm, acc_bytes of one item from its choices' log-likelihoods."""
  lls_C = np.asarray(lls, np.float64)
  chars_C = np.array([len(c) for c in item.choices], np.float64)
  bytes_C = np.array([len(c.encode("utf-8")) for c in item.choices], np.float64)
  preds = (np.argmax(lls_C), np.argmax(lls_C / chars_C), np.argmax(lls_C / bytes_C))
  return {m: float(p == item.gold) for m, p in zip(METRICS, preds, strict=True)}


def aggregate(per_item: list[dict[str, float]], items: list[Item]) -> dict[str, float]:
  """Means over items, with the harness's standard error (sample std / sqrt(n))."""
  out = {}
  n = len(per_item)
  for m in METRICS:
    x = np.array([r[m] for r in per_item], np.float64)
    out[m] = float(x.mean())
    out[f"{m}_stderr"] = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
  out["chance"] = float(np.mean([1.0 / len(i.choices) for i in items]))
  out["items"] = n
  return out


# ---- one task, one scorer


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A task's requests, ready for any scorer."""

  name: str
  items: list[Item]
  requests: list[tuple[str, str]]  # the items' choices in order
  skipped: collections.Counter
  num_fewshot: int


def prepare(
  name: str, options: Options, num_fewshot: int = 0, seed: int = FEWSHOT_SEED, limit: int = 0
) -> Prepared:
  """The task's items (the first `limit`; 0: all) with their shots, as requests."""
  if num_fewshot < 0 or limit < 0:
    raise ValueError(f"--num_fewshot={num_fewshot}, --limit={limit}: allowed 0 or more")
  bench = benchmark(name)
  docs = bench.load(options)
  items = docs.items[:limit] if limit else docs.items
  if not items:
    raise ValueError(f"--tasks={name}: no item to score (skipped: {dict(docs.skipped)})")
  shots = Shots(bench, docs.pool() if num_fewshot else [], num_fewshot, seed)
  reqs = [r for item in items for r in requests(item, shots.draw(item))]
  return Prepared(name, items, reqs, docs.skipped, num_fewshot)


def score(scorer, task: Prepared) -> dict:
  """{metric: value} of `task` under `scorer` (eval/loglik.py's Scorer, which shows its
  progress on stderr), with `scored_by`: what the scorer's log-likelihood is."""
  lls = [ll for ll, _ in scorer.loglikelihood(task.requests)]
  per_item, k = [], 0
  for item in task.items:
    per_item.append(item_metrics(item, lls[k : k + len(item.choices)]))
    k += len(item.choices)
  out = aggregate(per_item, task.items)
  out["skipped"] = sum(task.skipped.values())
  out["num_fewshot"] = task.num_fewshot
  out["scored_by"] = f"{scorer.family}: {scorer.kind.means}"
  return out


# ---- tables and charts


def _value(v) -> str:
  return f"{v:.4f}" if isinstance(v, float) else str(v)


def short_names(workdirs: list[str]) -> list[str]:
  """The workdirs' last folder names, or the paths as given where two would share one."""
  names = [os.path.basename(os.path.normpath(w)) or w for w in workdirs]
  return names if len(set(names)) == len(names) else list(workdirs)


def table_rows(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
  """(header, rows) of {workdir: {task: {metric: value}}}: a row per (task, metric), a
  column per workdir; text values (how a task was scored) are left out."""
  workdirs = list(results)
  keys = []
  for by_task in results.values():
    for task, metrics in by_task.items():
      for m, v in metrics.items():
        if not isinstance(v, str) and (task, m) not in keys:
          keys.append((task, m))
  rows = [
    [task, m, *(_value(results[w].get(task, {}).get(m, "")) for w in workdirs)] for task, m in keys
  ]
  return ["task", "metric", *short_names(workdirs)], rows


def text_table(results: dict[str, dict[str, dict]]) -> str:
  header, rows = table_rows(results)
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  return "\n".join(
    " ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
  )


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
  header, rows = table_rows(results)
  lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
  lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
  notes = sorted(
    {
      f"- {task}: {v}"
      for by_task in results.values()
      for task, metrics in by_task.items()
      for k, v in metrics.items()
      if isinstance(v, str)
    }
  )
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def chart_name(task: str) -> str:
  """A file name for a task's chart: `mc:runs/x/eval.jsonl` -> `eval_mc_eval.png`."""
  stem = os.path.splitext(os.path.basename(task[3:]))[0] if task.startswith("mc:") else task
  prefix = "mc_" if task.startswith("mc:") else ""
  return "eval_" + re.sub(r"[^A-Za-z0-9_.-]", "_", prefix + stem) + ".png"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def task_figure(results: dict[str, dict[str, dict]], task: str):
  """The bar chart of one benchmark task: acc, acc_norm and acc_bytes of each workdir (in
  that order, one color per metric) with their standard errors, the chance rate a line."""
  plt = _pyplot()
  workdirs = list(results)
  got = [results[w].get(task, {}) for w in workdirs]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(workdirs) + 2), 3.6))
  width = 0.8 / len(METRICS)
  for j, m in enumerate(METRICS):
    x = np.arange(len(workdirs)) + (j - (len(METRICS) - 1) / 2) * width
    heights = [g.get(m, np.nan) for g in got]
    errors = np.nan_to_num([g.get(f"{m}_stderr", 0.0) for g in got])
    ax.bar(x, heights, width, yerr=errors, capsize=3, label=m)
  chance = [g["chance"] for g in got if "chance" in g]
  if chance:
    ax.axhline(float(np.mean(chance)), color="gray", linestyle="--", label="chance")
  ax.set_xticks(np.arange(len(workdirs)), short_names(workdirs))
  ax.tick_params(axis="x", labelrotation=15 if len(workdirs) > 3 else 0)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(task if len(task) < 60 else "..." + task[-57:])
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  return fig


def plot_tasks(results: dict[str, dict[str, dict]], out_dir: str) -> list[str]:
  """`task_figure` of every benchmark task (one with `acc`) as <out_dir>/eval_<task>.png;
  returns the paths."""
  plt = _pyplot()
  tasks = []
  for by_task in results.values():
    tasks += [t for t, m in by_task.items() if "acc" in m and t not in tasks]
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for task in tasks:
    fig = task_figure(results, task)
    paths.append(os.path.join(out_dir, chart_name(task)))
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
  return paths
