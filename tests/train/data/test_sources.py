"""Sources: local text/JSONL splits, errors, TFDS names (mocked), the pystdlib builder."""

from __future__ import annotations

import collections
import json
import pathlib

import pytest
import tensorflow_datasets as tfds

from configs import base
from train.data import pystdlib, sources


def _cfg(**overrides):
  cfg = base.get_config().data
  cfg.update(overrides)
  return cfg


def _as_bytes(doc) -> bytes:
  return doc.encode("utf-8") if isinstance(doc, str) else doc


def _write_texts(root: pathlib.Path, contents: dict[str, bytes]) -> str:
  for name, data in contents.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
  return f"text:{root}/**/*.txt"


def test_text_split_cuts_the_concatenation_at_90_percent(tmp_path):
  contents = {
    "b.txt": b"B" * 37,
    "a.txt": b"A" * 50 + b"\xff",  # raw bytes, not valid UTF-8
    "sub/c.txt": b"C" * 55,
    "d.txt": b"",  # empty files are no documents
  }
  name = _write_texts(tmp_path, contents)
  ordered = [contents[k] for k in ("a.txt", "b.txt", "sub/c.txt")]  # sorted by path
  whole = b"".join(ordered)  # 143 bytes: validation is the last 14
  train = list(sources.load_documents(name, "train", _cfg()))
  validation = list(sources.load_documents(name, "validation", _cfg()))
  assert b"".join(train) + b"".join(validation) == whole
  assert b"".join(validation) == whole[-(len(whole) // 10) :]
  # The file straddling the cut is split into two documents.
  assert train == [ordered[0], ordered[1], b"C" * 41]
  assert validation == [b"C" * 14]
  assert list(sources.load_documents(name, "all", _cfg())) == ordered


def test_text_cut_on_a_file_boundary_makes_no_empty_document(tmp_path):
  name = _write_texts(tmp_path, {"a.txt": b"a" * 90, "b.txt": b"b" * 10})
  assert list(sources.load_documents(name, "train", _cfg())) == [b"a" * 90]
  assert list(sources.load_documents(name, "validation", _cfg())) == [b"b" * 10]


def _write_jsonl(path: pathlib.Path, records: list) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_jsonl_holds_out_last_10_percent_of_records(tmp_path):
  records = [{"body": f"record {i}", "id": i} for i in range(25)]
  records[3]["body"] = ""  # empty text: counted, then dropped
  _write_jsonl(tmp_path / "a.jsonl", records[:12])
  (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[12:]) + "\n\n")
  name = f"jsonl:{tmp_path}/*.jsonl"
  cfg = _cfg(text_field="body")
  train = list(sources.load_documents(name, "train", cfg))
  validation = list(sources.load_documents(name, "validation", cfg))
  expected = [r["body"] for r in records]
  assert train == [t for t in expected[:23] if t]  # 25 records: the last 2 are held out
  assert validation == expected[23:]
  assert list(sources.load_documents(name, "all", cfg)) == [t for t in expected if t]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"text": "fine"}\n{"text": oops}\n')
  with pytest.raises(ValueError, match=rf"data\.name=.*{path}:2: not valid JSON"):
    sources.load_documents(f"jsonl:{path}", "train", _cfg())


def test_jsonl_missing_field_names_file_line_and_key(tmp_path):
  path = tmp_path / "x.jsonl"
  _write_jsonl(path, [{"text": "a"}, {"text": "b"}, {"content": "c"}])
  with pytest.raises(ValueError, match=rf"{path}:3: no string field 'text'.*data\.text_field"):
    sources.load_documents(f"jsonl:{path}", "train", _cfg())


def test_empty_corpus_is_an_error(tmp_path):
  name = _write_texts(tmp_path, {"a.txt": b"", "b.txt": b""})
  with pytest.raises(ValueError, match=r"data\.name=.*no non-empty document"):
    sources.load_documents(name, "train", _cfg())
  with pytest.raises(ValueError, match=r"data\.eval_name=.*no non-empty document"):
    sources.load_documents(name, "all", _cfg())


def test_all_empty_jsonl_texts_are_an_error(tmp_path):
  _write_jsonl(tmp_path / "a.jsonl", [{"text": ""}] * 30)
  with pytest.raises(ValueError, match=r"data\.name=.*'train' split has no non-empty"):
    sources.load_documents(f"jsonl:{tmp_path}/a.jsonl", "train", _cfg())


def test_too_small_for_validation_is_an_error(tmp_path):
  name = _write_texts(tmp_path, {"a.txt": b"tiny"})  # 10% of 4 bytes is nothing
  assert list(sources.load_documents(name, "train", _cfg())) == [b"tiny"]
  with pytest.raises(ValueError, match=r"'validation' split has no non-empty.*last 10%"):
    sources.load_documents(name, "validation", _cfg())


