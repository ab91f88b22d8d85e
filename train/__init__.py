"""LLaMA pretraining with osd_jax optimizers (see train/README.md)."""

from train import xla_cpu  # noqa: F401  (sets an XLA:CPU flag before any backend starts)
