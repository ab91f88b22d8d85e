"""Input pipelines (grain): fixed-length next-token batches from the embedded corpus, local text
files, JSON-lines files (``.jsonl``, ``.json.gz`` such as the C4 shards) or a tensorflow-datasets
dataset such as C4.

Every pipeline yields numpy batches ``{"inputs": int32[B, T], "targets": int32[B, T]}`` where B is
the per-process batch and ``targets`` are ``inputs`` shifted left by one (both cut from one window
of T + 1 tokens). The result of :func:`make_dataset` is a ``grain.IterDataset``; ``it = iter(ds)``
is a ``grain.DatasetIterator`` whose ``get_state()`` / ``set_state(state)`` resume it exactly.

Sequences:

* ``embedded`` and ``text:``: the documents of the split are tokenized once, joined into one token
  stream with EOS after each document, and cut into windows of T + 1 tokens starting every T tokens
  (packing; nothing is padded, the stream's last partial window is dropped). The windows are
  shuffled per epoch by ``seed`` into one global stream (the same on every process) that is cut
  into global batches of ``B * process_count`` windows; process i takes rows
  ``[i * B, (i + 1) * B)`` of every global batch. The processes' batches are therefore disjoint, and
  stacked in process order they are exactly the batches of a single process reading with batch
  ``B * process_count`` (a multi-process run sees the same data as a one-process run).
* ``jsonl:``: the same windows of the same kind of stream, but read file by file and line by line
  (never a whole file in memory) and shuffled by file order per epoch and within blocks of windows;
  every process reads the global stream and takes its rows, as above. The iterator state is the
  position in the files (see :class:`_JsonlStream`).
* ``tfds:``: each process takes every ``process_count``-th document, shuffles the documents per
  epoch, tokenizes them on the fly (EOS appended) and concatenates them into windows of T + 1
  tokens with grain's concat-then-split packer; the padded tail of a finite stream is dropped.
  (Packing happens per process, so the processes' shards are disjoint but a multi-process run
  reads the documents in a different order than a one-process run.)

Splits: ``"train"`` and ``"eval"``. For ``embedded``/``text:`` eval is the held-out documents (one
in 20 by content hash, see :mod:`train.corpus`; with too few documents to split, one window in 20
instead; ``jsonl:`` always splits by document); for ``tfds:`` it is the dataset's ``validation``
split (any other tfds split string is passed through). Eval is not shuffled.

Example::

  ds = make_dataset("embedded", tok, seq_len=256, batch_size=16)
  it = iter(ds)
  batch = next(it)
  state = it.get_state()   # store with the checkpoint; later: it.set_state(state)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from train import corpus
from train.config import parse_spec  # the one parser of the --data grammar (re-exported)
from train.tokenizer import Tokenizer

__all__ = [
    "jsonl_files",
    "make_dataset",
    "make_jsonl_dataset",
    "make_token_dataset",
    "parse_spec",
    "read_text_files",
    "seek",
    "tokenize_documents",
    "window_starts",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# documents -> token stream -> windows
# --------------------------------------------------------------------------------------------------


def read_text_files(pattern: str) -> list[str]:
  """Reads the files matching ``pattern`` (a glob, ``**`` allowed, or a directory) in sorted order.

  Files are decoded as UTF-8; files that are not valid UTF-8 are decoded with replacement characters
  and counted in one warning. Empty files are skipped.
  """
  if os.path.isdir(pattern):
    paths = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
             if os.path.isfile(p)]
  else:
    paths = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
             if os.path.isfile(p)]
  paths.sort()
  if not paths:
    raise ValueError(f"--data text:{pattern}: no files match")
  docs, bad = [], 0
  for p in paths:
    with open(p, "rb") as f:
      raw = f.read()
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      text = raw.decode("utf-8", errors="replace")
      bad += 1
    if text.strip():
      docs.append(text)
  if bad:
    warnings.warn(f"--data text:{pattern}: {bad} of {len(paths)} files were not valid UTF-8 and "
                  "were decoded with replacement characters", stacklevel=3)
  if not docs:
    raise ValueError(f"--data text:{pattern}: empty corpus ({len(paths)} files, all empty)")
  return docs


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def tokenize_documents(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  """One token stream: each document's ids followed by EOS (when the tokenizer has one)."""
  dtype = _token_dtype(tokenizer.vocab_size)
  eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
  parts = []
  step = 256  # encode in batches to bound the transient list-of-lists memory
  for i in range(0, len(documents), step):
    for ids in tokenizer.encode_batch(documents[i:i + step]):
      parts.append(np.asarray(ids + eos, dtype=dtype))
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def window_starts(num_tokens: int, seq_len: int) -> np.ndarray:
  """Starts of the windows ``tokens[s : s + seq_len + 1]``, every ``seq_len`` tokens."""
  if num_tokens < seq_len + 1:
    return np.zeros((0,), np.int64)
  return np.arange(0, num_tokens - seq_len, seq_len, dtype=np.int64)


