"""Multi-process start: ``jax.distributed.initialize`` when asked to or when a launcher is seen."""

from __future__ import annotations

import os

import jax

from train.config import ConfigError, TrainConfig

_LAUNCHER_ENV = (  # a multi-process launcher sets one of these (with a size > 1)
    "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES",
)


def _launcher_world_size() -> int:
  for name in _LAUNCHER_ENV:
    try:
      if int(os.environ.get(name, "1")) > 1:
        return int(os.environ[name])
    except ValueError:
      pass
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def maybe_initialize_distributed(cfg: TrainConfig) -> None:
  """Calls ``jax.distributed.initialize`` when asked to or when a multi-process launcher is seen."""
  explicit = cfg.distributed or cfg.coordinator_address is not None or cfg.num_processes
  if not explicit and _launcher_world_size() <= 1:
    return
  if jax.distributed.is_initialized():
    return
  # CPU collectives across processes (only used when the devices are CPUs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cfg.coordinator_address is not None:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes is not None:
    kwargs.update(num_processes=cfg.num_processes, process_id=cfg.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"jax.distributed.initialize failed (check --coordinator-address, "
                      f"--num-processes, --process-id or the launcher's environment): {e}"
                      ) from None