def test_unknown_name_lists_what_is_allowed():
  with pytest.raises(ValueError) as err:
    sources.validate_source("no_such_dataset_xyz")
  message = str(err.value)
  assert "data.name='no_such_dataset_xyz'" in message
  for allowed in ("pystdlib", "text:<glob>", "jsonl:<glob>", "TFDS"):
    assert allowed in message
  with pytest.raises(ValueError, match=r"data\.eval_name='nope'"):
    sources.validate_source("nope", key="data.eval_name")


@pytest.mark.parametrize("prefix", ["text", "jsonl"])
def test_glob_matching_nothing_is_an_error(tmp_path, prefix):
  with pytest.raises(ValueError, match=rf"data\.eval_name='{prefix}:.*matches no file"):
    sources.validate_source(f"{prefix}:{tmp_path}/*.none", key="data.eval_name")


@pytest.mark.parametrize("name", ["pystdlib", "lm1b", "tiny_shakespeare", "c4/en", "c4/en:3.1.0"])
def test_known_names_validate(name):
  sources.validate_source(name)  # c4 is only found through the per-package import


def test_unknown_tfds_config_is_an_error():
  with pytest.raises(ValueError, match=r"data\.name='c4/klingon'.*no config 'klingon'"):
    sources.validate_source("c4/klingon")


def test_bad_split_is_an_error(tmp_path):
  name = _write_texts(tmp_path, {"a.txt": b"x" * 100})
  with pytest.raises(ValueError, match="split='test'"):
    sources.load_documents(name, "test", _cfg())


@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_tfds_documents_are_the_text_field(name):
  with tfds.testing.mock_data(num_examples=7):
    docs = sources.load_documents(name, "validation", _cfg())  # lm1b: falls back to test
    assert len(docs) == 7
    assert all(isinstance(docs[i], str | bytes) and docs[i] for i in range(7))


def test_tfds_wrong_text_field_is_an_error():
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(ValueError, match=r"data\.text_field='body'.*allowed: \['text'\]"):
      sources.load_documents("lm1b", "train", _cfg(text_field="body"))


def test_pystdlib_files_and_split_are_deterministic():
  files = pystdlib.list_files(pystdlib.stdlib_dir())
  assert files == sorted(files) and len(files) > 100
  assert all(f.endswith(".py") for f in files)
  assert not any("site-packages" in f or "dist-packages" in f for f in files)
  assert "json/decoder.py" in files
  splits = [pystdlib.split_of(f) for f in files]
  assert splits == [pystdlib.split_of(f) for f in files]
  counts = collections.Counter(splits)
  assert set(counts) == {"train", "validation"}
  assert 0.05 < counts["validation"] / len(files) < 0.15


@pytest.fixture(scope="module")
def pystdlib_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp("tfds"))  # the full build takes about a second


def test_pystdlib_builds_disjoint_splits_of_every_file(pystdlib_dir):
  cfg = _cfg(tfds_data_dir=pystdlib_dir)
  train = sources.load_documents("pystdlib", "train", cfg)
  validation = sources.load_documents("pystdlib", "validation", cfg)
  assert len(sources.load_documents("pystdlib", "all", cfg)) == len(validation)

  def paths(split: str) -> set[str]:
    ds = tfds.data_source(f"pystdlib/py{pystdlib.PY_VERSION}", split=split, data_dir=pystdlib_dir)
    return {ds[i]["path"].decode() for i in range(len(ds))}

  files = pystdlib.list_files(pystdlib.stdlib_dir())
  train_paths, validation_paths = paths("train"), paths("validation")
  assert train_paths | validation_paths == set(files)
  assert not train_paths & validation_paths
  assert all(pystdlib.split_of(p) == "validation" for p in validation_paths)
  assert (len(train), len(validation)) == (len(train_paths), len(validation_paths))
  root = pystdlib.stdlib_dir()
  some = {_as_bytes(validation[i]) for i in range(len(validation))}
  for p in sorted(validation_paths)[:5]:
    assert (root / p).read_bytes().decode("utf-8", errors="replace").encode() in some


class PystdlibTrainTest(pystdlib.Pystdlib):
  """A few stdlib files as `train` and `test` splits only, like lm1b."""

  def _split_generators(self, dl_manager):
    root = pystdlib.stdlib_dir()
    files = pystdlib.list_files(root)[:6]
    return {
      "train": self._generate_examples(root, files[:4]),
      "test": self._generate_examples(root, files[4:]),
    }


