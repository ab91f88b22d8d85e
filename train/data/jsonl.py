"""The ``jsonl:`` source: JSON-lines files (``.jsonl``, ``.json.gz`` such as the
``c4-train.*.json.gz`` shards), streamed line by line (see :class:`_JsonlStream`)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from train.data import corpus
from train.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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

