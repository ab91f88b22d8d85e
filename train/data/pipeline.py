"""Input pipelines (grain): fixed-length next-token batches from the embedded corpus, local text
files, JSON-lines files (``.jsonl``, ``.json.gz`` such as the C4 shards) or a tensorflow-datasets
dataset such as C4. :func:`make_dataset` picks the source of a ``--data`` spec: ``embedded`` and
``text:`` are :mod:`train.data.text`, ``jsonl:`` :mod:`train.data.jsonl`, ``tfds:``
:mod:`train.data.tfds`.

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
in 20 by content hash, see :mod:`train.data.corpus`; with too few documents to split, one window in
20 instead; ``jsonl:`` always splits by document); for ``tfds:`` it is the dataset's ``validation``
split (any other tfds split string is passed through). Eval is not shuffled.

Example::

  ds = make_dataset("embedded", tok, seq_len=256, batch_size=16)
  it = iter(ds)
  batch = next(it)
  state = it.get_state()   # store with the checkpoint; later: it.set_state(state)
"""

from __future__ import annotations

import os
from typing import Any

import grain

from train.config import parse_spec  # the one parser of the --data grammar (re-exported)
from train.data import corpus
from train.data.jsonl import make_jsonl_dataset
from train.data.text import check_common, make_token_dataset, read_text_files, split_stream
from train.data.tfds import make_tfds_dataset
from train.data.tokenizer import Tokenizer

__all__ = ["make_dataset", "parse_spec", "seek"]


def make_dataset(spec: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 split: str = "train", seed: int = 0, process_index: int = 0,
                 process_count: int = 1, tfds_data_dir: str | None = None,
                 num_epochs: int | None = None, shuffle: bool | None = None,
                 cache_dir: str | None = None, tfds_feature: str = "text",
                 read_threads: int = 16, text_field: str = "text") -> grain.IterDataset:
  """Builds the input pipeline for a ``--data`` spec (see the module docstring).

  Args:
    spec: "embedded", "text:<glob or dir>", "jsonl:<glob or dir>" or "tfds:<name>[:<version>]".
    tokenizer: a :class:`train.data.tokenizer.Tokenizer`.
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
  check_common(seq_len, batch_size, process_index, process_count, num_epochs)
  if shuffle is None:
    shuffle = split == "train"
  if kind == "tfds":
    return make_tfds_dataset(
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
  tokens, starts = split_stream(documents, tokenizer, split, seq_len, cache_dir, spec)
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
