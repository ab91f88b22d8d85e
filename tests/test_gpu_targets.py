"""Compiling the train step for a GPU that is not there (benchmarks/gpu_targets.py).

The compile-only tests need the CUDA PJRT plugin (``pip install "jax-cuda12-plugin[with-cuda]"``
of this jax's version, 5 GB with the CUDA libraries); without it they are skipped, and the error
the benchmark gives is checked instead.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from benchmarks import gpu_targets

HAVE_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


def test_target_config_describes_a_hopper_gpu():
  text = gpu_targets.target_config("h100")
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert "device_memory_size: 84929347584" in text
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  with pytest.raises(ValueError, match="--target 'a100'"):
    gpu_targets.target_config("a100")
  # --target-memory: the same GPU told it has 24 GB (XLA:GPU's scheduler keeps within it)
  small = gpu_targets.target_config("h100", memory_bytes=24 * 10**9)
  assert "device_memory_size: 24000000000" in small and "major: 9 minor: 0" in small
  assert gpu_targets.TARGETS["h100"]["device_memory_size"] == 84929347584  # left as it was


def test_target_memory_needs_a_gpu_target():
  from benchmarks import memory

  args = memory.parse_args(["--target", "h100", "--target-memory", "22.35"])
  assert args.target_memory == 22.35
  for bad in (["--target-memory", "22"], ["--target", "h100", "--target-memory", "0"]):
    with pytest.raises(SystemExit):
      memory.parse_args(bad)


@pytest.mark.skipif(HAVE_PLUGIN, reason="the CUDA plugin is installed")
def test_without_the_plugin_the_error_says_what_to_install():
  with pytest.raises(RuntimeError, match="pip install \"jax-cuda12-plugin"):
    gpu_targets.devices("h100")


def _compile_for_h100(*config):
  """The compact fused 60M step (2 blocks, 4 × 128 tokens) compiled for an H100."""
  from benchmarks import memory
  from train import trainer
  from train.config import validate
  from train.model import PRESETS

  args = memory.parse_args(["--preset", "60m", "--optimizer", "osd_adamw", "--rank", "64",
                            "--shape", "4x128", "--remat", "full", "--param-dtype", "bfloat16",
                            "--state-dtype", "int8", "--fused-update", "on", "--target", "h100",
                            "--model-override", "n_layers=2", *config])
  cell, name = next(memory.cells(args))
  cfg = memory.train_config(cell, name)
  validate(cfg)
  setup = trainer.build(cfg, PRESETS["60m"].vocab_size, devices=memory.target_devices(cell))
  assert "H100" in setup.mesh.devices.flat[0].device_kind
  return setup, setup.train_step.lower(setup.abstract_state,
                                       memory.abstract_batch(setup, 4, 128)).compile()


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax-cuda12-plugin")
def test_offloaded_residuals_live_in_host_memory_on_a_gpu():
  """--offload-residuals: the stacked block inputs (2 × 4 × 128 × 512 bf16 = 1 MiB) move from the
  device's temporaries to the host's; unset, a GPU's fused step with remat full offloads them."""
  from benchmarks import common

  _, kept = _compile_for_h100("--config", "offload_residuals=false")
  _, offloaded = _compile_for_h100("--config", "offload_residuals=true")
  _, default = _compile_for_h100()
  residuals = 2 * 4 * 128 * 512 * 2
  m_kept, m_off = common.memory_analysis(kept), common.memory_analysis(offloaded)
  assert m_kept["host_temp_size_in_bytes"] == 0
  assert m_off["host_temp_size_in_bytes"] >= residuals
  assert m_off["temp_size_in_bytes"] <= m_kept["temp_size_in_bytes"] - residuals // 2
  assert common.memory_analysis(default) == m_off


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax-cuda12-plugin")
def test_fused_loop_never_relays_a_whole_weight_stack_on_a_gpu():
  """XLA:GPU's layout assignment gave the carried w2 stack [L, ffn, dim] the layout of its
  backward dot's operand and transposed the whole stack in and out of the fused loop (2.7 GiB
  at 7B); the loop now carries each stack flattened per layer. No instruction of the compiled
  step may have a weight stack's dims in another order."""
  setup, compiled = _compile_for_h100()
  stacks = {tuple(x.shape) for x in __import__("jax").tree.leaves(setup.abstract_state.params)
            if x.ndim == 3}
  assert (2, 1376, 512) in stacks  # w2, the stack that was relaid
  arrays = {(tuple(int(d) for d in dims.split(",")), layout)
            for dims, layout in re.findall(r"bf16\[(\d+,\d+,\d+)\](\{[\d,]+\})",
                                           compiled.as_text())}
  relaid = {(s, layout) for s, layout in arrays for w in stacks
            if sorted(s) == sorted(w) and (s not in stacks or layout != "{2,1,0}")}
  assert not relaid, f"weight stacks relaid in the compiled step: {relaid}"
