"""Metric writers (JSONL + TensorBoard), MFU and device-memory helpers.

``metrics.jsonl`` holds one JSON object per line: ``{"step": int, "time": unix_seconds, <name>:
value}``; non-finite values are written as ``null``. TensorBoard scalars use the same names.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device (chip for TPUs, GPU for NVIDIA), from the vendors' spec sheets.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe parts are slower, so MFU there reads low
    ("A100", 312e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak bf16 FLOP/s of ``device`` (default: the first local device); None if unknown (CPU)."""
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return None
  kind = getattr(device, "device_kind", "")
  for key, value in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return value
  return None


def mfu(flops_per_token: float, tokens_per_s: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None where the device peak is unknown."""
  peak = peak_flops(device)
  if peak is None or num_devices <= 0:
    return None
  return flops_per_token * tokens_per_s / (peak * num_devices)


def memory_stats() -> dict[str, float]:
  """Bytes in use and peak bytes on the first local device, where the backend reports them."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without the call
    stats = None
  if not stats:
    return {}
  out = {}
  if "bytes_in_use" in stats:
    out["memory_in_use_gib"] = stats["bytes_in_use"] / 2**30
  if "peak_bytes_in_use" in stats:
    out["memory_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return out


def _clean(value: Any) -> Any:
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends metrics to ``RUN_DIR/metrics.jsonl`` and TensorBoard; a no-op when not ``enabled``.

  ``purge_step``: TensorBoard hides the events that earlier writers of ``RUN_DIR/tensorboard``
  wrote at steps ``>= purge_step`` (tensorboardX writes a ``SessionLog.START`` event at that step),
  as ``metrics.jsonl`` is truncated on resume. The trainer passes the checkpoint step + 1 when it
  resumes (keeping what was logged up to the checkpoint) and 0 on a fresh start.
  """

  def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True,
               purge_step: int | None = None):
    self.enabled = enabled
    self.history: list[dict] = []
    self._file = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(run_dir, exist_ok=True)
    self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

  def write(self, step: int, metrics: dict[str, Any]) -> dict:
    """Records ``metrics`` at ``step``; returns the cleaned record (also kept in ``history``)."""
    record = {"step": int(step), "time": time.time()}
    record.update({k: _clean(v) for k, v in metrics.items()})
    self.history.append(record)
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "time") and isinstance(v, (int, float)) \
                and not isinstance(v, bool):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics.jsonl file (skipping a torn last line left by a crash)."""
  out = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out
