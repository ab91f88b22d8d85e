"""8-bit optimizer state: block-wise quantization with a scale per block of 256.

An optimizer moment x (float32) is stored as a :class:`Quantized`: one byte per element (an index
into a sorted table of 256 values in [−1, 1], or [0, 1] for a non-negative moment) and one
float32 scale per block of :data:`BLOCK` consecutive elements along the last axis (the block's
largest magnitude):

    x ≈ table[code] · scale[block],     scale = max |x| over the block,

so each block uses the whole table, however large or small its values. The code is chosen by
stochastic rounding between the two table values around x/scale (unbiased, see
:mod:`osd_jax.rounding`): a moment that moves by less than one table step per update still
moves on average (round to nearest would freeze Adam's second moment, which changes by 0.1%
per step).

Two tables (``scheme``):

* ``"dynamic"`` (the default): decades from 1 down to 10⁻⁷ with more values in the upper
  decades (64 of the signed table's 127 magnitudes lie in [0.1, 1], 2–3 % apart at 0.1 and 0.7 %
  at 1), as in Dettmers et al.'s 8-bit optimizers; the non-negative table spends the sign bit on
  twice as many values.
* ``"float8"``: the values of float8 e4m3 (3 mantissa bits: 6–12 % apart in every binade,
  down to 2⁻⁹/448 ≈ 4·10⁻⁶); a non-negative moment uses its 128 non-negative values.

benchmarks/RESULTS.md §9 compares them (round-trip error on real Adam moments, and training);
the codes' shape is the moment's, so the state shards as the moment would.

Example:
  >>> import jax.numpy as jnp
  >>> from osd_jax import quantization
  >>> x = jnp.linspace(-1.0, 1.0, 1000).reshape(2, 500)
  >>> q = quantization.quantize(x, signed=True, seed=0)
  >>> q.codes.dtype, q.codes.shape, q.scale.shape
  (dtype('uint8'), (2, 500), (2, 2))
  >>> float(jnp.max(jnp.abs(quantization.dequantize(q) - x))) < 0.05
  True
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from osd_jax import rounding

BLOCK = 256
SCHEMES = ("dynamic", "float8")
FLOAT8_MAX = 448.0  # e4m3fn's largest finite value: the table is its values / 448


def _dynamic_magnitudes(per_decade: list[int]) -> np.ndarray:
  """Positive table values: decade k (from the smallest) holds ``per_decade[k]`` values, evenly
  spaced over (0.1, 1] × 10^-(n-1-k), the decade's largest value exactly at its top."""
  n = len(per_decade)
  out = []
  for k, count in enumerate(per_decade):
    top = 10.0 ** -(n - 1 - k)
    out += [top * (0.1 + 0.9 * j / count) for j in range(1, count + 1)]
  return np.asarray(out, np.float64)


@cache
def table(scheme: str, signed: bool) -> np.ndarray:
  """The sorted float32 table of a scheme (at most 256 values, 0 and the largest magnitude 1
  among them)."""
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
  if scheme == "dynamic":
    if signed:  # 127 magnitudes over 7 decades: 10^-6 ... 1
      mags = _dynamic_magnitudes([1, 2, 4, 8, 16, 32, 64])
      values = np.concatenate([-mags[::-1], [0.0], mags])
    else:  # 255 magnitudes over the same decades
      values = np.concatenate([[0.0], _dynamic_magnitudes([2, 4, 8, 16, 32, 64, 129])])
  else:
    every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    every = np.unique(every[np.isfinite(every)])  # one zero, sorted
    values = every / np.max(every) + 0.0  # + 0.0: the zero is +0.0
    if not signed:
      values = values[values >= 0]
  values = np.asarray(values, np.float32)
  assert len(values) <= 256 and np.all(np.diff(values) > 0) and values[-1] == 1.0
  return values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
  """A float32 array stored in 8 bits: ``table[codes] · scale`` per block (see the module)."""

  codes: jax.Array  # uint8, the array's shape
  scale: jax.Array  # float32, shape[:-1] + (ceil(shape[-1] / BLOCK),)
  scheme: str = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def dtype(self):  # the dtype it stands for
    return jnp.dtype(jnp.float32)


def is_quantized(x) -> bool:
  return isinstance(x, Quantized)


