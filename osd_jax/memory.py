"""Optimizer-state memory: measured (:func:`state_bytes`) and closed form
(:func:`expected_state_bytes`)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from osd_jax import quantization
from osd_jax.dimension_numbers import WeightDimensionNumbers, resolve_layouts
from osd_jax.projectors import PROJECTOR_OPTIMIZERS

OPTIMIZERS = ("adamw", "osd_adamw", "osd_lion", "galore_adamw")
_COUNT = 4  # one int32 step counter


def state_bytes(state: Any) -> int:
  """Bytes held by every array leaf of an optimizer state (arrays or ``jax.eval_shape`` output)."""
  total = 0
  for x in jax.tree.leaves(state):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
      total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return total


def moment_bytes(shape: tuple[int, ...], state_dtype: str | None, dtype: Any) -> int:
  """Bytes of one optimizer moment of ``shape``: in ``state_dtype`` (``"int8"``, ``"float8"``,
  ``"int8_dynamic"``: a byte per element plus a float32 scale per block of 256 along the last
  axis), or ``dtype`` when None."""
  size = math.prod(shape)
  if state_dtype in quantization.EIGHT_BIT:
    return size + 4 * math.prod(quantization.scale_shape(tuple(shape)))
  return size * jnp.dtype(dtype if state_dtype is None else state_dtype).itemsize


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
    state_dtype: Any = None,
    projector_optimizer: str = "adam",
) -> int:
  r"""Closed-form optimizer-state bytes of one of the aliases on ``params``.

  Per projected matrix (batch size B, G' ∈ ℝ^{s×L}, rank r), with M(shape) the bytes of one
  moment of that shape (:func:`moment_bytes`: b_μ or b per element, or ``state_dtype``'s) and
  b_P the projector's itemsize:

      osd_adamw:     B·(M_μ(r×L) + M(r×L))  +  B·s·r·b_P  +  B·S_P
      osd_lion:      B·M_μ(r×L)             +  B·s·r·b_P  +  B·S_P
      galore_adamw:  B·(M_μ(r×L) + M(r×L))  +  B·s·r·b_P
      adamw:         M_μ + M of every leaf

  with S_P the projector optimizer's state (``projector_optimizer``, as
  :func:`osd_jax.projectors.projector_optimizer`): Adam 2·M(s×r) + 4 (its count), Lion
  M(s×r) + 4, Adafactor 4·(s + r + 1) + 4 (float32 row and column statistics, optax's one-element
  placeholder, its count).

  Unprojected leaves cost M_μ + M (Adam) or M_μ (Lion).  Step counters add 4 bytes each: the
  subspace transform's, the inner optimizer's, and the learning-rate schedule's when
  ``learning_rate_is_schedule``.  ``side``: "smaller", "larger" or "reference" (as
  :func:`osd_jax.dimension_numbers.resolve_layouts`).

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> params = {"w": jnp.zeros((64, 256))}
    >>> osd_jax.expected_state_bytes(params, rank=8)  # 2·8·256·4 + 3·64·8·4 + 4 + 4 + 4
    22540
    >>> # moments: a byte per element + a float32 scale per block of 256 (P stays float32):
    >>> # 2·(8·256 + 8·4) + 64·8·4 + 2·(64·8 + 64·4) + 4 + 4 + 4
    >>> osd_jax.expected_state_bytes(params, rank=8, state_dtype="int8")
    7756
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
  if side not in ("smaller", "larger", "reference"):
    raise ValueError("expected_state_bytes supports side='smaller', 'larger' or 'reference' only.")
  state_dtype = quantization.check_state_dtype(state_dtype)
  if projector_optimizer not in PROJECTOR_OPTIMIZERS:
    raise ValueError(f"projector_optimizer must be one of {', '.join(PROJECTOR_OPTIMIZERS)}, "
                     f"got {projector_optimizer!r}.")
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
    dtype = jnp.dtype(x.dtype)
    mu = dtype if mu_dtype is None else jnp.dtype(mu_dtype)

    def moments(shape, dtype=dtype, mu=mu):  # the inner optimizer's slots of this shape
      first = moment_bytes(shape, state_dtype, mu)
      return first if optimizer == "osd_lion" else first + moment_bytes(shape, state_dtype, dtype)

    if layout is None:
      total += moments(tuple(x.shape))
      continue
    batch = math.prod(layout.batch_shape)
    total += batch * moments((rank, layout.L))
    total += batch * layout.s * rank * pb  # P
    if optimizer != "galore_adamw":  # P's optimizer: its moments (in P's dtype) and a count
      if projector_optimizer == "adafactor":
        p_state = 4 * (layout.s + rank + 1)
      else:
        n_moments = 2 if projector_optimizer == "adam" else 1
        p_state = n_moments * moment_bytes((layout.s, rank), state_dtype, projector_dtype)
      total += batch * (p_state + _COUNT)
  return total
