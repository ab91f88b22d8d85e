"""Running an optax transformation one layer of stacked params at a time.

Scanned models keep their blocks' params stacked on a leading layer axis. To update each block as
soon as its gradient exists (inside the backward pass, so that the whole gradient tree is never
held), the optimizer must run on one layer's slice of the params and of its state:

    split = osd_jax.layerwise.split_layers(tx, params, stacked)   # stacked: bools like params
    updates_i, new_i = split.update_layer(split.layer_view(grads, i), state,
                                          split.layer_view(params, i), i)
    state = split.set_layer(state, new_i, i)
    ...                                     # every layer, in any order
    updates_r, new_r = split.update_rest(split.rest_view(grads), state, split.rest_view(params))
    state = split.set_rest(state, new_r)

The state's leaves fall in three kinds, found by initialising ``tx`` on the stacked leaves alone
and on the other leaves alone (``optax.MaskedNode`` where the other leaves are, as
``optax.masked`` does):

* **layer** leaves (Adam's moments of a stacked leaf, its projector, the projector's per-matrix
  step count) carry the layer axis first and are sliced: layer i's update sees and writes slice i;
* **rest** leaves belong to the other params (embedding, head, norms);
* **shared** leaves (step counts, schedule state) are in both: every update reads them as they
  were, and :meth:`LayerSplit.set_rest` takes their new value from the update of the rest, so
  they advance once per step however many layers there are.

The one-layer state is the stacked one with the layer axis removed, also from the static layouts
of :class:`osd_jax.ProjectedLeafState` (the layer axis must be a batch axis of the
``weight_dimension_numbers``, as for scanned layers). A transformation that is not separable by
layer — a global-norm clip, ``optax.apply_if_finite``, a norm over the whole stack — gets one
:class:`osd_jax.separability.NotSeparableError` from :func:`split_layers`, found by a check of its
jaxpr (:mod:`osd_jax.separability`); it is never silently wrong.

:func:`chunk_rows` does the same for one big leaf's rows (an embedding, a head): the leaf viewed
as ``[n, rows/n, ...]`` is a stack of ``n`` chunks, updated one at a time so that one chunk's
float32 temporaries are alive instead of the whole leaf's.

Which random draws a projector init makes depends on the leaf's position and batch shape, so
``projector_init="random"``/``"randomized"`` draw different (equally distributed) P₀ layer by
layer than on the whole tree; the default SVD init is the same.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from osd_jax.dimension_numbers import MatrixLayout
from osd_jax.separability import NotSeparableError, check_layer_separable
from osd_jax.subspace_descent import ProjectedLeafState, is_projected_leaf

LAYER, REST, SHARED = "layer", "rest", "shared"


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _keystr_leaves(tree) -> list[tuple[str, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), x) for p, x in flat]


def _drop_layer_axis(layout: MatrixLayout) -> MatrixLayout:
  """``layout`` of one layer: axis 0 (a batch axis) removed."""
  if not layout.batch_axes or layout.batch_axes[0] != 0:
    raise NotSeparableError(
        f"a stacked leaf of shape {layout.shape} is projected with axis 0 as a matrix axis "
        f"(reduction axes {layout.reduction_axes}, output axes {layout.output_axes}); to update "
        f"it layer by layer the layer axis must be a batch axis of its weight_dimension_numbers, "
        f"e.g. DimensionNumbers(reduction_axis=1, output_axis=2).")
  down = lambda axes: tuple(a - 1 for a in axes)  # noqa: E731
  return MatrixLayout(layout.shape[1:], down(layout.batch_axes[1:]),
                      down(layout.reduction_axes), down(layout.output_axes), layout.transpose,
                      layout.rank)


def _one_layer(tree):
  """A layer-part state (abstract) with the leading layer axis removed everywhere."""

  def visit(node):
    if is_projected_leaf(node):
      return ProjectedLeafState(state=jax.tree.map(visit, node.state),
                                layout=_drop_layer_axis(node.layout))
    return jax.ShapeDtypeStruct(node.shape[1:], node.dtype)

  return jax.tree.map(visit, tree, is_leaf=is_projected_leaf)


@dataclasses.dataclass(frozen=True)
class LayerSplit:
  """A transformation split into per-layer updates and one update of the other leaves.

  Built by :func:`split_layers`; holds no arrays (only structure), so it can be made once and
  used inside ``jit``.
  """

  tx: optax.GradientTransformationExtraArgs
  n_layers: int
  params_treedef: Any
  stacked: tuple[bool, ...]  # per params leaf
  state_treedef: Any
  state_paths: tuple[str, ...]
  state_kinds: tuple[str, ...]  # per state leaf: LAYER, REST or SHARED
  layer_treedef: Any  # the one-layer state
  layer_paths: tuple[str, ...]
  rest_treedef: Any
  rest_paths: tuple[str, ...]

  # ------------------------------------------------------------------ views of params-shaped trees
  def layer_view(self, tree: Any, i) -> Any:
    """``tree`` (params-shaped) with stacked leaves at layer ``i`` and the others masked."""
    leaves = self.params_treedef.flatten_up_to(tree)
    return self.params_treedef.unflatten([
        x[i] if s else optax.MaskedNode() for x, s in zip(leaves, self.stacked)])

  def layer_view_of(self, stacked_leaves: list) -> Any:
    """A layer view from one layer's stacked leaves (in the order of :meth:`stacked_leaves`)."""
    it = iter(stacked_leaves)
    return self.params_treedef.unflatten([next(it) if s else optax.MaskedNode()
                                          for s in self.stacked])

  def rest_view(self, tree: Any) -> Any:
    """``tree`` (params-shaped) with the stacked leaves masked."""
    leaves = self.params_treedef.flatten_up_to(tree)
    return self.params_treedef.unflatten([
        optax.MaskedNode() if s else x for x, s in zip(leaves, self.stacked)])

  def stacked_leaves(self, tree: Any) -> list:
    """The stacked leaves of a params-shaped tree or view, in tree order."""
    leaves = self.params_treedef.flatten_up_to(tree)
    return [x for x, s in zip(leaves, self.stacked) if s]

  def merge_views(self, layer_leaves: list, rest_view: Any) -> Any:
    """A params-shaped tree from the stacked leaves (in order) and a :meth:`rest_view`."""
    rest = self.params_treedef.flatten_up_to(rest_view)
    stacked = iter(layer_leaves)
    return self.params_treedef.unflatten([next(stacked) if s else r
                                          for s, r in zip(self.stacked, rest)])

  # ------------------------------------------------------------------ states
  def _by_path(self, state) -> dict[str, Any]:
    return dict(zip(self.state_paths, self.state_treedef.flatten_up_to(state)))

  def layer_state(self, state: Any, i) -> Any:
    """The state of the one-layer problem: layer leaves at ``i``, shared leaves as they are."""
    by_path = self._by_path(state)
    kinds = dict(zip(self.state_paths, self.state_kinds))
    return self.layer_treedef.unflatten([
        by_path[p][i] if kinds[p] == LAYER else by_path[p] for p in self.layer_paths])

  def rest_state(self, state: Any) -> Any:
    """The state of the other leaves' problem: rest and shared leaves."""
    by_path = self._by_path(state)
    return self.rest_treedef.unflatten([by_path[p] for p in self.rest_paths])

  def set_layer(self, state: Any, new_layer_state: Any, i, *,
                token: jax.Array | None = None) -> Any:
    """``state`` with layer ``i`` of its layer leaves replaced (shared leaves unchanged).

    With ``token`` (a scalar read back from what was written before, e.g. the new params) the
    writes are ordered: each one after the token and after the writes before it, in tree order
    (:func:`write_after`), so that XLA updates every stack in place.
    """
    new = dict(zip(self.layer_paths, self.layer_treedef.flatten_up_to(new_layer_state)))
    out = []
    for path, kind, x in zip(self.state_paths, self.state_kinds,
                             self.state_treedef.flatten_up_to(state)):
      if kind != LAYER:
        out.append(x)
        continue
      y = new[path].astype(x.dtype)
      if token is not None:
        y = write_after(token)(y)
      x = x.at[i].set(y)
      if token is not None:  # the next write reads this one back
        token = token + jnp.abs(x[i].reshape(-1)[0]).astype(jnp.float32)
      out.append(x)
    return self.state_treedef.unflatten(out)

  def set_rest(self, state: Any, new_rest_state: Any) -> Any:
    """``state`` with its rest and shared leaves from the update of the rest."""
    new = dict(zip(self.rest_paths, self.rest_treedef.flatten_up_to(new_rest_state)))
    out = [new[p] if kind != LAYER else x for p, kind, x in zip(
        self.state_paths, self.state_kinds, self.state_treedef.flatten_up_to(state))]
    return self.state_treedef.unflatten(out)

  # ------------------------------------------------------------------ updates
  def update_layer(self, grads_i: Any, state: Any, params_i: Any, i, **extra_args):
    """``tx.update`` of layer ``i``: ``(updates_i, new one-layer state)``.

    ``grads_i``/``params_i`` are :meth:`layer_view`\\ s; ``state`` is the whole state. The extra
    argument ``layer_index=i`` goes along: a transformation that draws per-element random bits
    (stochastic rounding, :mod:`osd_jax.transforms`) then draws those of the whole stack.
    """
    return self.tx.update(grads_i, self.layer_state(state, i), params_i, layer_index=i,
                          **extra_args)

  def update_rest(self, grads_rest: Any, state: Any, params_rest: Any, **extra_args):
    """``tx.update`` of the other leaves: ``(updates, new rest state)`` (:meth:`rest_view`\\ s)."""
    return self.tx.update(grads_rest, self.rest_state(state), params_rest, **extra_args)

  def update(self, grads: Any, state: Any, params: Any = None, **extra_args):
    """The whole update, one layer at a time (a loop over layers), then the rest.

    Equals ``tx.update(grads, state, params)`` for a separable ``tx``; shown here for reference
    and tests (a trainer calls :meth:`update_layer` inside its backward pass instead).
    """
    if params is None:
      params = jax.tree.map(jnp.zeros_like, grads)

    def body(i, carry):
      state, stacked = carry
      u_i, new_i = self.update_layer(self.layer_view(grads, i), state,
                                     self.layer_view(params, i), i, **extra_args)
      stacked = [u.at[i].set(v) for u, v in zip(stacked, self.stacked_leaves(u_i))]
      return self.set_layer(state, new_i, i), stacked

    zeros = [jnp.zeros_like(g) for g in self.stacked_leaves(grads)]
    new_state, stacked_updates = jax.lax.fori_loop(0, self.n_layers, body, (state, zeros))
    u_rest, new_rest = self.update_rest(self.rest_view(grads), state, self.rest_view(params),
                                        **extra_args)
    return self.merge_views(stacked_updates, u_rest), self.set_rest(new_state, new_rest)


