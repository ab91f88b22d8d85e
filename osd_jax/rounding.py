"""Stochastic rounding: low-precision numbers that keep small updates, on average.

Adding an update u to a bfloat16 weight w rounds w + u to the nearest bfloat16, which has 8
significant bits: once |u| is below half the spacing of the numbers around w (2⁻⁹·|w|), the
update is lost, every step. Stochastic rounding rounds up or down at random, with the
probability that makes the result exact on average:

    SR(x) = ⌈x⌉ with probability (x − ⌊x⌋)/(⌈x⌉ − ⌊x⌋), else ⌊x⌋      (E[SR(x)] = x),

where ⌊x⌋, ⌈x⌉ are the neighbouring numbers of the target dtype. For bfloat16, which is float32
with the low 16 bits dropped, that is: add 16 uniform random bits to the low half of x's float32
bits and drop them (the carry rounds up exactly with that probability).

The random bits come from a counter-based hash of (seed, element index), not from a PRNG key
per element: they cost a few integer operations per element on any backend, and the same seed
gives the same bits whether an array is rounded whole or a slice at a time (``offset``: the
slice's first element's index in the whole, row-major) — so a stacked leaf rounds alike in the
trainer's fused update (one layer at a time) and unfused (the whole stack).

Example:
  >>> import jax.numpy as jnp
  >>> from osd_jax import rounding
  >>> w = jnp.full((4096,), 1.0, jnp.bfloat16)
  >>> u = jnp.full((4096,), 1e-4)  # far below bfloat16's spacing at 1.0 (2⁻⁷)
  >>> bool(jnp.all((w + u.astype(jnp.bfloat16)) == 1.0))  # round to nearest: lost
  True
  >>> new = rounding.stochastic_round(w.astype(jnp.float32) + u, jnp.bfloat16, seed=0)
  >>> abs(float(jnp.mean(new.astype(jnp.float32))) - 1.0001) < 3e-5  # kept, on average
  True
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _mix(x: jax.Array) -> jax.Array:
  """A 32-bit integer finaliser (xor-shift-multiply): every input bit reaches every output
  bit."""
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def combine_seeds(*parts) -> jax.Array:
  """One uint32 seed from several integers (Python ints or traced scalars)."""
  seed = jnp.uint32(0x2545F491)
  for part in parts:
    part = jnp.asarray(part).astype(jnp.uint32) if not isinstance(part, int) else \
        jnp.uint32(part & 0xFFFFFFFF)
    seed = _mix(seed ^ (part + _GOLDEN + (seed << 6) + (seed >> 2)))
  return seed


def path_seed(path: str) -> int:
  """A stable 32-bit number for a tree path (``jax.tree_util.keystr``), for per-leaf seeds."""
  return zlib.crc32(path.encode())


def uniform_bits(shape, seed, offset=0) -> jax.Array:
  """uint32 bits, uniform, for each element of an array of ``shape``: a hash of (``seed``, the
  element's row-major index + ``offset``)."""
  size = int(np.prod(shape, dtype=np.int64))
  # iota(size) alone is loop-invariant: XLA hoists it out of a layer loop and holds it, a uint32
  # per element of the slice, for the whole loop (at 7B, 0.47 GiB through every block's backward
  # pass and update). So the offset is added to it first, before the reshape, and passed through
  # a barrier with the seed, so that neither a constant offset (0) is folded away nor the sum is
  # loop-invariant. No value changes.
  offset, seed = jax.lax.optimization_barrier(
      (jnp.asarray(offset).astype(jnp.uint32), jnp.asarray(seed).astype(jnp.uint32)))
  index = (jax.lax.iota(jnp.uint32, size) + offset).reshape(shape)
  return _mix(_mix(index ^ seed) + _GOLDEN)


def uniform(shape, seed, offset=0) -> jax.Array:
  """float32 uniform in [0, 1) (24 random bits) per element, as :func:`uniform_bits`."""
  return (uniform_bits(shape, seed, offset) >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)


def stochastic_round(x: jax.Array, dtype: Any, seed, offset=0) -> jax.Array:
  """``x`` rounded to ``dtype`` stochastically (unbiased; see the module docstring).

  bfloat16: by adding random low bits to float32. Other float dtypes narrower than ``x`` (float16,
  float8): by choosing between the two neighbours. A dtype as wide as ``x``'s or wider: a cast.
  Values that ``dtype`` holds exactly (also ±0, ±inf, NaN) are returned as they are.
  """
  dtype = jnp.dtype(dtype)
  x = jnp.asarray(x)
  if dtype.itemsize >= x.dtype.itemsize or not jnp.issubdtype(dtype, jnp.floating):
    return x.astype(dtype)
  x = x.astype(jnp.float32)
  if dtype == jnp.bfloat16:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = uniform_bits(x.shape, seed, offset) >> 16
    rounded = (bits + noise) & np.uint32(0xFFFF0000)
    # NaNs keep their payload's quiet bit: round them (and infinities) by truncation alone
    rounded = jnp.where(jnp.isfinite(x), rounded, bits & np.uint32(0xFFFF0000))
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)
  nearest = x.astype(dtype)
  back = nearest.astype(jnp.float32)
  # the other neighbour: one step of dtype away from `nearest`, on x's side of it
  other = _step(nearest, up=back < x)
  gap = other.astype(jnp.float32) - back
  p = jnp.where(gap != 0, (x - back) / jnp.where(gap != 0, gap, 1.0), 0.0)
  pick = uniform(x.shape, seed, offset) < p
  return jnp.where(jnp.isfinite(x) & pick, other, nearest)


