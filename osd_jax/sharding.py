"""Optimizer-state shardings from parameter shardings.

Rules (docs/design.md §8), per projected weight with param PartitionSpec ``spec``:

* projector P ``(*batch, s, r)``: batch axes as the param's, s as the param shards the axes
  that make up s, r replicated;
* low-rank inner state ``(*batch, r, L)``: batch as the param's, r replicated, L as the
  param shards the axes that make up L;
* per-matrix scalars ``(*batch,)`` (e.g. the projector optimizer's count): batch as the param's;
* state leaves shaped like an unprojected param: the param's spec; anything else replicated.

When several param axes merge into one matrix dimension, the merged dimension keeps the
sharding of its leading axis only if the others are unsharded (a row-major reshape keeps
that layout); otherwise it is replicated.  With a mesh at hand, a dimension whose size does
not divide its mesh axes is replicated, so odd ranks or sizes never fail to compile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from osd_jax import quantization
from osd_jax.dimension_numbers import MatrixLayout
from osd_jax.subspace_descent import (
  ProjectedLeafState,
  SubspaceDescentState,
  is_projected_leaf,
)


def _is_spec_leaf(x) -> bool:
  return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def _is_state_leaf(x) -> bool:
  return isinstance(x, optax.MaskedNode) or quantization.is_quantized(x)


def _is_projector_slot(x) -> bool:
  """A leaf of a projector-state tree: a projected leaf's state or an unprojected position."""
  return is_projected_leaf(x) or isinstance(x, optax.MaskedNode)


def _entries(spec: PartitionSpec | None, ndim: int) -> tuple:
  entries = tuple(spec) if spec is not None else ()
  return entries + (None,) * (ndim - len(entries))


def _merged(entries: tuple):
  """Sharding of a dimension made by merging axes with these spec entries (row-major)."""
  if len(entries) == 1:
    return entries[0]
  if all(e is None for e in entries[1:]):
    return entries[0]
  return None


class _Fitter:
  """Builds specs, replicating any dimension its mesh axes do not divide."""

  def __init__(self, mesh):
    self.mesh = mesh

  def axis_size(self, entry) -> int:
    if entry is None or self.mesh is None:
      return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(self.mesh.shape[n] for n in names)

  def spec(self, shape, entries) -> PartitionSpec:
    fitted = [
        e if e is not None and dim % self.axis_size(e) == 0 else None
        for dim, e in zip(shape, entries)
    ]
    while fitted and fitted[-1] is None:
      fitted.pop()
    return PartitionSpec(*fitted)


def _projector_entries(layout: MatrixLayout, param_entries: tuple) -> dict[int, tuple]:
  batch = tuple(param_entries[a] for a in layout.batch_axes)
  s = _merged(tuple(param_entries[a] for a in layout.s_axes))
  L = _merged(tuple(param_entries[a] for a in layout.L_axes))  # noqa: N806
  return {"batch": batch, "s": s, "L": L}


def _leaf_spec(x, param_entries, layout, fitter: _Fitter) -> PartitionSpec:
  """Spec of a state leaf sitting at a parameter's position in a params-like subtree."""
  shape = tuple(x.shape)
  if layout is not None and (shape == layout.low_rank_shape or (  # (or its 8-bit scales)
      len(shape) == len(layout.low_rank_shape) and shape[:-1] == layout.low_rank_shape[:-1])):
    e = _projector_entries(layout, param_entries)
    return fitter.spec(shape, e["batch"] + (None, e["L"]))
  if param_entries is not None and len(shape) == len(param_entries) and layout is None:
    return fitter.spec(shape, param_entries)
  return PartitionSpec()


def _projector_leaf_spec(x, param_entries, layout: MatrixLayout, fitter: _Fitter):
  shape = tuple(x.shape)
  e = _projector_entries(layout, param_entries)
  nb = len(layout.batch_shape)
  if shape == layout.projector_shape or (  # P and its moments (or their 8-bit scales)
      len(shape) == len(layout.projector_shape) and shape[:-1] == layout.projector_shape[:-1]):
    return fitter.spec(shape, e["batch"] + (e["s"], None))
  if shape[:nb] == layout.batch_shape:
    return fitter.spec(shape, e["batch"] + (None,) * (len(shape) - nb))
  return PartitionSpec()


