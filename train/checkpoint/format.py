"""The checkpoint format, shared by the training ``Checkpointer``
(:mod:`train.checkpoint.checkpointer`) and the read-only loading API
(:mod:`train.checkpoint.loading`): its version, the step metadata, the shape signature and the
one-line errors (see :mod:`train.checkpoint` for the layout)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
from typing import Any

import jax
import numpy as np

#: Version of the checkpoint format this code writes. 1: no version field (up to the first
#: release); 2: ``format_version`` and the writing topology in the step's custom metadata;
#: 3: ``TrainState.grad_norm`` (the fused update clips with the previous step's norm).
FORMAT_VERSION = 3
#: Train-state fields each format version added, and the value an older checkpoint restores them
#: to (grad_norm 0: no clipping at the first fused step after the resume).
ADDED_FIELDS: dict[int, dict[str, float]] = {3: {"grad_norm": 0.0}}
#: The oldest format this code reads.
MIN_FORMAT_VERSION = 1


@contextlib.contextmanager
def quiet_orbax():
  """Keeps orbax's (absl) warnings below ERROR out of the log while inside."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message says what differs."""


def checkpoint_metadata(mesh: jax.sharding.Mesh | None = None) -> dict:
  """The step metadata written with every checkpoint: format version and topology."""
  meta: dict[str, Any] = {"format_version": FORMAT_VERSION,
                          "process_count": jax.process_count()}
  if mesh is not None:
    meta.update(mesh={k: int(v) for k, v in mesh.shape.items()}, device_count=int(mesh.size))
  return meta


def check_format_version(meta: dict | None, where: str) -> int:
  """The format version in a step's metadata (1 when absent); raises CheckpointError for a
  format this code cannot read."""
  version = (meta or {}).get("format_version", 1)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
        f"checkpoint {where} has format version {version!r}, newer than this code reads "
        f"(versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); update osd_jax to restore it")
  if version < MIN_FORMAT_VERSION:
    raise CheckpointError(f"checkpoint {where} has format version {version}, older than this "
                          f"code reads (versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})")
  return version


def signature(tree: Any) -> dict[str, str]:
  """``{path: "shape dtype"}`` for every array leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): f"{tuple(x.shape)} {np.dtype(x.dtype).name}" for p, x in flat}


def describe_diff(saved: dict[str, str], current: dict[str, str], limit: int = 3) -> str:
  lines = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if a != b:
      lines.append(f"{k}: checkpoint {a or 'missing'} vs this run {b or 'missing'}")
  more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


#: tensorstore's status codes (a ValueError's message prefix) for files that are missing,
#: truncated or damaged.
_DATA_STATUS = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b")
#: OSError numbers of a file that is missing or cannot be read back (not: no permission, too
#: many open files, ...); None: an OSError without a number, such as a truncated file's.
_DATA_ERRNOS = (None, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EIO)


def _is_damaged_data(e: BaseException) -> bool:
  """Whether ``e`` (or an exception it was raised from) says the checkpoint's own files are
  missing, truncated or not parseable, as opposed to an error in how they were asked for."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (EOFError, json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if isinstance(e, OSError) and e.errno in _DATA_ERRNOS:
      return True
    if isinstance(e, ValueError) and _DATA_STATUS.match(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def unreadable_error(where: str, e: Exception) -> CheckpointError:
  """The one-line error for a checkpoint that could not be read. Deleting it is suggested only
  when its files are damaged (:func:`_is_damaged_data`): never for an error of ours."""
  first = (str(e).splitlines() or [""])[0]
  first = first if len(first) <= 200 else first[:200] + "..."
  if _is_damaged_data(e):
    return CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first}); "
                           f"its files are damaged: delete it to resume from an earlier one")
  return CheckpointError(f"checkpoint {where} could not be read ({type(e).__name__}: {first}); "
                         f"nothing shows that its files are damaged, so keep it")


def describe_topology(meta: dict) -> str:
  """``"mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices, 1 process)"`` from
  :func:`checkpoint_metadata` (a version-1 checkpoint did not record it)."""
  if "mesh" not in meta:
    return "an unrecorded mesh (format version 1)"
  n = meta.get("process_count", 1)
  return (f"mesh {meta['mesh']} ({meta.get('device_count')} devices, {n} "
          f"process{'es' if n != 1 else ''})")
