"""The default offline corpus: text that ships with every CPython installation.

Two sources, read from the running interpreter, nothing downloaded and nothing copied into the repo:

* ``pydoc_data.topics.topics`` — the Python language reference topics (English prose), and
* the standard library's ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``, skipping
  ``site-packages``, test suites, ``idlelib``/``turtledemo`` and any file that is not valid UTF-8.

About 12 MB of text on CPython 3.11. The corpus is deterministic for a given interpreter (it differs
between Python versions). Documents are split into train / eval by a stable content hash.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from collections.abc import Sequence

__all__ = [
  "HOLDOUT_EVERY",
  "corpus_fingerprint",
  "embedded_corpus",
  "embedded_documents",
  "is_heldout",
  "split_documents",
]

#: One document in ``HOLDOUT_EVERY`` (by content hash) goes to the eval split.
HOLDOUT_EVERY = 20

_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo",
    "__pycache__", "lib2to3", "ensurepip",
})


def _skip_dir(name: str) -> bool:
  return name in _SKIP_DIRS or name.startswith(("test", "."))


def _stdlib_sources(root: str) -> list[tuple[str, str]]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
    for fname in sorted(filenames):
      if not fname.endswith(".py") or fname.startswith("test_"):
        continue
      path = os.path.join(dirpath, fname)
      try:
        with open(path, "rb") as f:
          text = f.read().decode("utf-8")
      except (OSError, UnicodeDecodeError):
        continue
      if text.strip():
        out.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
  return out


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> tuple[tuple[str, str], ...]:
  """(name, text) pairs: pydoc topics (``pydoc:<topic>``) then stdlib files (``stdlib:<path>``).

  Exact duplicate texts are kept once (first occurrence).
  """
  docs: list[tuple[str, str]] = []
  try:
    from pydoc_data.topics import topics
  except ImportError:  # some distributions strip pydoc_data
    topics = {}
  for key in sorted(topics):
    if topics[key].strip():
      docs.append((f"pydoc:{key}", topics[key]))
  stdlib = sysconfig.get_paths().get("stdlib")
  if stdlib and os.path.isdir(stdlib):
    docs.extend((f"stdlib:{name}", text) for name, text in _stdlib_sources(stdlib))
  seen: set[str] = set()
  unique = []
  for name, text in docs:  # e.g. the "if" and "else" topics share one text
    if text not in seen:
      seen.add(text)
      unique.append((name, text))
  docs = unique
  if not docs:
    raise RuntimeError("the embedded corpus is empty: neither pydoc_data nor the standard library "
                       "sources were found; use --data text:/path/*.txt instead")
  return tuple(docs)


def embedded_documents() -> list[str]:
  """The embedded corpus as a list of document texts, in a deterministic order."""
  return [text for _, text in embedded_corpus()]


def is_heldout(text: str, every: int = HOLDOUT_EVERY) -> bool:
  """True for the documents of the eval split: sha1(text) mod ``every`` == 0 (stable everywhere)."""
  digest = hashlib.sha1(text.encode("utf-8", errors="replace")).digest()
  return int.from_bytes(digest[:8], "big") % every == 0


def split_documents(documents: Sequence[str], split: str,
                    every: int = HOLDOUT_EVERY) -> list[str]:
  """Documents of ``split`` ("train" or "eval"), keeping their order."""
  if split not in ("train", "eval"):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  want = split == "eval"
  return [d for d in documents if is_heldout(d, every) == want]


def corpus_fingerprint(documents: Sequence[str]) -> str:
  """A hex digest identifying the exact document list (used for cache keys)."""
  h = hashlib.sha1()
  for d in documents:
    b = d.encode("utf-8", errors="replace")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()
