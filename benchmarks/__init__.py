"""Benchmarks for osd_jax: optimizer update cost, projector cost, train-step overhead and quality.

Each script runs as ``python -m benchmarks.<name> [flags]`` and as ``main(argv)`` from Python;
see ``benchmarks/RESULTS.md`` for the latest numbers and the exact commands.
"""

import os

# On CPU, jnp.linalg.svd runs LAPACK from the OpenBLAS that scipy ships. Its worker threads spin
# while XLA's own thread pool is busy, and on a 2-core machine that made one 512×512 SVD take
# 2.7 s instead of 35 ms. One OpenBLAS thread gives the SVD baselines (GaLore's refresh step, OSD's
# P₀) their fair, fast timing. Set before jax loads LAPACK; a value given by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The trainer's XLA:CPU scheduler workaround (train/xla_cpu.py: the default scheduler can hang a
# scanned train step), applied before any benchmark starts a jax backend: the option is read only
# then, and every script records its environment (jax.devices()) before it builds a trainer.
from train import xla_cpu  # noqa: E402

xla_cpu.apply()