def _tokenizer_digest(tokenizer: Tokenizer) -> str:
  return hashlib.sha1(tokenizer.serialized_model()).hexdigest()


def _cached_tokens(documents: Sequence[str], tokenizer: Tokenizer,
                   cache_dir: str | None) -> np.ndarray:
  """:func:`tokenize_documents`, memoised as ``cache_dir/tokens-<hash>.npy`` when a dir is given."""
  if not cache_dir:
    return tokenize_documents(documents, tokenizer)
  key = hashlib.sha1((_tokenizer_digest(tokenizer) + corpus.corpus_fingerprint(documents)).encode()
                     ).hexdigest()[:20]
  path = os.path.join(cache_dir, f"tokens-{key}.npy")
  if os.path.isfile(path):
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
      log.warning("ignoring unreadable token cache %s", path)
  tokens = tokenize_documents(documents, tokenizer)
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-tokens-", suffix=".npy", dir=cache_dir)
    with os.fdopen(fd, "wb") as f:
      np.save(f, tokens, allow_pickle=False)
    os.replace(tmp, path)
  except OSError as e:  # a read-only cache dir is not an error
    log.warning("could not write token cache %s: %s", path, e)
  return tokens


def _split_stream(documents: Sequence[str], tokenizer: Tokenizer, split: str, seq_len: int,
                  cache_dir: str | None, what: str) -> tuple[np.ndarray, np.ndarray]:
  """(token stream, window starts) of ``split``: held-out documents, or held-out windows when the
  corpus has too few documents for a document-level split."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval' for --data {what}, got {split!r}")
  chosen = corpus.split_documents(documents, split)
  other = corpus.split_documents(documents, "eval" if split == "train" else "train")
  if chosen and other:
    tokens = _cached_tokens(chosen, tokenizer, cache_dir)
    starts = window_starts(len(tokens), seq_len)
  else:  # all documents landed on one side: hold out every HOLDOUT_EVERY-th window instead
    tokens = _cached_tokens(documents, tokenizer, cache_dir)
    starts = window_starts(len(tokens), seq_len)
    heldout = np.arange(len(starts)) % corpus.HOLDOUT_EVERY == 0
    starts = starts[heldout] if split == "eval" else starts[~heldout]
  if len(starts) == 0:
    raise ValueError(f"--data {what}: the {split} split has {len(tokens)} tokens, fewer than "
                     f"seq_len + 1 = {seq_len + 1}; use more text or a shorter --seq-len")
  return tokens, starts


class _Window(grain.transforms.Map):
  """window start -> {"inputs": tokens[s:s+T], "targets": tokens[s+1:s+T+1]} (int32)."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self.tokens = tokens
    self.seq_len = seq_len

  def map(self, start):
    w = self.tokens[int(start):int(start) + self.seq_len + 1].astype(np.int32)
    return {"inputs": w[:-1], "targets": w[1:]}


