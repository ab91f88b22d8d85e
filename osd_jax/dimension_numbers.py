"""Which axes of a weight form the matrix that a subspace optimizer projects.

A weight of any rank is viewed as a stack of matrices G (m × n): the *reduction* axes
(flattened, in order) give m, the *output* axes give n, and every other axis is a
*batch* axis (scanned layers, stacked experts) handled independently with ``jax.vmap``.

The projector P spans one side of G. Internally every projected gradient is written as

    G' = G     (s = m)   or   G' = Gᵀ   (s = n),        G' ∈ ℝ^{s × L},

with P ∈ ℝ^{s × r}; which side is chosen by ``side`` (docs/design.md §3: the smaller one,
ties project the columns).  A matrix is left unprojected when ``rank >= min(m, n)``; the
optimizer's ``init`` then emits one :class:`FullRankWarning` naming such matrices (silence it with
``warnings.simplefilter("ignore", osd_jax.FullRankWarning)``).

Without ``weight_dimension_numbers`` only 2-D leaves are projected: which axis of a 3-D or 4-D
leaf stacks layers or holds a convolution window cannot be guessed, so such leaves get the full-rank
inner optimizer and ``init`` names them in one :class:`UnprojectedWarning` with the fix, e.g.
``weight_dimension_numbers={"w": DimensionNumbers(reduction_axis=1, output_axis=2)}`` for layers
stacked on axis 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class DimensionNumbers(NamedTuple):
  """Axes of a weight that form the projected matrix (as ``optax.contrib.MuonDimensionNumbers``).

  Attributes:
    reduction_axis: axis or axes contracted with the layer input (flattened into m).
    output_axis: axis or axes of the layer output (flattened into n).

  All remaining axes are batch axes. Example: an attention kernel of shape
  ``(embed, heads, head_dim)`` uses ``DimensionNumbers(0, (1, 2))``; scanned layers of
  shape ``(layers, d_in, d_out)`` use ``DimensionNumbers(1, 2)``.
  """

  reduction_axis: Sequence[int] | int = 0
  output_axis: Sequence[int] | int = 1


def is_dimension_numbers_leaf(x) -> bool:
  """A leaf of a params-shaped ``weight_dimension_numbers`` tree: a :class:`DimensionNumbers`
  or None (not projected). Pass it as ``is_leaf`` when mapping or flattening such a tree, since
  a :class:`DimensionNumbers` is a NamedTuple, which JAX would otherwise descend into."""
  return x is None or isinstance(x, DimensionNumbers)


WeightDimensionNumbers = (
    DimensionNumbers | Any | Callable[[Any], Any] | None
)

SIDES = ("smaller", "larger", "auto", "reference")


class FullRankWarning(UserWarning):
  """A matrix selected for projection is updated at full rank because ``rank >= min(m, n)``.

  Emitted once per distinct set of such matrices, when the optimizer state is initialised (not
  inside the update). To silence it: ``warnings.simplefilter("ignore", osd_jax.FullRankWarning)``;
  to make it an error: ``warnings.simplefilter("error", osd_jax.FullRankWarning)``.
  """


class UnprojectedWarning(UserWarning):
  """Leaves with ndim > 2 are updated at full rank because no ``weight_dimension_numbers`` says
  which of their axes form the matrix.

  Emitted once per distinct set of such leaves, when the optimizer state is initialised. Pass
  ``weight_dimension_numbers`` to project them (or to map them to None, which silences it), or
  ``warnings.simplefilter("ignore", osd_jax.UnprojectedWarning)``.
  """


class MatrixLayout(NamedTuple):
  """Static description of how one parameter leaf is projected (hashable, no arrays).

  ``batch_axes + reduction_axes + output_axes`` is the transpose that brings the leaf to
  ``(*batch, m, n)``; ``transpose`` says whether G' = Gᵀ (the projector spans n).
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  transpose: bool
  rank: int

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def m(self) -> int:
    return math.prod(self.shape[a] for a in self.reduction_axes)

  @property
  def n(self) -> int:
    return math.prod(self.shape[a] for a in self.output_axes)

  @property
  def s(self) -> int:
    """Rows of G' (the side P spans)."""
    return self.n if self.transpose else self.m

  @property
  def L(self) -> int:  # noqa: N802 - the paper's symbol
    """Columns of G' (the side the low-rank state keeps)."""
    return self.m if self.transpose else self.n

  @property
  def s_axes(self) -> tuple[int, ...]:
    """Axes of the parameter that make up the projected dimension s."""
    return self.output_axes if self.transpose else self.reduction_axes

  @property
  def L_axes(self) -> tuple[int, ...]:  # noqa: N802
    return self.reduction_axes if self.transpose else self.output_axes

  @property
  def projector_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.s, self.rank)

  @property
  def low_rank_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.rank, self.L)


