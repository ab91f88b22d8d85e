"""The ``embedded`` and ``text:`` sources: documents tokenized once into one token stream, cut into
windows of ``seq_len + 1`` tokens and batched (the layout is in :mod:`train.data.pipeline`)."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence

import grain
import numpy as np

from train.data import corpus
from train.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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


def split_stream(documents: Sequence[str], tokenizer: Tokenizer, split: str, seq_len: int,
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


def check_common(seq_len: int, batch_size: int, process_index: int, process_count: int,
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
  check_common(seq_len, batch_size, process_index, process_count, num_epochs)
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

