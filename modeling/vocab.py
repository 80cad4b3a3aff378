"""Special-token ids. fourfold's own tokenizers (bytes, train_spm's SentencePiece models)
share the ids 0..7 below, ordinary tokens starting at `NUM_SPECIAL`; an imported Hugging
Face tokenizer keeps its model's ids. Every tokenizer says which it uses in a `Specials`
(`FOURFOLD` for fourfold's own), and framing, objectives and decoding read the ids from it.
"""

from __future__ import annotations

import dataclasses

PAD_ID = 0  # padding; segment id 0 in packed batches
EOS_ID = 1  # appended to every document
BOS_ID = 2
MASK_ID = 3  # MLM and masked-diffusion mask
CLS_ID = 4
SEP_ID = 5
UNK_ID = 6
NUM_SPECIAL = 8  # ids 0..7 are reserved (7 is spare); ordinary tokens start here


@dataclasses.dataclass(frozen=True)
class Specials:
  """The special ids a tokenizer's model uses, and how its texts are framed.

  An id is None where the tokenizer has no such token (GPT-2 has no [MASK]); whatever
  needs it refuses the tokenizer by name. Padding is marked by segment ids, never by the
  id, so `pad` is only the filler value (0 where the tokenizer has no pad token).
  """

  pad: int = PAD_ID
  eos: int | None = EOS_ID  # ends a document, a source, a target
  bos: int | None = BOS_ID
  mask: int | None = MASK_ID  # MLM's [MASK]
  cls: int | None = CLS_ID  # an encoder's first token
  sep: int | None = SEP_ID  # ends an encoder's text (and each text of a pair)
  unk: int | None = UNK_ID
  decoder_start: int | None = BOS_ID  # an encoder-decoder's first decoder input (T5: pad)
  add_bos: bool = False  # documents and prompts start with `bos` (Llama)
  # generation stops at any of these (the model's eos ids; () means (eos,))
  stop: tuple[int, ...] = ()
  # [start, end) ranges of the special (non-text) ids, sorted: never masked by MLM, never
  # drawn as random tokens, not counted as text bytes
  special_ranges: tuple[tuple[int, int], ...] = ((0, NUM_SPECIAL),)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a generated sequence."""
    return self.stop or (() if self.eos is None else (self.eos,))

  def require(self, name: str, why: str) -> int:
    """The id `name` (e.g. 'mask'); a tokenizer without it is refused, saying `why`."""
    value = getattr(self, name)
    if value is None:
      raise ValueError(f"data.tokenizer has no {name} token, and {why} needs one")
    return value

  def is_special(self, ids):
    """Boolean array (NumPy in, NumPy out; jax in, jax out): which of `ids` are special."""
    out = None
    for lo, hi in self.special_ranges:
      hit = ids < hi if lo <= 0 else (ids >= lo) & (ids < hi)
      out = hit if out is None else out | hit
    return ids < 0 if out is None else out

  def num_ordinary(self, vocab_size: int) -> int:
    """How many ids below `vocab_size` are ordinary (text) tokens."""
    special = sum(max(0, min(hi, vocab_size) - lo) for lo, hi in self.special_ranges)
    return vocab_size - special

  def first_ordinary(self) -> int:
    """The smallest ordinary id."""
    first = 0
    for lo, hi in self.special_ranges:
      if lo > first:
        break
      first = max(first, hi)
    return first

  def nth_ordinary(self, index_N):
    """The `index_N`-th ordinary ids (0-based, any array shape): uniform indices in
    [0, num_ordinary) become uniform ordinary ids."""
    first = self.first_ordinary()
    ids_N = index_N + first
    for lo, hi in self.special_ranges:
      if lo > first:  # ranges are sorted and disjoint: skip each one passed
        ids_N = ids_N + (ids_N >= lo) * (hi - lo)
    return ids_N


def ranges_of(ids) -> tuple[tuple[int, int], ...]:
  """Sorted [start, end) ranges covering exactly the given ids."""
  out: list[list[int]] = []
  for i in sorted(set(int(x) for x in ids)):
    if out and out[-1][1] == i:
      out[-1][1] = i + 1
    else:
      out.append([i, i + 1])
  return tuple((lo, hi) for lo, hi in out)


FOURFOLD = Specials()  # the byte and fourfold SentencePiece tokenizers' ids