def to_matrix(x: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Reshapes a parameter-shaped array to G' of shape ``(*batch, s, L)``."""
  perm = layout.batch_axes + layout.reduction_axes + layout.output_axes
  x = jnp.transpose(x, perm).reshape(layout.batch_shape + (layout.m, layout.n))
  return jnp.swapaxes(x, -1, -2) if layout.transpose else x


def from_matrix(y: jax.Array, layout: MatrixLayout) -> jax.Array:
  """Inverse of :func:`to_matrix`: ``(*batch, s, L)`` back to the parameter's shape."""
  if layout.transpose:
    y = jnp.swapaxes(y, -1, -2)
  perm = layout.batch_axes + layout.reduction_axes + layout.output_axes
  permuted_shape = tuple(layout.shape[a] for a in perm)
  inverse = tuple(sorted(range(len(perm)), key=lambda i: perm[i]))
  return jnp.transpose(y.reshape(permuted_shape), inverse)


def _normalize_axes(axes, ndim: int, what: str, path: str) -> tuple[int, ...]:
  if isinstance(axes, bool) or not isinstance(axes, (int, Sequence)):
    raise TypeError(
        f"weight_dimension_numbers: {what} for {path} must be an int or a sequence of "
        f"ints, got {axes!r}."
    )
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  if not axes:
    raise ValueError(
        f"weight_dimension_numbers: {what} for {path} is empty; give at least one axis.")
  out = []
  for a in axes:
    if isinstance(a, bool) or not isinstance(a, int):
      raise TypeError(f"weight_dimension_numbers: {what} for {path} has a non-int axis {a!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"weight_dimension_numbers: {what} axis {a} is out of range for {path} with "
          f"{ndim} dims; use an axis in [{-ndim}, {ndim})."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"weight_dimension_numbers: {what} for {path} repeats an axis: {axes}.")
  return tuple(out)


def choose_transpose(m: int, n: int, side: str, cost: Callable[[bool], int] | None = None) -> bool:
  """Whether G' = Gᵀ (P spans n) for a matrix G of shape (m, n).

  ``"smaller"`` (docs/design.md §3): P spans min(m, n), ties project the columns (transpose).
  ``"larger"``: P spans max(m, n), ties transpose.  ``"auto"``: the orientation whose state
  bytes ``cost(transpose)`` are smallest, ties fall back to ``"smaller"``.  ``"reference"``:
  the official PyTorch code's choice — the smaller side, ties project the reduction (input)
  side (an ``nn.Linear`` weight (out, in) with out ≥ in is projected on the right).
  """
  if side == "smaller":
    return not m < n
  if side == "reference":
    return m > n
  if side == "larger":
    return not m > n
  if side == "auto":
    assert cost is not None
    default = choose_transpose(m, n, "smaller")
    other = not default
    return other if cost(other) < cost(default) else default
  raise ValueError(f"side must be one of {SIDES}, got {side!r}.")


def make_layout(
    shape: tuple[int, ...],
    dimension_numbers: DimensionNumbers,
    rank: int,
    side: str = "smaller",
    path: str = "<leaf>",
    cost: Callable[[MatrixLayout], int] | None = None,
) -> MatrixLayout | None:
  """The :class:`MatrixLayout` of one leaf, or None when it is not projected (rank ≥ s)."""
  if not isinstance(dimension_numbers, DimensionNumbers):
    raise TypeError(
        f"weight_dimension_numbers for {path} must be an osd_jax.DimensionNumbers or None, "
        f"got {type(dimension_numbers).__name__}."
    )
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(
        f"weight_dimension_numbers: {path} has shape {shape}; only leaves with ndim >= 2 can "
        "be projected. Map it to None to give it the full-rank optimizer."
    )
  red = _normalize_axes(dimension_numbers.reduction_axis, ndim, "reduction_axis", path)
  out = _normalize_axes(dimension_numbers.output_axis, ndim, "output_axis", path)
  if set(red) & set(out):
    raise ValueError(
        f"weight_dimension_numbers for {path}: reduction_axis {red} and output_axis {out} "
        "overlap; they must be disjoint."
    )
  batch = tuple(a for a in range(ndim) if a not in red and a not in out)
  base = MatrixLayout(tuple(int(d) for d in shape), batch, red, out, False, int(rank))
  if rank >= min(base.m, base.n):
    return None
  layout_cost = None if cost is None else (lambda t: cost(base._replace(transpose=t)))
  return base._replace(transpose=choose_transpose(base.m, base.n, side, layout_cost))


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def resolve_layouts(
    params: Any,
    weight_dimension_numbers: WeightDimensionNumbers,
    rank: int,
    side: str = "smaller",
    cost: Callable[[MatrixLayout], int] | None = None,
    warn: bool = False,
) -> tuple[list[MatrixLayout | None], jax.tree_util.PyTreeDef]:
  """Per-leaf layouts (flat, in ``jax.tree.leaves`` order) and the params treedef.

  ``weight_dimension_numbers`` is None (project every 2-D leaf as ``DimensionNumbers(0, 1)``),
  one :class:`DimensionNumbers` (applied to every leaf with ndim ≥ 2), a pytree of
  ``DimensionNumbers | None`` matching params, or a callable ``params -> such a pytree``.
  Inside ``optax.partition`` / ``optax.masked`` the params hold ``optax.MaskedNode()`` where
  other groups' leaves are; a pytree spec for the full params still matches, and whatever it
  holds at those positions is ignored.

  With ``warn`` a :class:`FullRankWarning` names the leaves that the spec selects but that stay
  unprojected because ``rank >= min(m, n)``, and (default spec only) an
  :class:`UnprojectedWarning` the leaves with ndim > 2 that it leaves unprojected.
  """
  # MaskedNode positions count as leaves here so that a full-tree spec lines up with them.
  path_leaves, full_treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
  treedef = jax.tree.structure(params)
  kept = [not _is_masked(x) for _, x in path_leaves]
  paths = [_path_str(p) for (p, x), k in zip(path_leaves, kept) if k]
  shapes = [tuple(jnp.shape(x)) for (_, x), k in zip(path_leaves, kept) if k]
  wdn = weight_dimension_numbers
  if callable(wdn) and not isinstance(wdn, DimensionNumbers):
    wdn = wdn(params)
  if wdn is None:
    specs = [DimensionNumbers(0, 1) if len(s) == 2 else None for s in shapes]
  elif isinstance(wdn, DimensionNumbers):
    specs = [wdn if len(s) >= 2 else None for s in shapes]
  else:
    try:
      full_specs = full_treedef.flatten_up_to(wdn)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "weight_dimension_numbers must be None, one osd_jax.DimensionNumbers, a pytree of "
          "DimensionNumbers/None with the same structure as the params, or a callable "
          f"returning one. The given pytree does not match the params: {e}"
      ) from None
    specs = [spec for spec, k in zip(full_specs, kept) if k]
  layouts = [
      None if spec is None else make_layout(shape, spec, rank, side, path, cost)
      for shape, spec, path in zip(shapes, specs, paths)
  ]
  if warn and wdn is None:
    _warn_unprojected([f"{path} {shape}" for shape, path in zip(shapes, paths) if len(shape) > 2])
  if warn:
    full = [f"{path} {shape}" for shape, spec, path, layout in zip(shapes, specs, paths, layouts)
            if spec is not None and layout is None]
    if full:
      shown = ", ".join(full[:8]) + (f" and {len(full) - 8} more" if len(full) > 8 else "")
      warnings.warn(FullRankWarning(
          f"rank={rank} is >= the smaller side of {len(full)} selected matrices, which are "
          f"updated at full rank (no projection): {shown}. Use a smaller rank to project them, "
          "or map them to None in weight_dimension_numbers."), stacklevel=4)
  return layouts, treedef


def _warn_unprojected(leaves: list[str]) -> None:
  if not leaves:
    return
  shown = ", ".join(leaves[:8]) + (f" and {len(leaves) - 8} more" if len(leaves) > 8 else "")
  warnings.warn(UnprojectedWarning(
      f"{len(leaves)} leaves with more than 2 dimensions are updated at full rank (no "
      f"projection, full-size optimizer state): {shown}. Only 2-D leaves are projected by "
      "default; pass weight_dimension_numbers saying which axes form the matrix, e.g. "
      "{'w': osd_jax.DimensionNumbers(reduction_axis=1, output_axis=2)} for layers stacked on "
      "axis 0, or DimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3) for a (3, 3, in, "
      "out) convolution kernel; map a leaf to None to keep it at full rank."), stacklevel=5)
