"""Run directories: collision-free default names, an exclusive lock, and finding a run's directory
from its ``config.json``.

One run at a time writes into a run directory: process 0 holds an exclusive ``fcntl`` lock on
``RUN_DIR/.lock`` for the run's whole life (the kernel drops it when the process ends, also on
SIGKILL, so a crashed run never leaves a stale lock). A second run into the same directory is
refused with one error line naming the holder's pid.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time

from train.config import ConfigError, TrainConfig

LOCK_NAME = ".lock"


def default_run_dir(cfg: TrainConfig, root: str = "runs") -> str:
  """``runs/PRESET-OPTIMIZER-YYYYmmdd-HHMMSS-PID-XXXXXX`` (absolute): the pid and 6 random hex
  digits keep runs started in the same second apart, also from several hosts sharing ``runs/``."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  name = f"{cfg.preset}-{cfg.optimizer}-{stamp}-{os.getpid()}-{secrets.token_hex(3)}"
  return os.path.abspath(os.path.join(root, name))


class RunDirLock:
  """An exclusive lock on ``run_dir`` (created if missing) held until :meth:`release`.

  Raises ConfigError when another process holds it. ``release(clean=True)`` also removes the
  directory when this lock created it and nothing but the lock file was written (a run that failed
  while starting up leaves nothing behind).
  """

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    # the outermost directory this lock creates (run_dir or a missing parent such as runs/)
    top, self._created = os.path.abspath(run_dir), None
    while not os.path.exists(top):
      self._created, top = top, os.path.dirname(top)
    try:
      os.makedirs(run_dir, exist_ok=True)
      self._fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"--run-dir {run_dir}: cannot create it or its lock file ({e})") from None
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(self._fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
      os.close(self._fd)
      self._fd = None
      raise ConfigError(f"--run-dir {run_dir} is in use by another run ({holder}); wait for it "
                        f"to end or choose another --run-dir") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)

  def release(self, clean: bool = False) -> None:
    if self._fd is None:
      return
    if clean and self._created and os.listdir(self.run_dir) == [LOCK_NAME]:
      os.unlink(os.path.join(self.run_dir, LOCK_NAME))
      d = os.path.abspath(self.run_dir)
      while True:  # the run dir and the parents this lock created, while they are empty
        try:
          os.rmdir(d)
        except OSError:
          break
        if d == self._created:
          break
        d = os.path.dirname(d)
    os.close(self._fd)  # closing the descriptor drops the flock
    self._fd = None


def run_dir_of_config(path: str, values: dict) -> str | None:
  """The run directory a ``config.json`` belongs to, or None for a config file of one's own.

  A ``config.json`` that a run saved (it records ``run_dir``) sits in that run's directory next to
  ``metrics.jsonl`` or ``checkpoints/``; the directory it sits in now is the run's, wherever it was
  copied or moved, and whatever the working directory.
  """
  directory = os.path.dirname(os.path.abspath(path))
  saved_by_a_run = values.get("run_dir") is not None and os.path.basename(path) == "config.json"
  has_run_files = any(os.path.exists(os.path.join(directory, name))
                      for name in ("metrics.jsonl", "checkpoints", LOCK_NAME))
  return directory if saved_by_a_run and has_run_files else None


__all__ = ["LOCK_NAME", "RunDirLock", "default_run_dir", "run_dir_of_config"]