def _blocks(x: jax.Array) -> tuple[jax.Array, int]:
  """``x`` padded along its last axis to whole blocks, as (..., n_blocks, BLOCK)."""
  n = x.shape[-1] if x.ndim else 1
  x = x.reshape(x.shape or (1,))
  pad = (-n) % BLOCK
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + (x.shape[-1] // BLOCK, BLOCK)), n


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the scales of an array of ``shape``."""
  shape = tuple(shape) or (1,)
  return shape[:-1] + (math.ceil(shape[-1] / BLOCK),)


def quantize(x: jax.Array, *, signed: bool, scheme: str = "dynamic", seed=0,
             offset=0) -> Quantized:
  """``x`` (float) in 8 bits, each code chosen by stochastic rounding (deterministic in
  ``seed``; ``offset`` as in :func:`osd_jax.rounding.uniform_bits`)."""
  values = jnp.asarray(table(scheme, signed))
  shape = tuple(x.shape)
  blocks, n = _blocks(jnp.asarray(x, jnp.float32))
  scale = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(scale > 0, scale, 1.0)
  y = jnp.clip(blocks / safe[..., None], values[0], 1.0)
  if scheme == "float8":  # the codes are e4m3's own bits: elementwise, no table search
    z = _unblock(y * FLOAT8_MAX, n, shape)
    f8 = rounding.stochastic_round(z, jnp.float8_e4m3fn, seed, offset)
    return Quantized(codes=jax.lax.bitcast_convert_type(f8, jnp.uint8),
                     scale=scale.astype(jnp.float32), scheme=scheme, signed=signed)
  hi = jnp.clip(jnp.searchsorted(values, y, side="left"), 1, len(values) - 1)
  lo_value, hi_value = values[hi - 1], values[hi]
  p = jnp.clip((y - lo_value) / (hi_value - lo_value), 0.0, 1.0)
  # the noise of each element is its own, by its index in x (a slice rounds as the whole would)
  u, _ = _blocks(rounding.uniform(shape, seed, offset))
  codes = _unblock(jnp.where(u < p, hi, hi - 1).astype(jnp.uint8), n, shape)
  return Quantized(codes=codes, scale=scale.astype(jnp.float32), scheme=scheme, signed=signed)


def _unblock(blocks: jax.Array, n: int, shape: tuple[int, ...]) -> jax.Array:
  """The inverse of :func:`_blocks`: (..., n_blocks, BLOCK) back to ``shape``."""
  return blocks.reshape(blocks.shape[:-2] + (-1,))[..., :n].reshape(shape)


def dequantize(q: Quantized) -> jax.Array:
  """The float32 array that ``q`` stands for."""
  if q.scheme == "float8":
    values = jax.lax.bitcast_convert_type(q.codes, jnp.float8_e4m3fn).astype(jnp.float32)
    blocks, n = _blocks(values / FLOAT8_MAX)
  else:
    blocks, n = _blocks(jnp.asarray(table(q.scheme, q.signed))[q.codes.astype(jnp.int32)])
  return _unblock(blocks * q.scale[..., None], n, q.codes.shape)


# --------------------------------------------------------------------------- moment storage

STATE_DTYPES = ("float32", "bfloat16", "int8", "float8", "int8_dynamic")
#: the 8-bit state dtypes and their tables: ``int8`` (and its synonym ``float8``) e4m3's values,
#: ``int8_dynamic`` the dynamic map of 8-bit optimizers. e4m3 was chosen by measurement
#: (benchmarks/RESULTS.md §9): its codes are computed elementwise (the table needs a search and a
#: gather per element: +1 GiB of temporaries at 7B) and it keeps a block's small elements closer
#: (tests/test_compact.py::test_eight_bit_adam_keeps_small_elements_of_a_block).
EIGHT_BIT = {"int8": "float8", "float8": "float8", "int8_dynamic": "dynamic"}


def check_state_dtype(state_dtype) -> str | None:
  """None (the gradients' dtype, optax's default) or one of :data:`STATE_DTYPES`: ``int8`` and
  ``float8`` (e4m3 codes) and ``int8_dynamic`` (the dynamic map) are 8-bit codes with a float32
  scale per block."""
  if state_dtype is None:
    return None
  name = jnp.dtype(state_dtype).name if not isinstance(state_dtype, str) else state_dtype
  if name not in STATE_DTYPES:
    raise ValueError(f"state_dtype must be one of {STATE_DTYPES} (or None: the gradients' "
                     f"dtype), got {state_dtype!r}.")
  return name


def zeros(like: jax.Array, state_dtype: str | None, *, signed: bool):
  """A zero moment shaped like ``like`` in the storage ``state_dtype``."""
  if state_dtype in EIGHT_BIT:
    scheme = EIGHT_BIT[state_dtype]
    shape = tuple(jnp.shape(like))
    return Quantized(codes=jnp.full(shape, _zero_code(scheme, signed), jnp.uint8),
                     scale=jnp.zeros(scale_shape(shape), jnp.float32), scheme=scheme,
                     signed=signed)
  dtype = jnp.result_type(like) if state_dtype is None else jnp.dtype(state_dtype)
  return jnp.zeros(jnp.shape(like), dtype)


def _zero_code(scheme: str, signed: bool) -> int:
  if scheme == "float8":
    return 0  # +0.0's bits
  return int(np.searchsorted(table(scheme, signed), 0.0))


def load(stored) -> jax.Array:
  """A stored moment as float32 (or as it is, when stored in its own float dtype)."""
  if is_quantized(stored):
    return dequantize(stored)
  return stored


def store(x: jax.Array, like, *, seed, offset=0):
  """``x`` in the storage of ``like`` (a moment as stored): 8 bits, or a narrower float by
  stochastic rounding, or ``like``'s dtype by a cast when it is not narrower."""
  if is_quantized(like):
    return quantize(x, signed=like.signed, scheme=like.scheme, seed=seed, offset=offset)
  return rounding.stochastic_round(x, like.dtype, seed, offset)
