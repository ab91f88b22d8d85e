"""Compiling for a GPU that is not there: XLA:GPU's own program and buffers, on a CPU host.

``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`` describes
a GPU to XLA (its ``stream_executor.GpuTargetConfigProto``: compute capability, memory, cores,
the cuDNN and CUDA versions) and returns devices that ``jax.jit(...).lower(...).compile()`` can
compile for without a GPU or a driver. Only the CUDA PJRT plugin must be installed (it brings
XLA:GPU, ptxas and libdevice)::

  pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"

The compiled program's ``memory_analysis()`` is XLA:GPU's: bf16 dots stay bf16, fusions and
layouts are the GPU's, so its figure is what a GPU run would allocate for the program (apart
from the runtime's own workspace: cuBLAS/cuDNN scratch and the allocator's fragmentation).
``benchmarks.memory --target h100`` uses it. Nothing is executed.

Example::

  devices = gpu_targets.devices("h100")            # needs jax-cuda12-plugin
  mesh = jax.sharding.Mesh(devices, ("data",))
"""

from __future__ import annotations

from typing import Any

#: XLA's description of each GPU (``GpuTargetConfigProto`` text): the SXM parts' published
#: figures (SMs, HBM bytes as the CUDA runtime reports them, bandwidth, L2, clock). XLA:GPU reads
#: the compute capability, the shared-memory and register limits (fusion and tiling choices),
#: the cuDNN/CUDA versions (which kernels exist) and the memory size: its latency-hiding
#: scheduler orders the program to stay within the device's memory, trading overlap for memory
#: when the limit is near (7B osd_adamw r = 1024 compact and offloaded: 20.87 GiB told 80 GB,
#: 20.77 told 24 GB; ``memory_bytes`` below, ``benchmarks.memory --target-memory``).
TARGETS: dict[str, dict[str, Any]] = {
    "h100": {"description": "NVIDIA H100 80GB HBM3", "core_count": 132,
             "device_memory_size": 84_929_347_584, "memory_bandwidth": 3_352_320_000_000,
             "l2_cache_size": 52_428_800, "clock_rate_ghz": 1.98},
    "h200": {"description": "NVIDIA H200", "core_count": 132,
             "device_memory_size": 150_754_820_096, "memory_bandwidth": 4_800_000_000_000,
             "l2_cache_size": 52_428_800, "clock_rate_ghz": 1.98},
}


def target_config(name: str, memory_bytes: int | None = None) -> str:
  """The ``GpuTargetConfigProto`` text of a Hopper GPU in :data:`TARGETS`, with
  ``memory_bytes`` of memory instead of its own (e.g. the 24 GB of a smaller card)."""
  if name not in TARGETS:
    raise ValueError(f"--target {name!r}: choose one of {', '.join(TARGETS)} (or local)")
  t = dict(TARGETS[name])
  if memory_bytes:
    t["device_memory_size"] = int(memory_bytes)
  return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {t['core_count']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {t['memory_bandwidth']}
  l2_cache_size: {t['l2_cache_size']}
  clock_rate_ghz: {t['clock_rate_ghz']}
  device_memory_size: {t['device_memory_size']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{t['description']}"
"""


def devices(name: str, count: int = 1, memory_bytes: int | None = None) -> list:
  """``count`` compile-only devices of GPU ``name`` (one host), for a ``jax.sharding.Mesh``;
  ``memory_bytes``: :func:`target_config`'s."""
  import jax
  from jax.experimental import topologies

  config = target_config(name, memory_bytes)
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=config,
                                            topology=f"1x1x{count}")
  except Exception as e:  # noqa: BLE001 - the plugin is missing or too old
    raise RuntimeError(
        f"--target {name}: compiling for a GPU without one needs the CUDA PJRT plugin of this "
        f"jax: pip install \"jax-cuda12-plugin[with-cuda]=={jax.__version__}\" ({e})") from e
  return list(topology.devices)[:count]
