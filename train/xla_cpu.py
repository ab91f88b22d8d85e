"""A workaround for an XLA:CPU scheduling bug that makes the scanned OSD train step hang.

With jax 0.10.2, XLA:CPU's concurrency-optimized HLO scheduler (its default) orders a train
step that holds LAPACK custom calls — the QRs of the projector metrics (``subspace_drift``,
``captured_energy``) — beside the scanned layers' loops so that the execution never finishes:
every worker thread idles and ``block_until_ready`` waits forever (tiny preset, osd_adamw,
1 or 8 CPU devices; found with ``py-spy dump`` and ``gdb``; docs/design.md §12). The
memory-minimising scheduler runs the same program correctly. It can only be chosen through
``XLA_FLAGS`` before XLA reads its flags (the per-compilation ``compiler_options`` of
``jax.jit`` leave part of the schedule to the global flag and the step still hangs).

:func:`apply` appends :data:`FLAG` to ``XLA_FLAGS`` unless a jax backend already exists or the
variable already names the option (your setting wins); ``train/__init__.py`` calls it when
``train`` is imported, and says why there. GPU and TPU ignore the option.
"""

from __future__ import annotations

import logging
import os

OPTION = "--xla_cpu_enable_concurrency_optimized_scheduler"
FLAG = f"{OPTION}=false"

log = logging.getLogger("train")


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge
  except ImportError:  # pragma: no cover - jax moved it; assume the worst
    return True
  return xla_bridge.backends_are_initialized()


def apply() -> bool:
  """Appends :data:`FLAG` to ``XLA_FLAGS`` when it can still take effect.

  Returns whether the scheduler option is set (by this call or by the user)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if OPTION in flags:
    return True
  if _backends_initialized():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
  return True


_warned = False


def warn_if_missing(platform: str) -> None:
  """One warning when a CPU step is built without the workaround (a jax computation ran before
  ``import train``, so XLA had read its flags already)."""
  global _warned
  import train  # the result of the call in train/__init__.py

  if platform == "cpu" and not train.XLA_CPU_WORKAROUND and not _warned:
    _warned = True  # once per process, not once per trainer build
    log.warning("warning: jax computed something before `import train`, so XLA_FLAGS could not "
                "get %s; the scanned OSD step may hang on CPU (train/xla_cpu.py). Import train "
                "first, or start Python with XLA_FLAGS=%s", FLAG, FLAG)
