"""Encoder-decoder data: T5 span corruption, and text-to-text examples (TFDS or JSONL,
alone or as a Flan-style mixture), packed on both sides.

Every batch is a dict of int32 `[batch, length]` arrays: the encoder's `tokens`,
`segment_ids`, `positions` (`data.seq_len` long) and the decoder's `targets`,
`targets_segment_ids`, `targets_positions` (`data.target_len` long). Both sides end each
example with the tokenizer's EOS. Span corruption changes lengths, so it runs here, in the pipeline, with
grain's per-element random maps: seeded, and restored with the iterator's state.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from modeling.vocab import EOS_ID, FOURFOLD, Specials
from train.data import labeled, pipeline, sources
from train.data.tokenizers import Tokenizer

# ---- span corruption (T5 section 3.1.4: noise density 0.15, mean span length 3)


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(noise tokens, noise spans) T5 uses for a chunk of `length` tokens: both >= 1, and
  at least one token is kept."""
  noise = min(max(int(round(length * noise_density)), 1), length - 1)
  spans = max(int(round(noise / mean_span)), 1)
  return noise, spans


def span_lengths(inputs_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
  """(raw chunk length, targets length) for encoder inputs of exactly `inputs_len` tokens.

  The longest raw chunk whose corrupted form (kept tokens, one sentinel per span, EOS)
  fits `inputs_len`; the targets (one sentinel per span, the noise tokens, EOS) then have
  a fixed length too, so neither side is cut or padded.
  """

  def sizes(raw: int) -> tuple[int, int]:
    noise, spans = span_counts(raw, noise_density, mean_span)
    return raw - noise + spans + 1, noise + spans + 1

  raw = 2
  if sizes(raw)[0] > inputs_len:
    raise ValueError(f"data.seq_len={inputs_len}: too short for span corruption")
  while sizes(raw + 1)[0] <= inputs_len:
    raw += 1
  return raw, sizes(raw)[1]


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `parts` positive lengths, uniformly over such splits."""
  cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(
  length: int, noise_density: float, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
  """Boolean [length]: spans of noise (masked) tokens alternating with kept ones, kept
  first, so a chunk always starts with a kept token and ends with a noise span."""
  noise, spans = span_counts(length, noise_density, mean_span)
  spans = min(spans, noise, length - noise)
  noise_N = _partition(noise, spans, rng)
  kept_N = _partition(length - noise, spans, rng)
  runs = np.stack([kept_N, noise_N], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], spans), runs)


def span_corrupt(
  tokens_N: np.ndarray,
  rng: np.random.Generator,
  noise_density: float,
  mean_span: float,
  first_sentinel: int,
  eos: int = EOS_ID,
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets): each noise span replaced in the inputs by one sentinel (ids
  `first_sentinel`, `first_sentinel` + 1, ... in order), and the targets listing each
  sentinel followed by the span it hides; both end with `eos`."""
  mask_N = noise_mask(len(tokens_N), noise_density, mean_span, rng)
  starts_N = mask_N & ~np.concatenate([[False], mask_N[:-1]])
  sentinel_N = first_sentinel + np.cumsum(starts_N) - 1
  inputs_N = np.where(starts_N, sentinel_N, tokens_N)[~mask_N | starts_N]
  # targets: the complement's corruption: each noise span is led by its sentinel
  noise_idx = np.flatnonzero(mask_N)
  lead_N = starts_N[noise_idx]
  targets_N = np.empty(len(noise_idx) + np.count_nonzero(lead_N), np.int32)
  slot_N = np.arange(len(noise_idx)) + np.cumsum(lead_N)  # each token after its sentinel(s)
  targets_N[slot_N] = tokens_N[noise_idx]
  targets_N[slot_N[lead_N] - 1] = sentinel_N[noise_idx[lead_N]]
  end = np.array([eos], np.int32)
  return np.concatenate([inputs_N.astype(np.int32), end]), np.concatenate([targets_N, end])


def _pad(a_N: np.ndarray, length: int) -> np.ndarray:
  return np.pad(a_N, (0, length - len(a_N)))


def _side(tokens_N: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
  """One example as a padded row: tokens, segment ids (1 on tokens), positions."""
  n = len(tokens_N)
  seg_N = _pad(np.ones(n, np.int32), length)
  return _pad(tokens_N, length), seg_N, _pad(np.arange(n, dtype=np.int32), length)


def row(inputs_N: np.ndarray, targets_N: np.ndarray, seq_len: int, target_len: int) -> dict:
  """An unpacked example as the batch's six arrays."""
  t, s, p = _side(inputs_N.astype(np.int32), seq_len)
  tt, ts, tp = _side(targets_N.astype(np.int32), target_len)
  return {
    "tokens": t,
    "segment_ids": s,
    "positions": p,
    "targets": tt,
    "targets_segment_ids": ts,
    "targets_positions": tp,
  }


def target_len(config: ml_collections.ConfigDict) -> int:
  """The decoder's length: `data.target_len`, or for span corruption the length T5's
  arithmetic gives for `data.seq_len` inputs."""
  d, t = config.data, config.task
  if t.name == "pretrain":
    needed = span_lengths(d.seq_len, t.noise_density, t.mean_span_length)[1]
    if d.target_len and d.target_len < needed:
      raise ValueError(
        f"data.target_len={d.target_len}: span corruption of data.seq_len={d.seq_len} inputs "
        f"needs {needed} target tokens; use 0 (computed) or more"
      )
    return d.target_len or needed
  return d.target_len or d.seq_len


def span_rows_fn(config: ml_collections.ConfigDict, vocab_size: int, specials: Specials = FOURFOLD):
  """rows_fn for pipeline.train_iterator / eval_batches: documents -> corrupted rows, the
  sentinels numbered from `vocab_size` on, both sides ended with `specials.eos`."""
  d, t = config.data, config.task
  raw, _ = span_lengths(d.seq_len, t.noise_density, t.mean_span_length)
  tgt_len = target_len(config)
  _, spans = span_counts(raw, t.noise_density, t.mean_span_length)
  if spans > t.num_sentinels:
    raise ValueError(
      f"task.num_sentinels={t.num_sentinels}: a {raw}-token chunk has {spans} noise spans; "
      f"raise it to >= {spans}"
    )

  eos = specials.require("eos", "span corruption (ending inputs and targets)")

  def corrupt(chunk: dict, rng: np.random.Generator) -> dict:
    tokens_N = chunk["tokens"][chunk["tokens_segment_ids"] > 0]
    inputs, targets = span_corrupt(
      tokens_N, rng, t.noise_density, t.mean_span_length, vocab_size, eos
    )
    return row(inputs, targets, d.seq_len, tgt_len)

  def rows_fn(documents: grain.IterDataset, seed: int) -> grain.IterDataset:
    chunks = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct={"tokens": raw})
    return chunks.filter(lambda c: np.count_nonzero(c["tokens_segment_ids"]) >= 2).random_map(
      corrupt, seed=seed
    )

  return rows_fn


# ---- text-to-text examples


TEMPLATE_STYLES = ("t5", "flan")  # task.templates: T5's one prefix format, or Flan's phrasings


@dataclasses.dataclass(frozen=True)
class Template:
  """How a TFDS dataset's examples become (input text, target text)."""

  fields: tuple[str, ...]  # features the templates read
  t5: tuple[str, str]  # T5's task prefix format: (inputs, targets)
  flan: tuple[tuple[str, str], ...]  # instruction phrasings, one drawn per example
  labels: tuple[str, ...] = ()  # class names: {label} in targets becomes the name
  regression: bool = False  # {label} is a score, written rounded to 0.2 (T5's STS-B)


def _pair(name: str, a: str, b: str, labels: tuple, question: str) -> Template:
  return Template(
    (a, b, "label"),
    (f"{name} {a}: {{{a}}} {b}: {{{b}}}", "{label}"),
    (
      (f"{{{a}}}\n\n{{{b}}}\n\n{question}", "{label}"),
      (f"{question}\n\nFirst: {{{a}}}\nSecond: {{{b}}}", "{label}"),
    ),
    labels,
  )


TEMPLATES: dict[str, Template] = {
  "cnn_dailymail": Template(
    ("article", "highlights"),
    ("summarize: {article}", "{highlights}"),
    (
      ("{article}\n\nWrite highlights for this article.", "{highlights}"),
      ("Summarize this news article:\n\n{article}", "{highlights}"),
      ("Article: {article}\n\nWhat are the main points of this article?", "{highlights}"),
    ),
  ),
  "wmt14_translate/de-en": Template(
    ("de", "en"),
    ("translate German to English: {de}", "{en}"),
    (
      ("Translate to English:\n\n{de}", "{en}"),
      ("{de}\n\nTranslate this sentence from German to English.", "{en}"),
      ('How is "{de}" said in English?', "{en}"),
    ),
  ),
  "glue/sst2": Template(
    ("sentence", "label"),
    ("sst2 sentence: {sentence}", "{label}"),
    (
      ("{sentence}\n\nIs the sentiment of this review positive or negative?", "{label}"),
      ("Review: {sentence}\nSentiment (positive or negative):", "{label}"),
    ),
    ("negative", "positive"),
  ),
  "glue/cola": Template(
    ("sentence", "label"),
    ("cola sentence: {sentence}", "{label}"),
    (
      ("Is this sentence grammatically acceptable?\n\n{sentence}", "{label}"),
      ("{sentence}\n\nAcceptable or unacceptable?", "{label}"),
    ),
    ("unacceptable", "acceptable"),
  ),
  "glue/mnli": _pair(
    "mnli",
    "hypothesis",
    "premise",
    ("entailment", "neutral", "contradiction"),
    "Does the premise entail the hypothesis (entailment, neutral or contradiction)?",
  ),
  "glue/rte": _pair(
    "rte",
    "sentence1",
    "sentence2",
    ("entailment", "not_entailment"),
    "Does the first sentence entail the second?",
  ),
  "glue/qnli": _pair(
    "qnli",
    "question",
    "sentence",
    ("entailment", "not_entailment"),
    "Does the sentence answer the question?",
  ),
  "glue/mrpc": _pair(
    "mrpc",
    "sentence1",
    "sentence2",
    ("not_equivalent", "equivalent"),
    "Do these two sentences mean the same thing?",
  ),
  "glue/qqp": _pair(
    "qqp",
    "question1",
    "question2",
    ("not_duplicate", "duplicate"),
    "Are these two questions duplicates?",
  ),
  "glue/stsb": dataclasses.replace(
    _pair("stsb", "sentence1", "sentence2", (), "How similar are the two sentences, from 0 to 5?"),
    regression=True,
  ),
}


def _template_for(name: str) -> Template | None:
  base = name.split(":", 1)[0]
  return TEMPLATES.get(base)


def parse_mixture(config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """[(source, rate)] from `task.mixture` ('source@rate;source@rate'), else data.name."""
  spec = config.task.mixture
  if not spec:
    return [(config.data.name, 1.0)]
  out = []
  for item in filter(None, (p.strip() for p in spec.split(";"))):
    name, sep, rate = item.rpartition("@")
    try:
      value = float(rate)
    except ValueError:
      value = -1.0
    if not sep or not name or not value > 0:
      raise ValueError(
        f"task.mixture={spec!r}: {item!r} is not 'source@rate' with a positive rate "
        "(sources: jsonl:<glob> or a TFDS name)"
      )
    out.append((name, value))
  if not out:
    raise ValueError(f"task.mixture={spec!r}: no source")
  return out


def _value(record: dict, field: str, where: str) -> object:
  if field not in record:
    raise ValueError(f"{where}: no field {field!r}")
  v = record[field]
  if isinstance(v, np.ndarray) and v.ndim == 0:
    v = v.item()
  return v


def _fill(pattern: str, record: dict, where: str, template: Template | None) -> str:
  """The pattern with each {field} replaced by the record's text (labels by their name)."""
  out, rest = [], pattern
  while "{" in rest:
    head, _, tail = rest.partition("{")
    field, _, rest = tail.partition("}")
    value = _value(record, field, where)
    if field == "label" and template is not None:
      if template.regression:
        value = f"{round(float(value) * 5) / 5:.1f}"
      elif template.labels:
        index = int(value)
        if not 0 <= index < len(template.labels):
          raise ValueError(f"{where}: label {index} outside {list(template.labels)}")
        value = template.labels[index]
    out += [head, labeled._text(value, where, field) if not isinstance(value, str) else value]
  return "".join(out + [rest])


class TextPairs(Sequence):
  """(input text, target text) of a source's examples; `flan` draws the phrasing per
  example from `rng_seed` and the example's index (so it is the same on every epoch's
  visit of the same index, and on resume)."""

  def __init__(self, config, name: str, split: str):
    t = config.task
    self.template = _template_for(name)
    key = "task.mixture" if t.mixture else ("data.eval_name" if split == "all" else "data.name")
    if name.startswith("jsonl:"):
      self.records = labeled._jsonl_records(name, split, key)
      for where, record in self.records:  # all records are checked before training
        for field in (t.inputs_field, t.targets_field):
          if field not in record:
            raise ValueError(
              f"{where}: no field {field!r} (task.inputs_field={t.inputs_field!r}, "
              f"task.targets_field={t.targets_field!r})"
            )
      self.patterns = ((f"{{{t.inputs_field}}}", f"{{{t.targets_field}}}"),)
      self.template = None
    elif name == "pystdlib" or name.startswith("text:"):
      raise ValueError(
        f"{key}={name!r}: task.name='seq2seq' needs (inputs, targets) examples: jsonl:<glob> "
        f"or a TFDS dataset ({sorted(TEMPLATES)} have templates)"
      )
    else:
      fields = self.template.fields if self.template else (t.inputs_field, t.targets_field)
      source = sources.tfds_split(
        name, split, config.data, key, {f"{key} feature": f for f in fields}
      )
      self.records = labeled.TfdsRecords(name, split, source)
      if self.template is None:
        self.patterns = ((f"{{{t.inputs_field}}}", f"{{{t.targets_field}}}"),)
      else:
        self.patterns = self.template.flan if t.templates == "flan" else (self.template.t5,)
    self.seed = config.seed

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> tuple[str, str]:
    where, record = self.records[index]
    pick = np.random.default_rng([self.seed, index]).integers(len(self.patterns))
    inputs, targets = self.patterns[pick]
    return _fill(inputs, record, where, self.template), _fill(targets, record, where, self.template)


class Counts:
  """Examples seen, truncated and skipped; logged as they happen (first, then at powers
  of two) so a long run's log says how much of its data was cut."""

  def __init__(self, what: str, seq_len: int, target_len: int):
    self.what, self.seq_len, self.target_len = what, seq_len, target_len
    self.seen = self.long_inputs = self.long_targets = self.empty = 0

  def note(self, long_inputs: bool, long_targets: bool, empty: bool) -> None:
    self.seen += 1
    for attr, hit in (
      ("long_inputs", long_inputs),
      ("long_targets", long_targets),
      ("empty", empty),
    ):
      if hit:
        n = getattr(self, attr) + 1
        setattr(self, attr, n)
        if n & (n - 1) == 0:
          self.log(logging.warning)

  def log(self, log=logging.info) -> None:
    log(
      "%s: of %d examples so far, %d had inputs longer than data.seq_len=%d (truncated), "
      "%d targets longer than data.target_len=%d (truncated), %d empty targets (skipped)",
      self.what,
      self.seen,
      self.long_inputs,
      self.seq_len,
      self.long_targets,
      self.target_len,
      self.empty,
    )


def encode_pair(
  pair: tuple[str, str], tokenizer: Tokenizer, seq_len: int, tgt_len: int, counts: Counts
) -> dict | None:
  """Token ids of both texts, each ended with the tokenizer's EOS and cut to its side's
  length; None (skipped) when the target is empty."""
  inputs_N = tokenizer.encode(pair[0])
  targets_N = tokenizer.encode(pair[1])
  empty = targets_N.size == 0
  long_in, long_tgt = inputs_N.size + 1 > seq_len, targets_N.size + 1 > tgt_len
  counts.note(long_in, long_tgt and not empty, empty)
  if empty:
    return None
  eos = np.array([tokenizer.specials.require("eos", "a text-to-text example")], np.int32)
  return {
    "inputs": np.concatenate([inputs_N[: seq_len - 1].astype(np.int32), eos]),
    "targets": np.concatenate([targets_N[: tgt_len - 1].astype(np.int32), eos]),
  }


def _packed(examples: grain.IterDataset, seq_len: int, tgt_len: int, bins: int, seed: int):
  """First-fit packing of both sides, each with its own segment ids and positions."""
  packed = pipeline.first_fit(examples, {"inputs": seq_len, "targets": tgt_len}, bins, seed)
  return packed.map(
    lambda r: {
      "tokens": r["inputs"],
      "segment_ids": r["inputs_segment_ids"],
      "positions": r["inputs_positions"],
      "targets": r["targets"],
      "targets_segment_ids": r["targets_segment_ids"],
      "targets_positions": r["targets_positions"],
    }
  )


def _sources(config, split: str) -> list[tuple[TextPairs, float]]:
  """[(examples, rate)] of the mixture (or data.name alone) for the split."""
  return [(TextPairs(config, name, split), rate) for name, rate in parse_mixture(config)]


def seq2seq_train_iterator(
  config: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  pair_sources: list[tuple[Sequence, float]] | None = None,
) -> grain.DatasetIterator:
  """Infinite packed batches of the mixture (one source: rate 1), checkpointable.

  Each source is reshuffled every epoch; sources are interleaved by their rates. Examples
  are dealt as pretraining's documents are (`pipeline.process_batches`): example k of each
  source goes to shard k % data.shards, and each process keeps its rows of the global batch,
  so the batches do not depend on the process count. `pair_sources`: [(text pairs, rate)]
  in place of the config's (SFT's conversations).
  """
  pipeline.check_process(process_index, process_count)
  d = config.data
  pipeline.check_shards(d.shards, batch_size * process_count)
  tgt_len = target_len(config)
  counts = Counts("seq2seq training data", d.seq_len, tgt_len)
  mixture = pair_sources or _sources(config, "train")

  def shard_batches(shard: int, rows: int) -> grain.DatasetIterator:
    parts, rates = [], []
    for k, (pairs, rate) in enumerate(mixture):
      mine = grain.MapDataset.source(pairs)[shard :: d.shards]
      if len(mine) == 0:
        raise ValueError(
          f"data.shards={d.shards}: train data source {k} has {len(pairs)} examples, none for "
          f"shard {shard}; allowed: at most as many shards as examples"
        )
      parts.append(mine.shuffle(seed=seed + k).repeat())
      rates.append(rate)
    mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights=rates)
    examples = mixed.map(lambda p: encode_pair(p, tokenizer, d.seq_len, tgt_len, counts))
    examples = examples.filter(lambda e: e is not None).to_iter_dataset()
    packed = _packed(examples, d.seq_len, tgt_len, bins=rows, seed=seed + 7919 * shard)
    batches = packed.batch(rows, drop_remainder=True)
    options = grain.experimental.DatasetOptions(filter_raise_threshold_ratio=1.0)
    return iter(grain.experimental.WithOptionsIterDataset(batches, options))

  return pipeline.process_batches(shard_batches, d.shards, batch_size, process_index, process_count)


def eval_pairs(config: ml_collections.ConfigDict) -> list[TextPairs]:
  """The evaluation split's sources: `data.eval_name` (all of it), else every mixture
  source's (or data.name's) validation split."""
  if config.data.eval_name:
    return [TextPairs(config, config.data.eval_name, "all")]
  return [TextPairs(config, name, "validation") for name, _ in parse_mixture(config)]


def seq2seq_eval_batches(
  config: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  pair_sets: list[Sequence] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Every evaluation example once, in order, packed like training; the last batch padded.
  `pair_sets`: the evaluation's text pairs in place of the config's."""
  pipeline.check_process(process_index, process_count)
  d = config.data
  tgt_len = target_len(config)
  counts = Counts("seq2seq evaluation data", d.seq_len, tgt_len)
  sets = [grain.MapDataset.source(p) for p in pair_sets or eval_pairs(config)]
  data = sets[0] if len(sets) == 1 else grain.MapDataset.concatenate(sets)
  examples = data.map(lambda p: encode_pair(p, tokenizer, d.seq_len, tgt_len, counts))
  examples = examples.filter(lambda e: e is not None).to_iter_dataset()
  rows = _packed(examples, d.seq_len, tgt_len, bins=1, seed=0)
  yield from pipeline.batch_eval_rows(rows, batch_size, max_batches, process_index, process_count)
  counts.log()


def source_label(name: str) -> str:
  """A short name for a source in metric keys: a JSONL glob's file stem, else the name."""
  if name.startswith("jsonl:"):
    return os.path.splitext(os.path.basename(name.partition(":")[2]))[0] or name
  return name


def decode_sources(
  config: ml_collections.ConfigDict,
  tokenizer: Tokenizer,
  limit: int,
  pair_sets: list[Sequence] | None = None,
) -> list[tuple[str, list[np.ndarray], list[str], list[str]]]:
  """Per evaluation source: (label, encoder ids, input texts, reference texts) of its first
  `limit` examples (0: all) with non-empty targets, for metrics on decoded text.
  `pair_sets`: one set of text pairs in place of the config's sources."""
  d = config.data
  tgt_len = target_len(config)
  counts = Counts("seq2seq decoded examples", d.seq_len, tgt_len)
  if pair_sets is not None:
    names, sets = [d.eval_name or d.name], pair_sets
  else:
    names = [d.eval_name] if d.eval_name else [name for name, _ in parse_mixture(config)]
    sets = eval_pairs(config)
  out = []
  for name, pairs in zip(names, sets, strict=True):
    ids, inputs, refs = [], [], []
    for i in range(len(pairs)):
      if limit and len(ids) >= limit:
        break
      pair = pairs[i]
      enc = encode_pair(pair, tokenizer, d.seq_len, tgt_len, counts)
      if enc is not None:
        ids.append(enc["inputs"])
        inputs.append(pair[0])
        refs.append(pair[1])
    if not ids:
      raise ValueError(f"{name!r}: the evaluation split has no example with a non-empty target")
    out.append((source_label(name), ids, inputs, refs))
  if counts.empty or counts.long_inputs:
    counts.log(logging.warning)
  return out


def decode_examples(
  config: ml_collections.ConfigDict, tokenizer: Tokenizer, limit: int
) -> tuple[list[np.ndarray], list[str], list[str]]:
  """(encoder ids, input text, reference text) of every source's first `limit` evaluation
  examples (0: all) with non-empty targets, sources in order."""
  ids, inputs, refs = [], [], []
  for _, i, x, r in decode_sources(config, tokenizer, limit):
    ids, inputs, refs = ids + i, inputs + x, refs + r
  return ids, inputs, refs