@dataclasses.dataclass(frozen=True)
class RowChunks:
  """A transformation run on ``n`` row chunks of some leaves, one chunk at a time.

  A chunked leaf ``[rows, ...]`` is viewed as ``[n, rows/n, ...]`` (a reshape of its contiguous
  rows) and becomes a stacked leaf of :attr:`split`, whose "layers" are the chunks; the state's
  leaves are reshaped alike. The other leaves are :attr:`split`'s rest. Built by
  :func:`chunk_rows`.
  """

  n: int
  split: LayerSplit  # of the chunked view
  params_treedef: Any
  param_shapes: tuple[tuple[int, ...], ...]
  chunk_param_shapes: tuple[tuple[int, ...], ...]
  state_treedef: Any
  state_shapes: tuple[tuple[int, ...], ...]
  chunk_state_shapes: tuple[tuple[int, ...], ...]

  @staticmethod
  def _reshape(treedef, tree, shapes):
    def reshape(x, shape):  # arrays, or their shapes
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(shape, x.dtype)
      return x.reshape(shape)

    return treedef.unflatten([reshape(x, s) for x, s in zip(treedef.flatten_up_to(tree), shapes)])

  def to_chunks(self, tree: Any) -> Any:
    """A params-shaped tree in the chunked view."""
    return self._reshape(self.params_treedef, tree, self.chunk_param_shapes)

  def from_chunks(self, tree: Any) -> Any:
    return self._reshape(self.params_treedef, tree, self.param_shapes)

  def state_to_chunks(self, state: Any) -> Any:
    """The transformation's state in the chunked view (:attr:`split`'s state)."""
    return self._reshape(self.state_treedef, state, self.chunk_state_shapes)

  def state_from_chunks(self, state: Any) -> Any:
    return self._reshape(self.state_treedef, state, self.state_shapes)


