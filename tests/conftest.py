"""Shared pytest setup.

Eight fake CPU devices are requested *before* jax is imported anywhere, so sharding tests can build
meshes such as data=2,fsdp=4 on a laptop or CI runner.  The flag is appended to any XLA_FLAGS
already set; a device count already given there wins.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

# The trainer tests build many identical small programs (same model, optimizer and mesh in
# different tests): a per-session persistent compilation cache compiles each once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="osd-jax-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

# The trainer's XLA:CPU scheduler workaround (train/__init__.py), before any test starts a backend.
import train  # noqa: E402, F401


@pytest.fixture(scope="session")
def train_tokenizer(tmp_path_factory):
  """A small SentencePiece model (vocab 512) shared by the trainer tests."""
  from tests.train_utils import make_tokenizer

  return make_tokenizer(str(tmp_path_factory.mktemp("train-tokenizer")))
