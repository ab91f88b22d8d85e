"""Tests of the tokenizer, the embedded corpus and the grain input pipelines (train/)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from train.data import corpus, pipeline
from train.data import text as text_lib
from train.data import tokenizer as tokenizer_lib

VOCAB = 512


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
  """A small tokenizer trained once per session on a subset of the embedded corpus."""
  docs = corpus.split_documents(corpus.embedded_documents(), "train")[:150]
  path = tmp_path_factory.mktemp("tok") / "test.model"
  return tokenizer_lib.train_tokenizer(docs, VOCAB, path, max_chars=1_000_000)


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("embedded-cache"))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    np.testing.assert_array_equal(x["targets"], y["targets"])


def _check_batch(batch, batch_size, seq_len, vocab):
  assert set(batch) == {"inputs", "targets"}
  for v in batch.values():
    assert isinstance(v, np.ndarray)
    assert v.shape == (batch_size, seq_len) and v.dtype == np.int32
    assert v.min() >= 0 and v.max() < vocab
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


# -- corpus ----------------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_and_split():
  names = [n for n, _ in corpus.embedded_corpus()]
  assert any(n.startswith("pydoc:") for n in names) and any(n.startswith("stdlib:") for n in names)
  assert not any("site-packages" in n or "/test" in n or n.startswith("stdlib:test") for n in names)
  docs = corpus.embedded_documents()
  assert docs == corpus.embedded_documents() and len(docs) == len(names)
  train, ev = corpus.split_documents(docs, "train"), corpus.split_documents(docs, "eval")
  assert len(train) + len(ev) == len(docs) and ev and train
  assert not set(train) & set(ev)
  assert 0.01 < len(ev) / len(docs) < 0.15
  with pytest.raises(ValueError, match="split"):
    corpus.split_documents(docs, "test")


# -- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_ids(tok):
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  text = "def f(x):\n    return x  +  1\n\n\tüñï€ 😀 \x00 end  \r\n"
  ids = tok.encode(text)
  assert all(isinstance(i, int) and 0 <= i < VOCAB for i in ids)
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, "abc"]) == [ids, tok.encode("abc")]


def test_tokenizer_load_round_trip(tok):
  loaded = tokenizer_lib.load_tokenizer(tok.model_path)
  assert loaded.vocab_size == tok.vocab_size
  assert loaded.encode("import os\nprint(os.sep)") == tok.encode("import os\nprint(os.sep)")
  assert loaded.model_path == tok.model_path


def test_tokenizer_errors(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.load_tokenizer(missing)
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"this is not a sentencepiece model")
  with pytest.raises(ValueError, match="garbage.model"):
    tokenizer_lib.load_tokenizer(garbage)
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(["some text"], 100, tmp_path / "small.model")
  with pytest.raises(ValueError, match="empty"):
    tokenizer_lib.train_tokenizer(["", "   "], 300, tmp_path / "empty.model")


def test_default_tokenizer_trains_once_and_caches(tmp_path, caplog):
  """Trained on first use, saying so (the ~10 s it takes are no silence), then loaded quietly."""
  with caplog.at_level(logging.INFO, logger="train"):
    first = tokenizer_lib.default_tokenizer(tmp_path, vocab_size=VOCAB)
  assert [r.getMessage() for r in caplog.records] == [
      f"training the default tokenizer (vocab {VOCAB}) on the embedded corpus: once, about 10 s; "
      f"cached as {first.model_path}"]
  assert os.path.isfile(first.model_path) and first.vocab_size == VOCAB
  assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first.model_path)]
  mtime = os.stat(first.model_path).st_mtime_ns
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="train"):
    second = tokenizer_lib.default_tokenizer(tmp_path, vocab_size=VOCAB)
  assert not caplog.records
  assert second.model_path == first.model_path
  assert os.stat(first.model_path).st_mtime_ns == mtime
  assert second.encode("class A:\n  pass") == first.encode("class A:\n  pass")


# -- embedded corpus pipeline ----------------------------------------------------------------------


def test_embedded_batches(tok, embedded_cache):
  ds = pipeline.make_dataset("embedded", tok, seq_len=64, batch_size=4, cache_dir=embedded_cache)
  for b in _take(iter(ds), 3):
    _check_batch(b, 4, 64, VOCAB)
  assert any(name.startswith("tokens-") for name in os.listdir(embedded_cache))
  ev = pipeline.make_dataset("embedded", tok, seq_len=64, batch_size=4, split="eval",
                         cache_dir=embedded_cache, num_epochs=1)
  eval_batches = list(ev)
  assert eval_batches
  _check_batch(eval_batches[0], 4, 64, VOCAB)
  # eval is not shuffled: two passes agree
  _assert_batches_equal(eval_batches, list(ev))


def test_embedded_determinism_and_resume(tok, embedded_cache):
  def make(seed):
    return pipeline.make_dataset("embedded", tok, seq_len=32, batch_size=3, seed=seed,
                             cache_dir=embedded_cache)

  _assert_batches_equal(_take(iter(make(7)), 4), _take(iter(make(7)), 4))
  assert not np.array_equal(next(iter(make(7)))["inputs"], next(iter(make(8)))["inputs"])
  it = iter(make(7))
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # as stored next to a checkpoint
  expected = _take(it, 4)
  resumed = iter(make(7))
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 4))


# -- token-window datasets: sharding, epochs -------------------------------------------------------


def _first_tokens(ds):
  return [int(x) for b in ds for x in b["inputs"][:, 0]]


def test_process_shards_are_disjoint_and_stack_into_the_single_process_batches():
  """Process i of P gets rows [i*B, (i+1)*B) of every global batch of one shared shuffle: the
  processes' windows are disjoint and, stacked in process order, are the batches of one process
  reading with batch P*B (also across the epoch boundary)."""
  seq_len, n_tokens = 8, 8 * 40 + 1  # 40 windows, each identified by its first token
  tokens = np.arange(n_tokens, dtype=np.int64)
  all_starts = set(text_lib.window_starts(n_tokens, seq_len).tolist())
  assert len(all_starts) == 40
  for count in (2, 3):
    per_process = 2
    single = text_lib.make_token_dataset(tokens, seq_len=seq_len, batch_size=count * per_process,
                                     seed=3, num_epochs=2)
    single = [b["inputs"][:, 0].tolist() for b in single]
    seen = []
    for index in range(count):
      ds = text_lib.make_token_dataset(tokens, seq_len=seq_len, batch_size=per_process, seed=3,
                                   process_index=index, process_count=count, num_epochs=2)
      seen.append([b["inputs"][:, 0].tolist() for b in ds])
    assert [len(s) for s in seen] == [len(single)] * count == [80 // (count * per_process)] * count
    for k, want in enumerate(single):
      assert [x for s in seen for x in s[k]] == want
    first_epoch = [{x for b in s[:40 // (count * per_process)] for x in b} for s in seen]
    for i in range(count):
      for j in range(i + 1, count):
        assert not first_epoch[i] & first_epoch[j]
    assert set().union(*first_epoch) <= all_starts


def test_windows_are_shuffled_per_epoch_and_targets_shifted():
  tokens = np.arange(8 * 30 + 1, dtype=np.int64)
  ds = text_lib.make_token_dataset(tokens, seq_len=8, batch_size=5, seed=0, num_epochs=2)
  batches = list(ds)
  first = [int(x) for b in batches for x in b["inputs"][:, 0]]
  assert len(first) == 60
  epoch1, epoch2 = first[:30], first[30:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(0, 240, 8))
  assert epoch1 != epoch2 and epoch1 != sorted(epoch1)
  for b in batches:
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
  unshuffled = text_lib.make_token_dataset(tokens, seq_len=8, batch_size=5, shuffle=False,
                                           num_epochs=1)
  assert _first_tokens(unshuffled) == list(range(0, 240, 8))


def test_token_dataset_errors():
  tokens = np.arange(20)
  with pytest.raises(ValueError, match="process_index"):
    text_lib.make_token_dataset(tokens, seq_len=4, batch_size=1, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    text_lib.make_token_dataset(tokens, seq_len=4, batch_size=100, num_epochs=1)
  with pytest.raises(ValueError, match="seq_len"):
    text_lib.make_token_dataset(tokens, seq_len=0, batch_size=1)
  with pytest.raises(ValueError, match="process_count"):
    text_lib.make_token_dataset(tokens, seq_len=8, batch_size=1, process_count=0)
  with pytest.raises(ValueError, match=r"global batch \(batch_size x process_count = 4\)"):
    text_lib.make_token_dataset(tokens, seq_len=8, batch_size=1, process_count=4, num_epochs=1)
  with pytest.raises(ValueError, match="no window"):
    text_lib.make_token_dataset(tokens, seq_len=20, batch_size=1)


def test_parse_spec():
  assert pipeline.parse_spec("embedded") == ("embedded", "")
  assert pipeline.parse_spec("text:/a/*.txt") == ("text", "/a/*.txt")
  assert pipeline.parse_spec("tfds:c4/en:3.1.0") == ("tfds", "c4/en:3.1.0")
  for bad in ("", "c4", "text:", "hf:c4"):
    with pytest.raises(ValueError, match="--data"):
      pipeline.parse_spec(bad)


# -- local text files ------------------------------------------------------------------------------


def _write_text_corpus(root):
  docs = corpus.embedded_documents()[:60]
  for i, d in enumerate(docs):
    (root / f"doc{i:03d}.txt").write_text(d, encoding="utf-8")
  (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 50)
  (root / "empty.txt").write_bytes(b"")
  (root / "other.md").write_text("not matched by the glob")


def test_local_text_path(tok, tmp_path):
  _write_text_corpus(tmp_path)
  spec = f"text:{tmp_path}/*.txt"
  with pytest.warns(UserWarning, match=r"1 of 62 files were not valid UTF-8"):
    ds = pipeline.make_dataset(spec, tok, seq_len=48, batch_size=4, seed=1)
  it = iter(ds)
  for b in _take(it, 3):
    _check_batch(b, 4, 48, VOCAB)
  state = it.get_state()
  expected = _take(it, 3)
  with pytest.warns(UserWarning):
    again = iter(pipeline.make_dataset(spec, tok, seq_len=48, batch_size=4, seed=1))
  again.set_state(state)
  _assert_batches_equal(expected, _take(again, 3))
  # a directory spec works too, and eval holds other windows than train
  with pytest.warns(UserWarning):
    ev = list(pipeline.make_dataset(f"text:{tmp_path}", tok, seq_len=48, batch_size=2, split="eval",
                                num_epochs=1))
  assert ev
  _check_batch(ev[0], 2, 48, VOCAB)


def test_local_text_process_sharding(tok, tmp_path):
  _write_text_corpus(tmp_path)
  spec = f"text:{tmp_path}/doc*.txt"
  rows = []
  for index in range(2):
    ds = pipeline.make_dataset(spec, tok, seq_len=32, batch_size=2, process_index=index,
                           process_count=2, num_epochs=1)
    rows.append([tuple(r) for b in ds for r in b["inputs"]])
  assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])
  single = pipeline.make_dataset(spec, tok, seq_len=32, batch_size=4, num_epochs=1)
  single = [tuple(r) for b in single for r in b["inputs"]]
  assert single == [r for k in range(len(rows[0]) // 2)
                    for r in rows[0][2 * k:2 * k + 2] + rows[1][2 * k:2 * k + 2]]


def test_single_file_falls_back_to_window_split(tok, tmp_path):
  (tmp_path / "one.txt").write_text(corpus.embedded_documents()[5] * 3)
  train = list(pipeline.make_dataset(f"text:{tmp_path}/one.txt", tok, seq_len=16, batch_size=1,
                                 num_epochs=1, shuffle=False))
  ev = list(pipeline.make_dataset(f"text:{tmp_path}/one.txt", tok, seq_len=16, batch_size=1,
                              split="eval", num_epochs=1))
  assert train and ev
  assert len(ev) < len(train)


def test_local_text_errors(tok, tmp_path):
  with pytest.raises(ValueError, match="no files match"):
    pipeline.make_dataset(f"text:{tmp_path}/*.txt", tok, seq_len=8, batch_size=1)
  (tmp_path / "a.txt").write_text("")
  (tmp_path / "b.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty corpus"):
    pipeline.make_dataset(f"text:{tmp_path}/*.txt", tok, seq_len=8, batch_size=1)
  (tmp_path / "c.txt").write_text("tiny")
  with pytest.raises(ValueError, match="seq_len"):
    pipeline.make_dataset(f"text:{tmp_path}/*.txt", tok, seq_len=512, batch_size=1)
  with pytest.raises(ValueError, match="split"):
    pipeline.make_dataset(f"text:{tmp_path}/*.txt", tok, seq_len=2, batch_size=1, split="test")


# -- tfds (C4 through tensorflow-datasets' mock) ---------------------------------------------------


@pytest.fixture
def mock_c4(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  import tensorflow_datasets.text.c4  # noqa: F401  (registers the builder the mock generates from)
  with tfds.testing.mock_data(num_examples=64):
    yield str(tmp_path)


def test_tfds_c4_batches_and_resume(tok, mock_c4):
  def make(**kw):
    return pipeline.make_dataset("tfds:c4/en:3.1.0", tok, seq_len=24, batch_size=3,
                             tfds_data_dir=mock_c4, read_threads=2, **kw)

  it = iter(make(seed=4))
  for b in _take(it, 4):
    _check_batch(b, 3, 24, VOCAB)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  resumed = iter(make(seed=4))
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 5))
  ev = list(make(split="eval", num_epochs=1))
  assert ev
  _check_batch(ev[0], 3, 24, VOCAB)


def test_tfds_process_shards_disjoint(tok, mock_c4):
  rows = []
  for index in range(2):
    ds = pipeline.make_dataset("tfds:c4/en:3.1.0", tok, seq_len=16, batch_size=1, num_epochs=1,
                           shuffle=False, process_index=index, process_count=2,
                           tfds_data_dir=mock_c4, read_threads=1)
    rows.append([tuple(b["inputs"][0]) for b in ds])
  assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])


def test_tfds_missing_data_dir(tok, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError, match="--tfds-data-dir"):
    pipeline.make_dataset("tfds:c4/en:3.1.0", tok, seq_len=8, batch_size=1,
                      tfds_data_dir=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="--tfds-data-dir"):  # exists but holds no prepared data
    pipeline.make_dataset("tfds:c4/en:3.1.0", tok, seq_len=8, batch_size=1,
                      tfds_data_dir=str(tmp_path))


def test_importing_the_pipeline_does_not_import_tfds_or_tensorflow():
  code = ("import sys, train.data.pipeline, train.data.tokenizer, train.data.corpus; "
          "assert 'tensorflow_datasets' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