def _step(v: jax.Array, up: jax.Array) -> jax.Array:
  """The next number of ``v``'s (narrow float) dtype toward +∞ (``up``) or −∞, by its bits (as
  ``nextafter``, which float8 dtypes lack): sign-magnitude integers count the numbers in order."""
  width = jnp.dtype(v.dtype).itemsize * 8
  uint = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[width]
  bits = jax.lax.bitcast_convert_type(v, uint)
  sign_bit = np.array(1 << (width - 1), dtype=uint)
  negative = (bits & sign_bit) != 0
  magnitude = bits & ~sign_bit
  zero = magnitude == 0
  away = (up & ~negative) | (~up & negative)  # away from zero: a larger magnitude
  one = np.array(1, dtype=uint)
  magnitude = jnp.where(away | zero, magnitude + one, magnitude - one)
  negative = jnp.where(zero, ~up, negative)
  return jax.lax.bitcast_convert_type(jnp.where(negative, magnitude | sign_bit, magnitude),
                                      v.dtype)


def apply_updates(params: Any, updates: Any, seed, *, stochastic: bool = True,
                  layer_index=None) -> Any:
  """``optax.apply_updates`` that rounds each new weight into its dtype stochastically.

      w ← SR(w + u)   (in float32, then to w's dtype; float32 weights: w + u exactly as optax)

  Deterministic in ``seed`` (e.g. ``rounding.combine_seeds(run_seed, step)``), so a resumed run
  draws the same bits; each leaf draws its own (its path's hash joins the seed). With
  ``layer_index`` every leaf is one layer's slice of a stack (:mod:`osd_jax.layerwise`) and draws
  the bits it draws in the whole stack.

  Example:
    >>> import jax.numpy as jnp
    >>> from osd_jax import rounding
    >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
    >>> new = rounding.apply_updates(params, {"w": jnp.full(3, 1e-3)}, seed=7)
    >>> new["w"].dtype
    dtype(bfloat16)
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  update_leaves = treedef.flatten_up_to(updates)
  out = []
  for (path, w), u in zip(flat, update_leaves):
    if u is None:
      out.append(w)
      continue
    total = jnp.asarray(w).astype(jnp.float32) + jnp.asarray(u).astype(jnp.float32)
    if stochastic:
      leaf_seed = combine_seeds(seed, path_seed(jax.tree_util.keystr(path)))
      offset = 0 if layer_index is None else (
          jnp.asarray(layer_index).astype(jnp.uint32) * np.uint32(total.size))
      out.append(stochastic_round(total, jnp.asarray(w).dtype, leaf_seed, offset))
    else:
      out.append(total.astype(jnp.asarray(w).dtype))
  return treedef.unflatten(out)