def _check_common(seq_len: int, batch_size: int, process_index: int, process_count: int,
                  num_epochs: int | None) -> None:
  for name, v in (("seq_len", seq_len), ("batch_size", batch_size),
                  ("process_count", process_count)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}), "
                     f"got {process_index!r}")
  if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
    raise ValueError(f"num_epochs must be None (repeat forever) or a positive int, "
                     f"got {num_epochs!r}")


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of ``parent``.

  With ``b = batch_size`` rows per process and ``B = b * process_count`` per global batch, element
  ``n`` is the parent's element ``(n // b) * B + process_index * b + n % b``; a trailing partial
  global batch is dropped so that every process yields as many batches.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._rows = batch_size
    self._offset = process_index * batch_size
    self._global = batch_size * process_count

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._rows

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k, j = divmod(int(index), self._rows)
    return self._parent[k * self._global + self._offset + j]

  def __str__(self) -> str:
    return (f"_ProcessRows(rows={self._rows}, offset={self._offset}, "
            f"global_batch={self._global})")


def _shard(ds: grain.MapDataset, process_index: int, process_count: int,
           what: str) -> grain.MapDataset:
  """Every process_count-th element, from an equal-length prefix so all processes get as many."""
  n = len(ds) - len(ds) % process_count
  if n == 0:
    raise ValueError(f"{what}: {len(ds)} elements cannot be split over process_count="
                     f"{process_count} processes")
  return ds[:n][process_index::process_count]


