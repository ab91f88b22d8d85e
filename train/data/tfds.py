"""The ``tfds:`` source: a tensorflow-datasets dataset such as C4, read through its array_record
data source, shared out by document and packed per process (see :mod:`train.data.pipeline`)."""

from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np

from train.data.tokenizer import Tokenizer


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


def _shard(ds: grain.MapDataset, process_index: int, process_count: int,
           what: str) -> grain.MapDataset:
  """Every process_count-th element, from an equal-length prefix so all processes get as many."""
  n = len(ds) - len(ds) % process_count
  if n == 0:
    raise ValueError(f"{what}: {len(ds)} elements cannot be split over process_count="
                     f"{process_count} processes")
  return ds[:n][process_index::process_count]


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


def make_tfds_dataset(name: str, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
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

