"""Optimizer-state memory: measured (:func:`state_bytes`) and closed form
(:func:`expected_state_bytes`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from osd_jax.dimension_numbers import WeightDimensionNumbers, resolve_layouts

OPTIMIZERS = ("adamw", "osd_adamw", "osd_lion", "galore_adamw")
_COUNT = 4  # one int32 step counter


def state_bytes(state: Any) -> int:
  """Bytes held by every array leaf of an optimizer state (arrays or ``jax.eval_shape`` output)."""
  total = 0
  for x in jax.tree.leaves(state):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return total


def expected_state_bytes(
    params: Any,
    rank: int = 128,
    *,
    optimizer: str = "osd_adamw",
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mu_dtype: Any = None,
    projector_dtype: Any = jnp.float32,
    side: str = "smaller",
    learning_rate_is_schedule: bool = False,
) -> int:
  r"""Closed-form optimizer-state bytes of one of the aliases on ``params``.

  Per projected matrix (batch size B, G' ∈ ℝ^{s×L}, rank r), with b the param itemsize,
  b_μ the first-moment itemsize and b_P the projector's:

      osd_adamw:     B·r·L·(b_μ + b)  +  3·B·s·r·b_P  +  4·B   (Adam on P keeps a count)
      osd_lion:      B·r·L·b_μ        +  3·B·s·r·b_P  +  4·B
      galore_adamw:  B·r·L·(b_μ + b)  +    B·s·r·b_P
      adamw:         size·(b_μ + b)   for every leaf

  Unprojected leaves cost size·(b_μ + b) (Adam) or size·b_μ (Lion).  Step counters add 4
  bytes each: the subspace transform's, the inner optimizer's, and the learning-rate
  schedule's when ``learning_rate_is_schedule``.  ``side`` must be "smaller" or "larger".

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> params = {"w": jnp.zeros((64, 256))}
    >>> osd_jax.expected_state_bytes(params, rank=8)  # 2·8·256·4 + 3·64·8·4 + 4 + 4 + 4
    22540
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
  if side not in ("smaller", "larger", "reference"):
    raise ValueError("expected_state_bytes supports side='smaller', 'larger' or 'reference' only.")
  leaves = jax.tree.leaves(params)
  if optimizer == "adamw":
    layouts = [None] * len(leaves)
  else:
    layouts, _ = resolve_layouts(params, weight_dimension_numbers, rank, side)
  pb = jnp.dtype(projector_dtype).itemsize
  total = _COUNT * (2 if optimizer != "adamw" else 1)  # subspace count + inner count
  if learning_rate_is_schedule:
    total += _COUNT
  for x, layout in zip(leaves, layouts):
    b = jnp.dtype(x.dtype).itemsize
    b_mu = jnp.dtype(mu_dtype).itemsize if mu_dtype is not None else b
    slot_bytes = b_mu if optimizer == "osd_lion" else b_mu + b
    if layout is None:
      total += math.prod(x.shape) * slot_bytes
      continue
    batch = math.prod(layout.batch_shape)
    total += batch * rank * layout.L * slot_bytes
    if optimizer == "galore_adamw":
      total += batch * layout.s * rank * pb
    else:
      total += batch * (3 * layout.s * rank * pb + _COUNT)
  return total