def make_token_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int,
                       starts: np.ndarray | None = None, shuffle: bool = True, seed: int = 0,
                       process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of windows of a token stream (the ``embedded``/``text:`` pipeline).

  Args:
    tokens: 1-D token stream.
    seq_len: T; windows hold T + 1 tokens.
    batch_size: per-process batch B.
    starts: window starts (default :func:`window_starts`).
    shuffle: shuffle the windows, with a new permutation each epoch.
    seed: shuffle seed (the same on every process).
    process_index, process_count: this process takes rows ``[process_index * B,
      (process_index + 1) * B)`` of every global batch of ``B * process_count`` windows.
    num_epochs: passes over the windows; None repeats forever. Global batches may span epochs;
      a trailing partial global batch of a finite stream is dropped.
  """
  _check_common(seq_len, batch_size, process_index, process_count, num_epochs)
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
  starts = window_starts(len(tokens), seq_len) if starts is None else np.asarray(starts)
  if len(starts) and int(starts.max()) + seq_len + 1 > len(tokens):
    raise ValueError("a window start runs past the end of the token stream")
  if len(starts) == 0:
    raise ValueError(f"{len(tokens)} tokens hold no window of seq_len + 1 = {seq_len + 1} tokens")
  global_batch = batch_size * process_count
  ds = grain.MapDataset.source(starts)
  if num_epochs is not None and len(ds) * num_epochs < global_batch:
    what = "batch_size" if process_count == 1 else \
        f"the global batch (batch_size x process_count = {global_batch})"
    raise ValueError(f"{what}={global_batch} is larger than the {len(ds) * num_epochs} windows "
                     f"in num_epochs={num_epochs}")
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs)  # one global stream, identical on every process
  if process_count > 1:
    ds = _ProcessRows(ds, batch_size, process_index, process_count)
  ds = ds.map(_Window(tokens, seq_len)).batch(batch_size, drop_remainder=True)
  # The windows are slices of an in-memory array: read them on the calling thread.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it.windows_per_epoch = len(starts)  # for the trainer's `epochs` metric (global windows)
  return it


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets
# --------------------------------------------------------------------------------------------------


class _TextSource:
  """Random-access view of one string feature of a tfds data source (only len and getitem)."""

  def __init__(self, source: Any, feature: str):
    self._source = source
    self._feature = feature

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    value = self._source[int(index)][self._feature]
    if isinstance(value, np.ndarray):
      value = value.item()
    if isinstance(value, bytes):
      value = value.decode("utf-8", errors="replace")
    return value


class _TokenizeDoc(grain.transforms.Map):
  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def map(self, text):
    eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id >= 0 else []
    return {"tokens": np.asarray(self.tokenizer.encode(text) + eos, dtype=np.int32)}


class _Full(grain.transforms.Filter):
  """Drops the zero-padded last sequence of a finite packed stream."""

  def filter(self, element) -> bool:
    return bool(element["tokens_segment_ids"][-1] != 0)


class _Shift(grain.transforms.Map):
  def map(self, element):
    w = element["tokens"]
    return {"inputs": w[:-1], "targets": w[1:]}


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("--data tfds:... needs tensorflow-datasets and array-record: "
                      "pip install tensorflow-datasets array-record") from e
  if data_dir is not None and "://" not in str(data_dir) and not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--tfds-data-dir {data_dir} does not exist")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, AssertionError, ...)
    where = data_dir if data_dir is not None else "the default tfds data dir"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # not tfds' list of every name
    raise ValueError(
        f"could not open tfds dataset {name!r} split {split!r} in {where}: {first} Point "
        "--tfds-data-dir at a directory holding the prepared dataset in array_record format "
        "(e.g. a gs:// bucket on TPU)") from e


def _make_tfds_dataset(name: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       split: str, seed: int, shuffle: bool, process_index: int,
                       process_count: int, data_dir: str | None, num_epochs: int | None,
                       feature: str, read_threads: int) -> grain.IterDataset:
  tfds_split = {"train": "train", "eval": "validation"}.get(split, split)
  source = _TextSource(_tfds_source(name, tfds_split, data_dir), feature)
  if len(source) == 0:
    raise ValueError(f"tfds dataset {name!r} split {tfds_split!r} is empty")
  ds = _shard(grain.MapDataset.source(source), process_index, process_count,
              f"tfds:{name} split {tfds_split!r}")
  if shuffle:
    ds = ds.shuffle(seed=int(seed) % 2**32)
  ds = ds.repeat(num_epochs).map(_TokenizeDoc(tokenizer))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(4 * read_threads, 1)))
  it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
  it = it.filter(_Full()).map(_Shift())
  return it.batch(batch_size, drop_remainder=True)


# --------------------------------------------------------------------------------------------------
# JSON lines: .jsonl and .json.gz files (e.g. the c4-train.*.json.gz shards), streamed
# --------------------------------------------------------------------------------------------------

#: Windows per shuffle block of ``jsonl:`` training data (about 256k tokens at seq_len 256).
JSONL_SHUFFLE_WINDOWS = 1024
_JSONL_WARNED: set[str] = set()  # the specs whose first malformed line was logged (any split)


def jsonl_files(pattern: str) -> list[str]:
  """The files of ``--data jsonl:PATTERN`` (a glob, ``**`` allowed, or a directory), sorted."""
  if os.path.isdir(pattern):
    paths = [p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
             if os.path.isfile(p) and p.endswith((".jsonl", ".json", ".json.gz", ".jsonl.gz"))]
  else:
    paths = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
             if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"--data jsonl:{pattern}: no files match")
  return sorted(paths)


def _open_binary(path: str):
  """The file's bytes, gunzipped when it is gzip (by its magic number, whatever its name)."""
  import gzip

  with open(path, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  return gzip.open(path, "rb") if gz else open(path, "rb")


class _JsonlStream:
  """The stream of windows of ``seq_len + 1`` tokens of a ``jsonl:`` split, read block by block.

  Position (JSON-able): ``epoch``, ``file`` (index into the epoch's file order), ``line`` (lines
  of that file already read), ``good`` (readable lines of that file so far), ``carry`` (tokens
  after the last window, fewer than seq_len + 1), ``windows`` (windows so far this epoch). Each
  epoch reads the files in an order shuffled by (seed, epoch); documents are tokenized with EOS
  appended, concatenated and cut into windows every ``seq_len`` tokens, as for ``text:`` data; a
  block ends at the first document boundary after ``block_windows`` windows (or at the epoch's
  end, where the partial window is dropped), so a position only ever points between documents.
  """

  def __init__(self, files: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, split: str,
               seed: int, shuffle: bool, field: str, num_epochs: int | None,
               block_windows: int, what: str):
    self.files, self.tokenizer, self.seq_len = list(files), tokenizer, seq_len
    self.split, self.seed, self.shuffle, self.field = split, seed, shuffle, field
    self.num_epochs, self.block_windows, self.what = num_epochs, block_windows, what
    self.malformed = 0  # malformed lines seen by this stream (warned about once)
    # the current file's first malformed line (path, line number, reason) until the file shows a
    # readable line: a file without one is one error naming it, not a warning plus an error
    self._pending: tuple[str, int, str] | None = None
    self._open: tuple[str, int, Any] | None = None  # (path, lines read, handle) between blocks

  def _reader(self, path: str, line: int):
    """The file ``path`` positioned after ``line`` lines: the handle left open by the previous
    block when it ended there, else the file reopened and read up to that line."""
    kept, self._open = self._open, None
    if kept is not None:
      if kept[:2] == (path, line):
        return kept[2]
      kept[2].close()
    f = _open_binary(path)
    for _ in range(line):  # resuming inside a file (a gzip file is decompressed up to there)
      if not f.readline():
        break
    return f

  def start(self) -> dict:
    return {"epoch": 0, "file": 0, "line": 0, "good": 0, "carry": [], "windows": 0}

  def file_order(self, epoch: int) -> list[str]:
    if not self.shuffle:
      return self.files
    perm = np.random.default_rng([int(self.seed) % 2**32, epoch, 0x6A73]).permutation(
        len(self.files))
    return [self.files[i] for i in perm]

  def _error(self, message: str) -> Exception:
    from train.config import ConfigError  # a bad file is a bad --data: one error line

    return ConfigError(f"--data {self.what}: {message}")

  def _warn_pending(self) -> None:
    """Warns about the first malformed line, once per process and ``--data`` spec (the train and
    eval splits read the same lines), once its file has shown a readable line."""
    pending, self._pending = self._pending, None
    if pending is not None and self.what not in _JSONL_WARNED:
      _JSONL_WARNED.add(self.what)
      log.warning("warning: --data %s: skipping malformed line %s:%d (%s); further malformed "
                  "lines are skipped too and counted at the end of the run", self.what, *pending)

  def _doc(self, raw: bytes, path: str, lineno: int, good: int) -> str | None:
    """The text of one line; None (counted; the first one warned about once the file has a
    readable line, ``good`` > 0 so far) for a malformed line."""
    import json

    try:
      record = json.loads(raw)
      if not isinstance(record, dict):
        raise TypeError(f"a JSON {type(record).__name__}, not an object")
      text = record[self.field]
      if not isinstance(text, str):
        raise TypeError(f"field {self.field!r} is {type(text).__name__}, not a string")
      return text
    except (ValueError, TypeError, KeyError, IndexError) as e:
      self.malformed += 1
      if self._pending is None:
        reason = f"no field {self.field!r}" if isinstance(e, KeyError) else str(e)[:120]
        self._pending = (path, lineno, reason)
      if good:
        self._warn_pending()
      return None

  def block(self, pos: dict) -> tuple[np.ndarray, dict | None]:
    """(windows int32[n, T+1] of the block at ``pos``, position of the next block or None)."""
    seq = self.seq_len
    pos = dict(pos, carry=list(pos["carry"]))
    eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id >= 0 else []
    carry = np.asarray(pos["carry"], np.int32)
    windows: list[np.ndarray] = []
    while True:
      order = self.file_order(pos["epoch"])
      while pos["file"] < len(order):
        path = order[pos["file"]]
        try:
          f = self._reader(path, pos["line"])
          with contextlib.ExitStack() as close_unless_kept:
            close_unless_kept.callback(f.close)
            while len(windows) < self.block_windows:
              raw = f.readline()
              if not raw:
                break
              pos["line"] += 1
              if not raw.strip():
                continue
              text = self._doc(raw, path, pos["line"], pos["good"])
              if text is None:
                continue
              pos["good"] += 1
              self._warn_pending()
              if not text.strip() or corpus.is_heldout(text) != (self.split == "eval"):
                continue
              ids = np.asarray(self.tokenizer.encode(text) + eos, np.int32)
              carry = np.concatenate([carry, ids])
              n = max(0, (len(carry) - 1) // seq)  # windows carry[k*T : k*T + T + 1]
              windows.extend(carry[k * seq:k * seq + seq + 1] for k in range(n))
              carry = carry[n * seq:]
            else:  # the block is full: keep the file open for the next one
              close_unless_kept.pop_all()
              self._open = (path, pos["line"], f)
              pos["carry"] = carry.tolist()
              pos["windows"] += len(windows)
              return np.stack(windows), pos
        except (OSError, EOFError) as e:  # unreadable or truncated gzip
          raise self._error(f"cannot read {path} at line {pos['line'] + 1}: {e}") from None
        if pos["good"] == 0:
          first = f"; line {self._pending[1]}: {self._pending[2]}" if self._pending else ""
          raise self._error(f"{path} has no readable line{first} (each line must be a JSON "
                            f"object with a string field {self.field!r}; see --text-field)")
        pos.update(file=pos["file"] + 1, line=0, good=0)
      # the end of an epoch: the partial window is dropped
      if pos["windows"] + len(windows) == 0:
        raise self._error(f"the {self.split} split has fewer than seq_len + 1 = {seq + 1} "
                          "tokens; use more data or a shorter --seq-len")
      nxt = {"epoch": pos["epoch"] + 1, "file": 0, "line": 0, "good": 0, "carry": [],
             "windows": 0}
      if self.num_epochs is not None and nxt["epoch"] >= self.num_epochs:
        nxt = None
      if windows or nxt is None:
        return (np.stack(windows) if windows else np.zeros((0, seq + 1), np.int32)), nxt
      pos, carry = nxt, np.zeros((0,), np.int32)


class _JsonlIterator(grain.DatasetIterator):
  """Global batches of ``B * process_count`` windows of a :class:`_JsonlStream`, of which this
  process takes rows ``[process_index * B, (process_index + 1) * B)``.

  State: ``{"block": position of the current block, "offset": windows of it consumed}``; the
  block is re-read (and re-shuffled identically) on ``set_state``.
  """

  def __init__(self, stream: _JsonlStream, batch_size: int, process_index: int,
               process_count: int):
    super().__init__()
    self._stream, self._rows = stream, batch_size
    self._offset_rows = process_index * batch_size
    self._global = batch_size * process_count
    self._pos: dict | None = stream.start()
    self._offset = 0
    self._windows: np.ndarray | None = None
    self._next: dict | None = None
    self._malformed_before = 0  # the stream's malformed count before the current block

  @property
  def malformed_lines(self) -> int:
    return self._stream.malformed

  def _load(self) -> None:
    self._malformed_before = self._stream.malformed
    windows, self._next = self._stream.block(self._pos)
    if self._stream.shuffle and len(windows):
      key = [int(self._stream.seed) % 2**32, self._pos["epoch"], self._pos["file"],
             self._pos["line"]]
      windows = windows[np.random.default_rng(key).permutation(len(windows))]
    self._windows = windows

  def __next__(self):
    rows: list[np.ndarray] = []
    while len(rows) < self._global:
      if self._pos is None:
        raise StopIteration
      if self._windows is None:
        self._load()
      take = min(self._global - len(rows), len(self._windows) - self._offset)
      rows.extend(self._windows[self._offset:self._offset + take])
      self._offset += take
      if self._offset == len(self._windows):
        self._pos, self._windows, self._offset = self._next, None, 0
    w = np.stack(rows[self._offset_rows:self._offset_rows + self._rows])
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  def get_state(self) -> dict:
    # the count before the current block: set_state re-reads that block, counting its lines again
    malformed = self._stream.malformed if self._windows is None else self._malformed_before
    return {"block": self._pos, "offset": self._offset, "malformed": malformed}

  def set_state(self, state: dict) -> None:
    self._pos = state["block"]
    self._offset = int(state["offset"])
    self._stream.malformed = int(state.get("malformed", 0))
    self._windows = None


class _JsonlDataset(grain.IterDataset):
  def __init__(self, stream: _JsonlStream, batch_size: int, process_index: int,
               process_count: int):
    super().__init__()
    self._args = (stream, batch_size, process_index, process_count)

  def __iter__(self) -> _JsonlIterator:
    stream = self._args[0]
    fresh = _JsonlStream(stream.files, stream.tokenizer, seq_len=stream.seq_len,
                         split=stream.split, seed=stream.seed, shuffle=stream.shuffle,
                         field=stream.field, num_epochs=stream.num_epochs,
                         block_windows=stream.block_windows, what=stream.what)
    return _JsonlIterator(fresh, *self._args[1:])

  def __str__(self) -> str:
    return f"_JsonlDataset({self._args[0].what})"


def make_jsonl_dataset(pattern: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                       split: str = "train", seed: int = 0, shuffle: bool = True,
                       process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None, field: str = "text",
                       block_windows: int | None = None) -> grain.IterDataset:
  """Batches of the ``jsonl:`` pipeline (see :class:`_JsonlStream`): streamed, never more than
  one block of windows in memory.

  Every process reads the same global stream of windows and takes its rows of each global batch,
  so a multi-process run sees exactly the batches of a one-process run (every process reads and
  tokenizes all the data). The eval split (documents held out by content hash, as for ``text:``)
  is not shuffled. Malformed lines (not JSON, not an object, no string ``field``) are skipped,
  counted (``iterator.malformed_lines``) and the first one is warned about with its file and
  line; a file without a single readable line is an error.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval' for --data jsonl:, got {split!r}")
  if not isinstance(field, str) or not field:
    raise ValueError(f"--text-field must be a non-empty field name, got {field!r}")
  files = jsonl_files(pattern)
  global_batch = batch_size * process_count
  if block_windows is None:
    block_windows = max(JSONL_SHUFFLE_WINDOWS, global_batch) if shuffle else global_batch
  stream = _JsonlStream(files, tokenizer, seq_len=seq_len, split=split, seed=seed,
                        shuffle=shuffle, field=field, num_epochs=num_epochs,
                        block_windows=block_windows, what=f"jsonl:{pattern}")
  ds = _JsonlDataset(stream, batch_size, process_index, process_count)
  try:  # surface an unreadable first file or an empty split now, as one error
    next(iter(ds))
  except StopIteration:
    raise ValueError(f"--data jsonl:{pattern}: the {split} split holds fewer than one global "
                     f"batch of {global_batch} windows of seq_len + 1 = {seq_len + 1} tokens "
                     "in num_epochs") from None
  return ds


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def make_dataset(spec: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 split: str = "train", seed: int = 0, process_index: int = 0,
                 process_count: int = 1, tfds_data_dir: str | None = None,
                 num_epochs: int | None = None, shuffle: bool | None = None,
                 cache_dir: str | None = None, tfds_feature: str = "text",
                 read_threads: int = 16, text_field: str = "text") -> grain.IterDataset:
  """Builds the input pipeline for a ``--data`` spec (see the module docstring).

  Args:
    spec: "embedded", "text:<glob or dir>", "jsonl:<glob or dir>" or "tfds:<name>[:<version>]".
    tokenizer: a :class:`train.tokenizer.Tokenizer`.
    seq_len: tokens per sequence T.
    batch_size: sequences per batch for THIS process.
    split: "train" or "eval" (tfds: also any tfds split string).
    seed: shuffle seed (same on every process).
    process_index, process_count: this process's share (see the module docstring): rows
      ``[process_index * batch_size, (process_index + 1) * batch_size)`` of every global batch for
      ``embedded``/``text:``, every ``process_count``-th document for ``tfds:``.
    tfds_data_dir: tfds data dir (local or gs://); None uses tfds' default.
    num_epochs: passes over the data; None repeats forever.
    shuffle: defaults to True for "train", False otherwise.
    cache_dir: where the embedded corpus' token stream is cached (.npy); defaults to the
      tokenizer file's directory. For ``text:`` only used when given.
    tfds_feature: the tfds string feature to read.
    read_threads: tfds reader threads.
    text_field: the JSON field holding the text (``jsonl:``).

  Returns:
    A ``grain.IterDataset`` of ``{"inputs", "targets"}`` int32 [batch_size, seq_len] batches;
    its iterators support ``get_state()`` / ``set_state()``.
  """
  kind, arg = parse_spec(spec)
  _check_common(seq_len, batch_size, process_index, process_count, num_epochs)
  if shuffle is None:
    shuffle = split == "train"
  if kind == "tfds":
    return _make_tfds_dataset(
        arg, tokenizer, seq_len=seq_len, batch_size=batch_size, split=split, seed=seed,
        shuffle=shuffle, process_index=process_index, process_count=process_count,
        data_dir=tfds_data_dir, num_epochs=num_epochs, feature=tfds_feature,
        read_threads=read_threads)
  if kind == "jsonl":
    return make_jsonl_dataset(
        arg, tokenizer, seq_len=seq_len, batch_size=batch_size, split=split, seed=seed,
        shuffle=shuffle, process_index=process_index, process_count=process_count,
        num_epochs=num_epochs, field=text_field)
  if kind == "embedded":
    documents = corpus.embedded_documents()
    if cache_dir is None and tokenizer.model_path and "://" not in tokenizer.model_path:
      cache_dir = os.path.dirname(os.path.abspath(tokenizer.model_path))
  else:
    documents = read_text_files(arg)
  tokens, starts = _split_stream(documents, tokenizer, split, seq_len, cache_dir, spec)
  return make_token_dataset(
      tokens, seq_len=seq_len, batch_size=batch_size, starts=starts, shuffle=shuffle, seed=seed,
      process_index=process_index, process_count=process_count, num_epochs=num_epochs)


def seek(iterator: Any, batches: int, spec: str) -> None:
  """Moves a fresh iterator of :func:`make_dataset` to its batch number ``batches`` (the next
  batch it yields is that one), for a resume whose processes read other rows of each global
  batch than the run that saved (another process count or mesh).

  ``embedded``/``text:`` streams are one global stream, so the position of every process is the
  global batch index. A ``tfds:`` stream is packed per process from a per-process share of the
  documents: its position cannot be carried to other shares, and ValueError says so.
  """
  kind, _ = parse_spec(spec)
  if kind == "tfds":
    raise ValueError(f"--data {spec} is packed per process from each process's share of the "
                     f"documents, so its position cannot move to another process count or batch "
                     f"layout without repeating or skipping documents; resume with the process "
                     f"count and --mesh batch axes (data x fsdp) that saved it")
  if batches < 0:
    raise ValueError(f"batches must be >= 0, got {batches}")
  if iterator.get_state() == {"next_index": 0}:  # grain's map-dataset iterator: jump
    iterator.set_state({"next_index": int(batches)})
    return
  for _ in range(batches):  # anything else: read up to the position
    next(iterator)