def chunk_rows(tx: optax.GradientTransformation, params: Any, n: int,
               chunked: Callable[[Any, Any], bool] | None = None, *, check: bool = True,
               **extra_args) -> RowChunks:
  """Splits ``tx`` for updates ``n`` row chunks at a time (e.g. an embedding's rows).

  The update of a big leaf holds several float32 temporaries of its size (Adam's new moments
  before they are quantized, the update before it is applied): 0.5 GiB each for a 32000 × 4096
  embedding. Run one chunk at a time (a loop over :attr:`RowChunks.split`'s layers, as for
  stacked blocks) it holds one chunk's. For an elementwise transformation whose state is shaped
  like the params (or blocked along their last axis, as 8-bit moments are) the result is the
  whole update's, bit for bit: a chunk draws the random bits it draws in the whole leaf.

  Args:
    tx: the transformation (its update may take extra args, e.g. ``apply_step``).
    params: the params or their shapes; ``optax.MaskedNode`` leaves are left out.
    n: the number of chunks.
    chunked: ``(path, leaf) -> bool``, the leaves to cut (default: every leaf of 2 or more axes
      whose first axis ``n`` divides).
    check: verify on the jaxpr that ``tx`` treats chunks separately (:func:`split_layers`).
    extra_args: example extra args for the check.

  Raises:
    ValueError: no leaf is chunked.
    osd_jax.separability.NotSeparableError: ``tx`` mixes rows of a leaf, or its state is not
      shaped so that a chunk of rows owns a chunk of it.

  Example:
    >>> import jax.numpy as jnp, optax, osd_jax
    >>> params = {"embed": jnp.ones((8, 4)), "norm": jnp.ones(4)}
    >>> rows = osd_jax.layerwise.chunk_rows(optax.adamw(1e-3), params, 4)
    >>> rows.to_chunks(params)["embed"].shape
    (4, 2, 4)
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  if chunked is None:
    chunked = lambda _, x: len(x.shape) >= 2 and x.shape[0] % n == 0  # noqa: E731
  flags = [bool(chunked(p, x)) for p, x in flat]
  for (p, x), f in zip(flat, flags):
    if f and (len(x.shape) < 1 or x.shape[0] % n):
      raise ValueError(f"chunk_rows: leaf {jax.tree_util.keystr(p)} {x.shape} cannot be cut "
                       f"into {n} chunks of rows.")
  if not any(flags):
    raise ValueError(f"chunk_rows: no leaf is cut into {n} chunks of rows.")
  leaves = [x for _, x in flat]
  chunk_leaves = [jax.ShapeDtypeStruct((n, x.shape[0] // n) + tuple(x.shape[1:]), x.dtype)
                  if f else x for x, f in zip(leaves, flags)]
  chunk_tree = treedef.unflatten(chunk_leaves)
  split = split_layers(tx, chunk_tree, treedef.unflatten(flags), check=check, **extra_args)
  state = jax.eval_shape(split.tx.init, shapes)
  chunk_state = jax.eval_shape(split.tx.init, chunk_tree)
  s_leaves, s_treedef = jax.tree.flatten(state)
  c_leaves, c_treedef = jax.tree.flatten(chunk_state)
  if s_treedef != c_treedef or any(
      math.prod(a.shape) != math.prod(b.shape) or a.dtype != b.dtype
      for a, b in zip(s_leaves, c_leaves)):
    raise NotSeparableError("chunk_rows: the state of the chunked params is not the state of "
                            "the params reshaped; this transformation cannot run by rows.")
  return RowChunks(n=n, split=split, params_treedef=treedef,
                   param_shapes=tuple(tuple(x.shape) for x in leaves),
                   chunk_param_shapes=tuple(tuple(x.shape) for x in chunk_leaves),
                   state_treedef=s_treedef, state_shapes=tuple(tuple(x.shape) for x in s_leaves),
                   chunk_state_shapes=tuple(tuple(x.shape) for x in c_leaves))


def write_after(token: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """``y -> y`` that depends on the scalar ``token`` (bitwise the same ``y``).

  Inside a loop that writes slices of several stacked buffers in place, XLA keeps a copy of a
  whole buffer when one new slice feeds two writes (a moment into its stack and into the
  params' update). Writing the params first and making every state write read a value back
  from them orders the writes so that no copy is needed. ``y − 0·|token|`` keeps every bit of
  ``y`` (−0.0 too) and is not simplified away.
  """
  finite = jnp.where(jnp.isfinite(token), jnp.abs(token), 0.0)

  def after(y):
    if jnp.issubdtype(y.dtype, jnp.floating):
      return y - (finite * 0).astype(y.dtype)
    return y - (finite * 0).astype(jnp.int32).astype(y.dtype)

  return after


def _stacked_to(shapes, flags, treedef, n: int):
  """``shapes`` with every stacked leaf's layer axis of length ``n``."""
  leaves = treedef.flatten_up_to(shapes)
  return treedef.unflatten([jax.ShapeDtypeStruct((n,) + tuple(x.shape[1:]), x.dtype) if f else x
                            for x, f in zip(leaves, flags)])


def _masked(params, keep: list[bool], treedef):
  leaves = treedef.flatten_up_to(params)
  return treedef.unflatten([x if k else optax.MaskedNode() for x, k in zip(leaves, keep)])


def split_layers(tx: optax.GradientTransformation, params: Any, stacked: Any, *,
                 check: bool = True, **extra_args) -> LayerSplit:
  """Splits ``tx`` for updates one layer at a time (see the module docstring).

  Args:
    tx: the transformation (its update may take extra args, e.g. ``apply_step``).
    params: the params or their shapes (``jax.ShapeDtypeStruct``).
    stacked: a params-shaped tree of bools, or a function ``(path, leaf) -> bool``, marking the
      leaves stacked on a leading layer axis (all of the same length).
    check: verify on the jaxpr that ``tx`` is separable by layer (:mod:`osd_jax.separability`).
    extra_args: example extra args for the check, e.g. ``apply_step=jnp.bool_(True)``.

  Returns:
    A :class:`LayerSplit`.

  Raises:
    osd_jax.separability.NotSeparableError: ``tx`` mixes layers, or a layer with the rest.

  Example:
    >>> import jax, jax.numpy as jnp, optax, osd_jax
    >>> params = {"layers": jnp.ones((3, 8, 16)), "head": jnp.ones((8, 4))}
    >>> wdn = {"layers": osd_jax.DimensionNumbers(1, 2), "head": None}
    >>> tx = osd_jax.osd_adamw(1e-3, rank=2, weight_dimension_numbers=wdn)
    >>> split = osd_jax.layerwise.split_layers(tx, params, {"layers": True, "head": False})
    >>> split.n_layers
    3
    >>> try:
    ...   osd_jax.layerwise.split_layers(optax.chain(optax.clip_by_global_norm(1.0), tx),
    ...                                  params, {"layers": True, "head": False})
    ... except osd_jax.separability.NotSeparableError as e:
    ...   print("refused")
    refused
  """
  tx = optax.with_extra_args_support(tx)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
  leaves, treedef = jax.tree.flatten(shapes)
  if callable(stacked):
    flags = [bool(stacked(p, x)) for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]]
  else:
    flags = [bool(s) for s in treedef.flatten_up_to(stacked)]
  lengths = {x.shape[0] for x, s in zip(leaves, flags) if s and x.shape}
  if not any(flags):
    raise ValueError("split_layers: no leaf is marked stacked.")
  if len(lengths) != 1 or any(s and not x.shape for x, s in zip(leaves, flags)):
    raise ValueError(f"split_layers: the stacked leaves must share one leading layer axis, got "
                     f"lengths {sorted(lengths)}.")
  n_layers = lengths.pop()

  full = jax.eval_shape(tx.init, shapes)
  layer_part = jax.eval_shape(tx.init, _masked(shapes, flags, treedef))
  rest_part = jax.eval_shape(tx.init, _masked(shapes, [not s for s in flags], treedef))
  one_layer = _one_layer(layer_part)  # checks first that the layer axis is a batch axis
  full_leaves = _keystr_leaves(full)
  in_layer, in_rest = dict(_keystr_leaves(layer_part)), dict(_keystr_leaves(rest_part))
  kinds = []
  for path, x in full_leaves:
    kind = (SHARED if path in in_layer and path in in_rest else LAYER if path in in_layer
            else REST if path in in_rest else None)
    part = in_layer.get(path, in_rest.get(path))
    if kind is None or (part.shape, part.dtype) != (x.shape, x.dtype):
      raise NotSeparableError(f"split_layers: the optimizer state leaf {path} {x.shape} is not "
                              f"made by the stacked leaves or the others alone; this "
                              f"transformation cannot be split by layer.")
    if kind == LAYER and (not x.shape or x.shape[0] != n_layers):
      raise NotSeparableError(f"split_layers: the optimizer state leaf {path} {x.shape} belongs "
                              f"to the stacked leaves but has no leading layer axis of length "
                              f"{n_layers}.")
    if kind == SHARED and jnp.ndim(x) and x.shape[:1] == (n_layers,):
      pass  # e.g. a shared table that happens to have L rows: it is not sliced
    kinds.append(kind)
  split = LayerSplit(
      tx=tx, n_layers=n_layers, params_treedef=treedef, stacked=tuple(flags),
      state_treedef=jax.tree.structure(full), state_paths=tuple(p for p, _ in full_leaves),
      state_kinds=tuple(kinds), layer_treedef=jax.tree.structure(one_layer),
      layer_paths=tuple(p for p, _ in _keystr_leaves(layer_part)),
      rest_treedef=jax.tree.structure(rest_part),
      rest_paths=tuple(p for p, _ in _keystr_leaves(rest_part)))
  if check:
    _check(split, shapes, full, flags, extra_args)
  return split


def _check(split: LayerSplit, shapes, state, flags, extra_args) -> None:
  """The jaxpr check of :func:`split_layers` on the whole-tree update.

  A stack of one layer is checked as a stack of two (abstract shapes: free), since XLA's and
  JAX's size-1 squeezes would hide where its layer axis goes.
  """
  if split.n_layers == 1:
    shapes = _stacked_to(shapes, flags, split.params_treedef, 2)
    state = jax.eval_shape(split.tx.init, shapes)
  param_kinds = split.params_treedef.unflatten([LAYER if s else REST for s in flags])
  state_kinds = split.state_treedef.unflatten(list(split.state_kinds))
  extra_kinds = jax.tree.map(lambda _: SHARED, extra_args)

  def update(grads, state, params, extra):
    return split.tx.update(grads, state, params, **extra)

  out_names = [f"the update of params{p}" for p, _ in _keystr_leaves(shapes)]
  out_kinds = [LAYER if s else REST for s in flags]
  out_names += [f"the new optimizer state{p}" for p in split.state_paths]
  out_kinds += list(split.state_kinds)
  check_layer_separable(update, (shapes, state, shapes, extra_args),
                        (param_kinds, state_kinds, param_kinds, extra_kinds), out_names, out_kinds)
