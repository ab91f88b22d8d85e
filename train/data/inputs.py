"""The trainer's inputs: the tokenizer, this process's train/eval datasets, and the global batch
built from this process's rows of it."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import sharding as shd
from train.config import ConfigError, TrainConfig
from train.data import tokenizer as tok_lib


def default_cache_dir() -> str:
  return os.environ.get("OSD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "osd_jax"))


def load_tokenizer(cfg: TrainConfig):
  """The tokenizer given by ``--tokenizer``, else the cached one of the embedded corpus."""
  if cfg.tokenizer is not None:
    try:
      return tok_lib.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--tokenizer: {e}") from None
  vocab = tok_lib.DEFAULT_VOCAB_SIZE if cfg.vocab_size is None else cfg.vocab_size
  cache = cfg.cache_dir or default_cache_dir()
  try:
    if jax.process_count() > 1:  # process 0 trains (or finds) it, the others wait and load it
      if jax.process_index() == 0:
        tok_lib.default_tokenizer(cache, vocab)
      multihost_utils.sync_global_devices("osd_jax:tokenizer")
    return tok_lib.default_tokenizer(cache, vocab)
  except OSError as e:
    raise ConfigError(f"--cache-dir {cache}: cannot write or read the default tokenizer there "
                      f"({e})") from None
  except ValueError as e:
    raise ConfigError(f"default tokenizer (--vocab-size {vocab}, --cache-dir {cache}): {e}"
                      ) from None


def make_datasets(cfg: TrainConfig, tokenizer,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any]:
  """(train dataset, eval dataset) for this process.

  With a ``mesh`` this process reads the rows of every global batch that its devices hold
  (:func:`train.sharding.process_batch_rows`): for ``embedded``/``text:`` data, rows
  ``[start, stop)`` of the global batch that a single process would read, so any number of
  processes trains on exactly the same batches. Without one, process i reads rows
  ``[i * B / P, (i + 1) * B / P)``.
  """
  from train.data import pipeline  # grain: not installed on every Python (pyproject.toml)

  if mesh is None:
    rows = cfg.batch_size // jax.process_count()
    start = jax.process_index() * rows
  else:
    try:
      start, stop = shd.process_batch_rows(mesh, cfg.batch_size)
    except ValueError as e:
      raise ConfigError(f"--mesh {cfg.mesh}: {e}") from None
    rows = stop - start
  common = {"seq_len": cfg.seq_len, "batch_size": rows, "seed": cfg.seed,
            "process_index": start // rows, "process_count": cfg.batch_size // rows,
            "tfds_data_dir": cfg.tfds_data_dir, "text_field": cfg.text_field}
  try:
    train_ds = pipeline.make_dataset(cfg.data, tokenizer, split="train", **common)
    eval_ds = pipeline.make_dataset(cfg.data, tokenizer, split="eval", **common)
  except (ValueError, OSError, RuntimeError, ImportError) as e:
    message = str(e) if "--data" in str(e) else f"--data {cfg.data}: {e}"
    raise ConfigError(message) from None
  return train_ds, eval_ds


def global_batch(batch: dict, sharding, batch_size: int) -> dict:
  """The global ``[batch_size, T]`` arrays from this process's rows of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (batch_size,) + np.shape(v)[1:])
          for k, v in batch.items() if k in ("inputs", "targets")}