def optimizer_state_sharding(opt_state: Any, param_sharding: Any, mesh=None) -> Any:
  """Shardings for an optimizer state from the parameters' shardings.

  Args:
    opt_state: the state, or its shapes (``jax.eval_shape(tx.init, params)``), of any optax
      transformation, including chains with :func:`osd_jax.scale_by_subspace_descent`.
    param_sharding: a params-shaped tree of ``NamedSharding`` or ``PartitionSpec`` (None =
      replicated).
    mesh: the mesh, used to replicate dimensions that its axes do not divide; taken from
      the NamedShardings when not given.

  Returns:
    A tree with the structure of ``opt_state``: NamedShardings when ``param_sharding`` holds
    NamedShardings (or a mesh is given), else PartitionSpecs.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, osd_jax
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    >>> params = {"w": jnp.zeros((8, 16))}
    >>> tx = osd_jax.osd_adamw(1e-3, rank=3)
    >>> shardings = osd_jax.optimizer_state_sharding(
    ...     jax.eval_shape(tx.init, params), {"w": NamedSharding(mesh, P("fsdp", None))})
  """
  spec_leaves, params_def = jax.tree.flatten(param_sharding, is_leaf=_is_spec_leaf)
  named = [s for s in spec_leaves if isinstance(s, NamedSharding)]
  if mesh is None and named:
    mesh = named[0].mesh
  param_entries_list = [
      None if s is None else tuple(s.spec if isinstance(s, NamedSharding) else s)
      for s in spec_leaves
  ]
  fitter = _Fitter(mesh)

  def params_like(node, layouts):
    leaves, d = jax.tree.flatten(node, is_leaf=_is_state_leaf)
    if d != params_def:
      return None
    out = []
    for x, entries, layout in zip(leaves, param_entries_list, layouts):
      if isinstance(x, optax.MaskedNode) or not hasattr(x, "shape"):
        out.append(x)
        continue
      ndim = len(layout.shape) if layout is not None else len(x.shape)
      padded = _entries(PartitionSpec(*(entries or ())), ndim)
      if len(padded) > ndim:  # a spec longer than the leaf: not this param's layout
        padded = (None,) * ndim
      if quantization.is_quantized(x):  # codes as the moment would be; scales alike
        out.append(dataclasses.replace(
            x, codes=_leaf_spec(x.codes, padded, layout, fitter),
            scale=_leaf_spec(x.scale, padded, layout, fitter)))
        continue
      out.append(_leaf_spec(x, padded, layout, fitter))
    return d.unflatten(out)

  def projector_tree(node):
    leaves, d = jax.tree.flatten(node, is_leaf=_is_projector_slot)
    out = []
    for x, entries in zip(leaves, param_entries_list):
      if not is_projected_leaf(x):
        out.append(x)
        continue
      layout = x.layout
      padded = _entries(PartitionSpec(*(entries or ())), len(layout.shape))
      out.append(ProjectedLeafState(
          state=jax.tree.map(
              lambda a, padded=padded, layout=layout: _projector_leaf_spec(
                  a, padded, layout, fitter),
              x.state),
          layout=layout))
    return d.unflatten(out)

  def visit(node, layouts):
    if isinstance(node, SubspaceDescentState):
      proj_leaves = jax.tree.flatten(node.projector_state, is_leaf=_is_projector_slot)[0]
      if len(proj_leaves) != len(param_entries_list):
        raise ValueError(
            "optimizer_state_sharding: param_sharding does not have the structure of the "
            "params the optimizer state was initialised with.")
      inner_layouts = [x.layout if is_projected_leaf(x) else None for x in proj_leaves]
      return SubspaceDescentState(
          count=PartitionSpec(),
          inner_state=visit(node.inner_state, inner_layouts),
          projector_state=projector_tree(node.projector_state),
      )
    mapped = params_like(node, layouts)
    if mapped is not None:
      return mapped
    if hasattr(node, "shape") and hasattr(node, "dtype"):
      return PartitionSpec()
    children, d = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    if not children or (len(children) == 1 and children[0] is node):
      return node
    return d.unflatten([visit(c, layouts) for c in children])

  no_layouts = [None] * len(param_entries_list)
  specs = visit(opt_state, no_layouts)
  if mesh is None:
    return specs
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
