"""python -m eval.sample on a trained tiny diffusion workdir: both samplers, infilling, and the
errors (too long a request, flags the family's samplers do not read)."""

import re

from tests.eval.test_sample_cli import sample

HEADER = re.compile(r"^---- sample (\d+)/(\d+) \((\d+) network calls, [\d.]+ s\)$", re.M)


def samples(stdout: str) -> list[tuple[int, int, int, str]]:
  """[(i, n, network calls, text)] from the CLI's output."""
  heads = list(HEADER.finditer(stdout))
  ends = [h.start() for h in heads[1:]] + [len(stdout)]
  return [
    (int(h[1]), int(h[2]), int(h[3]), stdout[h.end() + 1 : end].removesuffix("\n"))
    for h, end in zip(heads, ends, strict=True)
  ]


def test_ancestral_sampling_infills_between_prompt_and_suffix(mdlm_workdir):
  out = sample(
    mdlm_workdir,
    "--prompt=def f(",
    "--suffix=):\n",
    "--num_tokens=12",
    "--steps=48",
    "--num_samples=2",
    "--seed=1",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = samples(out.stdout)
  assert [(i, n) for i, n, _, _ in got] == [(1, 2), (2, 2)]
  for _, _, calls, text in got:
    assert text.startswith("def f(") and text.endswith("):\n"), text
    assert 1 <= calls <= 12 + 1  # the cache skips steps that reveal nothing (48 steps)
  assert got[0][3] != got[1][3]  # each sample its own rng


def test_llada_greedy_is_deterministic(mdlm_workdir):
  out = sample(
    mdlm_workdir,
    "--prompt=import ",
    "--num_tokens=12",
    "--sampler=llada",
    "--block_length=4",
    "--steps=6",
    "--temperature=0",
    "--num_samples=2",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  got = samples(out.stdout)
  assert len(got) == 2 and all(calls == 6 for _, _, calls, _ in got)
  assert got[0][3] == got[1][3] and got[0][3].startswith("import ")


def test_too_long_a_request_fails_clearly(mdlm_workdir):
  out = sample(mdlm_workdir, "--prompt=abcd", "--num_tokens=30")  # 4 + 30 > 32 positions
  assert out.returncode != 0
  assert "--num_tokens=30" in out.stderr and "1 to 32 (its context)" in out.stderr
  assert "---- sample" not in out.stdout


def test_diffusion_rejects_the_autoregressive_top_k(mdlm_workdir):
  out = sample(mdlm_workdir, "--prompt=abc", "--top_k=5")
  assert out.returncode != 0
  assert "--top_k: model.family='diffusion' samplers read only" in out.stderr
  assert "---- sample" not in out.stdout
