"""Checks before anything is allocated: does one train step fit in device memory at all?

:func:`check_step_memory` compares a lower bound on the activation memory of one micro-batch with
the memory of one device, so that e.g. ``--seq-len 100000`` is one error line naming the flags
instead of an out-of-memory traceback after compilation. The bound counts only what every train
step holds at some point, even with rematerialisation: one layer's attention probabilities
(``b × heads × T² × 4`` bytes, float32 softmax, unless the cuDNN flash kernel is used) plus the
float32 logits (``b × T × vocab × 4`` bytes), where ``b`` is the per-device micro-batch.
"""

from __future__ import annotations

import os

import jax

from train.config import ConfigError, TrainConfig


def device_memory_bytes(device: jax.Device) -> int | None:
  """Memory of one device: the accelerator's limit, or the host's RAM for CPU devices."""
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - backends without the call
    return None
  return stats.get("bytes_limit")


def step_memory_lower_bound(cfg: TrainConfig, mcfg, data_parallel: int, tensor: int = 1) -> int:
  """Bytes that one device needs at least for one micro-batch's activations (see module doc)."""
  b = max(1, cfg.batch_size // (cfg.grad_accum * max(data_parallel, 1)))
  heads = max(1, mcfg.n_heads // max(tensor, 1))
  t = cfg.seq_len
  attention = 0 if mcfg.attention_impl == "cudnn" else b * heads * t * t * 4
  logits = b * t * mcfg.vocab_size * 4
  return attention + logits


def check_step_memory(cfg: TrainConfig, mcfg, mesh: jax.sharding.Mesh) -> None:
  """Raises ConfigError when one micro-batch cannot fit in one device's memory."""
  dp = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  need = step_memory_lower_bound(cfg, mcfg, dp, mesh.shape.get("tensor", 1))
  have = device_memory_bytes(mesh.devices.flat[0])
  if have is None or need <= have:
    return
  raise ConfigError(
      f"--seq-len {cfg.seq_len} with --batch-size {cfg.batch_size} needs at least "
      f"{need / 2**30:.1f} GiB per device for one layer's attention scores and the logits of "
      f"one micro-batch, but a device has {have / 2**30:.1f} GiB; lower --seq-len or "
      f"--batch-size, or raise --grad-accum")
