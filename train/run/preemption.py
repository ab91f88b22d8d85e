"""SIGTERM and SIGINT (Ctrl-C) as a flag the training loop reads after every step."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the loop reads after every step (a Python
  attribute: no device sync). A second SIGINT interrupts at once (KeyboardInterrupt, no save)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signal_name: str | None = None  # the first signal received
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def agreed(self, sync: bool = True) -> bool:
    """True when any process has been asked to stop. Multi-process, only ``sync`` calls (a
    collective that every process must make at the same step) can return True."""
    if jax.process_count() == 1:
      return self.requested
    if not sync:
      return False
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.max(flags))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
