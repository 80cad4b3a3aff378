"""The deployment table: each model in each GGUF type, run by llama.cpp on this CPU.

pip install -e '.[llamacpp]'
python -m bench.deploy --workdir=runs/llama --workdir=runs/bitnet --output=runs/deploy/table

For every --workdir and every type that applies (a float decoder: F16, Q8_0, Q4_0, and F32
with --f32; a BitNet run: TQ1_0, TQ2_0, and its ternary values in F16, Q8_0, Q4_0), the
model is exported (eval/gguf_export.py) and measured:
  size        the file, and bits per matrix weight read back from it
  memory      the peak resident set of a fresh process (bench/llamacpp_speed.py) that loads
              the file and runs the speed test, less that process's own before loading
  speed       prompt processing (--prompt_tokens in one batch) and generation
              (--gen_tokens greedy, one at a time) tokens/s for each --threads, the
              fastest of --repeats fresh processes
  loss        nats per token of the GGUF model on --loss_tokens tokens of the run's
              validation text, teacher-forced through llama.cpp's logits (fourfold's own
              loss on the same windows is a row)
  agreement   the share of those validation positions where llama.cpp's next-token argmax
              is fourfold's, and greedy tokens of llama.cpp identical to fourfold's from
              --prompt (the identical prefix)
fourfold's own generation speed for the same workdir is a row: `eval.sample` run as a
command (JAX on every core, greedy, --gen_tokens; the second sample, after compilation).
The load average is recorded beside every speed (the highest over the repeats; the machine
may be shared).
Writes <output>.json (the measurements), <output>.md (the table) and <output>.png (speed and
loss against file size); `--from_json=<output>.json --output=...` renders them again, and
with `--respeed` first times the GGUF files again, back to back (when the load is lower).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
from absl import app, flags

from bench.llamacpp import (
  agreement,
  fourfold_greedy,
  fourfold_loss,
  llamacpp_greedy,
  llamacpp_loss,
  open_gguf,
  validation_windows,
)
from eval.gguf_export import read_tensors, write_gguf
from train import console
from train.trainer import load_for_inference

flags.DEFINE_multi_string("workdir", None, "decoder runs (BitNet, Llama or GPT presets)")
flags.DEFINE_string("output", None, "path prefix of the table (.md) and plot (.png)")
flags.DEFINE_string("gguf_dir", "", "where the GGUF files go; empty: beside --output")
flags.DEFINE_list("types", [], "GGUF types to measure; empty: every type that applies")
flags.DEFINE_bool("f32", False, "float models: add F32 to the types")
flags.DEFINE_list("threads", ["1", "2"], "llama.cpp thread counts to time")
flags.DEFINE_integer("prompt_tokens", 128, "prompt processing: tokens in one batch")
flags.DEFINE_integer("gen_tokens", 64, "generation: greedy tokens")
flags.DEFINE_integer("repeats", 2, "speed runs per (file, threads); the fastest is kept")
flags.DEFINE_integer("loss_tokens", 4096, "validation tokens for the loss; 0: skip it")
flags.DEFINE_integer("agree_tokens", 64, "greedy tokens compared with fourfold; 0: skip it")
flags.DEFINE_string("prompt", "ROMEO:", "the agreement and eval.sample prompt")
flags.DEFINE_bool("fourfold_speed", True, "time eval.sample on the workdir too")
flags.DEFINE_string("from_json", "", "re-render the table and plot of a finished run's .json")
flags.DEFINE_bool(
  "respeed", False, "with --from_json: time the GGUF files in --gguf_dir again, back to back"
)
FLAGS = flags.FLAGS

BITNET_TYPES = ("TQ1_0", "TQ2_0", "F16", "Q8_0", "Q4_0")
FLOAT_TYPES = ("F16", "Q8_0", "Q4_0")


def types_of(config) -> list[str]:
  if FLAGS.types:
    return list(FLAGS.types)
  if config.model.quant in ("bitnet158", "bitnet1"):
    return list(BITNET_TYPES)
  return (["F32"] if FLAGS.f32 else []) + list(FLOAT_TYPES)


def speed(path: str, threads: int) -> dict:
  """bench.llamacpp_speed in fresh processes (their own peak memory, nothing of this one's),
  --repeats times; the fastest prompt processing and generation, the largest peak."""
  cmd = [sys.executable, "-m", "bench.llamacpp_speed", path, str(threads)]
  cmd += [str(FLAGS.prompt_tokens), str(FLAGS.gen_tokens)]
  runs = []
  for _ in range(FLAGS.repeats):
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
  best = dict(runs[0])
  for key in ("pp_tokens_per_s", "tg_tokens_per_s", "peak_rss_mib", "load"):
    best[key] = max(r[key] for r in runs)
  best["baseline_rss_mib"] = min(r["baseline_rss_mib"] for r in runs)
  return best


def fourfold_sample_speed(workdir: str) -> dict:
  """eval.sample's own timing of a greedy sample of --gen_tokens (the second of two)."""
  load = os.getloadavg()[0]
  cmd = [sys.executable, "-m", "eval.sample", f"--workdir={workdir}", f"--prompt={FLAGS.prompt}"]
  cmd += [f"--num_tokens={FLAGS.gen_tokens}", "--temperature=0", "--num_samples=2"]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
  seconds = float(re.findall(r"---- sample 2/2 \(\d+ network calls, ([0-9.]+) s\)", out)[0])
  return {"tg_tokens_per_s": FLAGS.gen_tokens / seconds, "load": load}


def measure_workdir(workdir: str, gguf_dir: str) -> list[dict]:
  config, model, params, tokenizer = load_for_inference(workdir)
  name = os.path.basename(os.path.abspath(workdir))
  n_ctx = model.cfg.max_len
  windows = None
  if FLAGS.loss_tokens:
    windows = validation_windows(config, tokenizer, FLAGS.loss_tokens, n_ctx)
  prompt = tokenizer.encode(FLAGS.prompt)
  n_agree = min(FLAGS.agree_tokens, n_ctx - prompt.size)
  ours = fourfold_greedy(model, params, prompt, n_agree) if n_agree > 0 else None
  ours_loss = ours_pred = None
  if windows is not None:
    ours_loss, ours_pred = fourfold_loss(model, params, windows)
  params_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  rows = [
    {
      "model": name,
      "type": "fourfold (JAX)",
      "parameters": params_count,
      "file_mib": None,
      "bits_per_weight": 32.0,
      "loss": ours_loss,
      "speeds": [fourfold_sample_speed(workdir)] if FLAGS.fourfold_speed else [],
    }
  ]
  for t in types_of(config):
    path = os.path.join(gguf_dir, f"{name}.{t}.gguf")
    out = write_gguf(workdir, path, t)
    tensors = read_tensors(path)
    matrices = [(int(np.prod(s)), b) for _, s, b in tensors.values() if len(s) == 2]
    row = {
      "model": name,
      "type": t,
      "parameters": params_count,
      "file_mib": os.path.getsize(path) / 2**20,
      "bits_per_weight": 8 * sum(b for _, b in matrices) / sum(n for n, _ in matrices),
      "matrix_bits_per_weight": out["bits_per_weight"],
      "speeds": [speed(path, int(th)) for th in FLAGS.threads],
    }
    llm = open_gguf(path, n_ctx, logits_all=True, threads=max(map(int, FLAGS.threads)))
    if windows is not None:
      row["loss"], pred = llamacpp_loss(llm, windows)
      row["argmax_agree"] = float((pred == ours_pred).mean())
    if ours is not None:
      row["agree"] = agreement(ours, llamacpp_greedy(llm, prompt, n_agree))[1]
      row["agree_of"] = n_agree
    del llm
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def fmt(x, spec: str = ".2f", none: str = "") -> str:
  return none if x is None else format(x, spec)


def table(rows: list[dict], threads: list[int]) -> str:
  head = ["model", "type", "file MiB", "bits/weight (matrices)", "file bits/param"]
  head += ["peak RSS MiB (model)"]
  for th in threads:
    head += [f"pp tok/s ({th} thr)", f"tg tok/s ({th} thr)"]
  head += ["load (1 min)", "eval loss", "argmax = fourfold", "greedy agreement"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in rows:
    by_threads = {s.get("threads"): s for s in r["speeds"]}
    cells = [r["model"], r["type"], fmt(r["file_mib"], ".1f")]
    cells.append(fmt(r.get("matrix_bits_per_weight", r["bits_per_weight"]), ".3f"))
    file_bits = None if r["file_mib"] is None else 8 * r["file_mib"] * 2**20 / r["parameters"]
    cells.append(fmt(file_bits, ".3f"))
    s0 = r["speeds"][0] if r["speeds"] else None
    mem = None if s0 is None or "peak_rss_mib" not in s0 else s0["peak_rss_mib"]
    base = None if mem is None else s0["baseline_rss_mib"]
    cells.append("" if mem is None else f"{mem:.0f} ({mem - base:.0f})")
    for th in threads:
      s = by_threads.get(th)
      if r["type"].startswith("fourfold"):  # JAX uses every core: one figure, under the last
        s = r["speeds"][0] if r["speeds"] and th == threads[-1] else None
      cells += [
        fmt(s and s.get("pp_tokens_per_s"), ".0f"),
        fmt(s and s.get("tg_tokens_per_s"), ".1f"),
      ]
    cells.append(", ".join(f"{s['load']:.1f}" for s in r["speeds"]))
    cells.append(fmt(r.get("loss"), ".4f"))
    cells.append(fmt(r.get("argmax_agree"), ".2%"))
    cells.append(f"{r['agree']}/{r['agree_of']}" if "agree" in r else "")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, threads: list[int]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  ggufs = [r for r in rows if r["file_mib"] is not None]
  for model in sorted({r["model"] for r in ggufs}):
    mine = [r for r in ggufs if r["model"] == model]
    for th, marker in zip(threads, "os^", strict=False):
      xs = [r["file_mib"] for r in mine]
      ys = [next(s["tg_tokens_per_s"] for s in r["speeds"] if s["threads"] == th) for r in mine]
      axes[0].scatter(xs, ys, marker=marker, label=f"{model}, {th} thread(s)")
      for r, x, y in zip(mine, xs, ys, strict=True):
        axes[0].annotate(r["type"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    losses = [(r["file_mib"], r["loss"], r["type"]) for r in mine if r.get("loss") is not None]
    if losses:
      axes[1].scatter([x for x, _, _ in losses], [y for _, y, _ in losses], label=model)
      for x, y, t in losses:
        axes[1].annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  axes[0].set(xlabel="GGUF file (MiB)", ylabel="generation tokens/s (llama.cpp)", xscale="log")
  axes[1].set(xlabel="GGUF file (MiB)", ylabel="validation loss through llama.cpp (nats/token)")
  axes[1].set_xscale("log")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  threads = [int(t) for t in FLAGS.threads]
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      rows = json.load(f)
    gguf_dir = FLAGS.gguf_dir or os.path.dirname(os.path.abspath(FLAGS.from_json))
    for row in rows if FLAGS.respeed else []:
      if row["file_mib"] is not None:
        path = os.path.join(gguf_dir, f"{row['model']}.{row['type']}.gguf")
        row["speeds"] = [speed(path, th) for th in threads]
        print(json.dumps(row), flush=True)
    if FLAGS.respeed:
      with open(FLAGS.output + ".json", "w") as f:
        json.dump(rows, f, indent=1)
  else:
    if not FLAGS.workdir or not FLAGS.output:
      raise app.UsageError("--workdir (one or more) and --output are required")
    console.setup(FLAGS.workdir[0])
    gguf_dir = FLAGS.gguf_dir or os.path.dirname(os.path.abspath(FLAGS.output))
    os.makedirs(gguf_dir, exist_ok=True)
    rows = []
    for w in FLAGS.workdir:
      for row in measure_workdir(w, gguf_dir):
        rows.append(row)
        with open(
          FLAGS.output + ".json", "w"
        ) as f:  # after each workdir: a cut run keeps those done
          json.dump(rows, f, indent=1)
  with open(FLAGS.output + ".md", "w") as f:
    f.write(table(rows, threads))
  plot(rows, FLAGS.output + ".png", threads)
  print(table(rows, threads))


if __name__ == "__main__":
  app.run(main)
