"""BitNet b1.58 against full precision at several sizes: the paper's comparison, CPU-sized.

python -m launch.sweep --config=configs/ablations/bitnet_vs_fp.py --workdir=runs/bitnet_vs_fp

Tiny Shakespeare comes from TFDS (`tiny_shakespeare`, downloaded on first use); offline,
point SOURCE below at a local copy (`text:path/to/input.txt`; see
configs/repro/shakespeare_char_cpu.py for how the two routes split the text).

One run per (size, quant) of GRID, each `get_config("size=...,quant=...")`: a Llama-style
decoder (RoPE, RMSNorm, SwiGLU, untied head, no biases; head_dim 32) on Tiny Shakespeare,
context 128, batch 32, 1,500 steps, the same data order for every run. Full precision uses
the nanoGPT CPU recipe (learning rate 1e-3, cosine to 1e-4, weight decay 0.1);
bitnet158 uses the BitNet b1.58 recipe's shape: a higher rate first (2e-3), then at half
the steps a drop to 5e-4 with cosine to 1e-4 and weight decay 0 (`train.schedule=two_stage`).
`summarize` writes the table (eval/loss of each, and the ratio) and the plot of the gap
against the parameter count.
"""

from __future__ import annotations

from etils import epath

from configs import base, llama

# layers, d_model, heads, d_ff (SwiGLU ~ 8/3 d_model)
SIZES = {
  "2x64": dict(num_layers=2, d_model=64, num_heads=2, d_ff=176),
  "3x96": dict(num_layers=3, d_model=96, num_heads=3, d_ff=256),
  "4x128": dict(num_layers=4, d_model=128, num_heads=4, d_ff=352),
}  # multi-head attention: num_kv_heads follows num_heads, set below
QUANTS = ("none", "bitnet158")
GRID = [f"size={s},quant={q}" for s in SIZES for q in QUANTS]
SOURCE = "tiny_shakespeare"


def get_config(arg: str | None = None):
  args = base.parse_args(arg, {"size": "4x128", "quant": "bitnet158"})
  c = llama.get_config("size=XS")
  c.model.num_kv_heads = c.model.get_oneway_ref("num_heads")  # llama's XS has GQA
  c.model.update(base.choose("size", args["size"], SIZES))
  c.model.quant = base.choose("quant", args["quant"], {q: q for q in QUANTS})
  c.data.name = SOURCE
  c.data.eval_split = "validation+test"  # the last 10% of the text, as nanoGPT's validation
  c.data.seq_len = 128
  c.data.shuffle_window = 16384
  c.train.update(
    dict(
      steps=1500,
      batch_size=32,
      warmup_steps=100,
      weight_decay=0.1,
      min_learning_rate=1e-4,
      eval_every=500,
      eval_steps=0,
      eval_batch_size=64,
      checkpoint_every=500,
      num_samples=0,
    )
  )
  if c.model.quant == "none":
    c.train.update(dict(schedule="cosine", learning_rate=1e-3))
  else:
    c.train.update(dict(schedule="two_stage", learning_rate=2e-3, cooldown_learning_rate=5e-4))
  return c


def summarize(results: dict[str, dict], outdir: str) -> str:
  """results: grid arg -> {"params": n, "metrics": last metrics}. Writes results.md and
  gap.png (bitnet158 / full precision eval/loss against parameters); returns the table."""
  rows = ["| size | parameters | full precision eval/loss | bitnet158 eval/loss | ratio |"]
  rows.append("| --- | --- | --- | --- | --- |")
  points = []
  for size in SIZES:
    fp, q = results.get(f"size={size},quant=none"), results.get(f"size={size},quant=bitnet158")
    if not (fp and q):
      continue
    a, b = fp["metrics"]["eval/loss"], q["metrics"]["eval/loss"]
    rows.append(f"| {size} | {fp['params']:,} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    points.append((fp["params"], b / a))
  table = "\n".join(rows)
  (epath.Path(outdir) / "results.md").write_text(table + "\n")  # local, or gs://
  if points:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p for p, _ in points], [r for _, r in points], marker="o")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("eval/loss, bitnet158 / full precision")
    ax.grid(alpha=0.3)
    with (epath.Path(outdir) / "gap.png").open("wb") as f:
      fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
  return table
