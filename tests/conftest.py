"""Shared pytest setup.

Eight fake CPU devices are requested *before* jax is imported anywhere, so sharding tests can build
meshes such as data=2,fsdp=4 on a laptop or CI runner.  A value already set in the environment wins.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def train_tokenizer(tmp_path_factory):
  """A small SentencePiece model (vocab 512) shared by the trainer tests."""
  from tests.train_utils import make_tokenizer

  return make_tokenizer(str(tmp_path_factory.mktemp("train-tokenizer")))
