"""Helpers shared by the trainer tests (tests/test_trainer.py, test_sharding.py, test_checkpoint.py,
test_cli.py): a small model config and a small tokenizer so that each test compiles and runs in
seconds on two CPU cores."""

from __future__ import annotations

import os

import jax
import numpy as np

from train.config import TrainConfig

# A 2-layer LLaMA small enough for many compiles per test session.
SMALL_MODEL = {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4}
TOKENIZER_VOCAB = 512


def make_tokenizer(directory) -> object:
  """A SentencePiece model (vocab 512) trained on 150 documents of the embedded corpus."""
  from train.data import corpus
  from train.data import tokenizer as tok_lib

  docs = corpus.split_documents(corpus.embedded_documents(), "train")[:150]
  return tok_lib.train_tokenizer(docs, TOKENIZER_VOCAB, os.path.join(directory, "small.model"),
                                 max_chars=1_000_000)


def small_config(run_dir=None, **overrides) -> TrainConfig:
  """A TrainConfig for fast tests; ``overrides`` replace any field."""
  base = dict(preset="tiny", model_overrides=dict(SMALL_MODEL), optimizer="osd_adamw", rank=4,
              lr=1e-2, warmup_steps=1, steps=6, batch_size=8, seq_len=32, eval_batches=1,
              eval_every=0, log_every=1, ckpt_every=0, progress=False, tensorboard=False,
              dtype="float32", run_dir=None if run_dir is None else str(run_dir))
  base.update(overrides)
  return TrainConfig(**base)


def cli_args(tokenizer_path: str, run_dir, *extra: str) -> list[str]:
  """``python -m train`` flags for the small test model (1 eval batch, no progress bar)."""
  args = ["--tokenizer", tokenizer_path, "--run-dir", str(run_dir), "--rank", "4",
          "--batch-size", "8", "--seq-len", "16", "--dtype", "float32", "--eval-batches", "1",
          "--no-progress", "--no-tensorboard"]
  for k, v in SMALL_MODEL.items():
    args += ["--model-override", f"{k}={v}"]
  return args + list(extra)


def one_device() -> list:
  """Tests that are not about sharding run on one device (SVDs and small programs partitioned
  over 8 fake devices on 2 cores are many times slower)."""
  return jax.devices()[:1]


def random_batch(seed: int, batch: int, seq: int, vocab: int) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def host(tree):
  """A numpy copy of a (sharded) pytree."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b) -> None:
  """Bitwise equality of two pytrees of arrays (NaNs compare equal)."""
  fa, ta = jax.tree.flatten(host(a))
  fb, tb = jax.tree.flatten(host(b))
  assert ta == tb, "tree structures differ"
  for x, y in zip(fa, fb):
    np.testing.assert_array_equal(x, y)


def committed_steps(ckpt_dir) -> list[int]:
  """The steps with a complete checkpoint in ``ckpt_dir`` (the trainer's own listing)."""
  from train.run import startup

  return startup.committed_steps(str(ckpt_dir))