def test_tfds_validation_falls_back_to_test(tmp_path):
  cfg = _cfg(tfds_data_dir=str(tmp_path))
  assert len(sources.load_documents("pystdlib_train_test", "train", cfg)) == 4
  assert len(sources.load_documents("pystdlib_train_test", "validation", cfg)) == 2
  assert len(sources.load_documents("pystdlib_train_test", "all", cfg)) == 2


SEP = b"<|endoftext|>"  # 13 bytes


def _joined(pieces) -> list[tuple[bytes, bool, bool]]:
  """(bytes, opens, closes) of each run of pieces: a piece that does not open continues the
  one before (the first may not open), which must not have closed."""
  runs = []
  for p in pieces:
    opens, closes = getattr(p, "opens", True), getattr(p, "closes", True)
    if opens or not runs:  # a split may start inside a document
      runs.append([bytes(p), opens, closes])
    else:
      assert runs and not runs[-1][2], "a piece continues a document that closed"
      runs[-1][0] += p
      runs[-1][2] = closes
  return [tuple(r) for r in runs]


def _python_split(files: list[bytes], lo: int, hi: int) -> list[tuple[bytes, bool, bool]]:
  """The reference: each file's bytes.split(SEP), empty documents dropped, clipped to bytes
  [lo, hi) of the files' concatenation (a document the cut splits is two): (bytes, True,
  True)."""
  out, at = [], 0
  for data in files:
    for doc in data.split(SEP):
      start, stop = max(at, lo), min(at + len(doc), hi)
      if stop > start:
        out.append((doc[start - at : stop - at], True, True))
      at += len(doc) + len(SEP)
    at -= len(SEP)
  return out


def _separated_corpus(tmp_path: pathlib.Path) -> tuple[str, list[bytes]]:
  """Two files: a separator first and two in a row (empty documents), documents of exactly
  16 and 64 bytes (a piece ends where the separator starts) and of 17 and 65 (one byte
  over), multi-byte characters, lines, 300 bytes of 2-byte characters without a newline."""
  a = SEP.join(
    [
      b"",
      b"x" * 16,
      b"y" * 17,
      "é\n".join(["ab", "ç" * 7, "d"]).encode() + b"z" * 41,
      b"w" * 65,
      b"\n".join(b"line %d" % i for i in range(40)),
      b"",
      "ü".encode() * 150,
      b"",
    ]
  )
  b = SEP.join([b"tail document\n" * 12, b"last"])
  assert {16, 17, 64, 65, 300} <= set(map(len, a.split(SEP)))
  return _write_texts(tmp_path, {"a.txt": a, "b.txt": b}), [a, b]


@pytest.mark.parametrize("scan", [5, 13, 1 << 24])
@pytest.mark.parametrize("span", [16, 64, 1 << 16])
def test_doc_separator_and_spans_match_a_python_split(tmp_path, monkeypatch, scan, span):
  """Documents between separators (Python's bytes.split, empty ones dropped), read in pieces
  of at most `span` bytes that join back into them; train and validation cut at 90% of the
  bytes. Files are scanned in `scan`-byte chunks: separators straddle chunk boundaries (5)
  or start on them (13)."""
  monkeypatch.setattr(sources, "_SCAN_BYTES", scan)
  sources._separated.cache_clear()
  name, files = _separated_corpus(tmp_path)
  cfg = _cfg(doc_separator=SEP.decode(), span_bytes=span)
  total = sum(map(len, files))
  cut = total - total // 10
  for split, (lo, hi) in {"all": (0, total), "train": (0, cut), "validation": (cut, total)}.items():
    pieces = list(sources.load_documents(name, split, cfg))
    assert _joined(pieces) == _python_split(files, lo, hi), split
    assert all(0 < len(p) <= span for p in pieces)
    for p in pieces[:-1]:  # cut after a newline when one is near, never inside a character
      if not getattr(p, "closes", True) and b"\n" in p[-min(1024, span // 2) :]:
        assert p.endswith(b"\n"), p
    assert all(p.decode("utf-8") for p in pieces[1:-1])
  pieces = list(sources.load_documents(name, "all", cfg))
  assert len(pieces) > len(_python_split(files, 0, total)) or span == 1 << 16


def test_no_separator_is_a_document_per_file_in_pieces(tmp_path):
  """Without data.doc_separator a file is one document (the separator string is plain text),
  read in pieces of data.span_bytes."""
  name, files = _separated_corpus(tmp_path)
  pieces = list(sources.load_documents(name, "all", _cfg(span_bytes=100)))
  assert _joined(pieces) == [(f, True, True) for f in files]
  assert max(map(len, pieces)) <= 100 and len(pieces) >= sum(map(len, files)) // 100
