"""LLaMA pretraining with osd_jax optimizers (see train/README.md)."""

from train import xla_cpu

# XLA:CPU's default (concurrency-optimized) scheduler can hang a scanned train step that holds
# LAPACK calls beside its layer loops (train/xla_cpu.py); its memory-minimising scheduler runs
# it. XLA reads the choice only from XLA_FLAGS, when the first backend starts, so it is made here,
# when `train` is imported: before any jax computation when `import train` comes first (the
# command lines, benchmarks/__init__.py and tests/conftest.py see to it). Your XLA_FLAGS setting
# wins; GPU and TPU ignore the option.
XLA_CPU_WORKAROUND = xla_cpu.apply()
