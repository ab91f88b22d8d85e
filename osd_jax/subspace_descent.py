"""``scale_by_subspace_descent``: any inner optax optimizer run in a moving rank-r subspace."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osd_jax import projectors as projectors_lib
from osd_jax import rounding, skipping
from osd_jax.dimension_numbers import (
  SIDES,
  MatrixLayout,
  WeightDimensionNumbers,
  from_matrix,
  resolve_layouts,
  to_matrix,
)
from osd_jax.memory import state_bytes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ProjectedLeafState:
  """Projector state of one projected parameter; ``layout`` is static (pytree metadata).

  ``state`` is the projector rule's state with a leading ``layout.batch_shape``.
  """

  state: Any
  layout: MatrixLayout = dataclasses.field(metadata=dict(static=True))


class SubspaceDescentState(NamedTuple):
  """State of :func:`scale_by_subspace_descent`."""

  count: jax.Array  # int32 [], the step t
  inner_state: optax.OptState  # inner optimizer state over the projected tree (r×L leaves)
  projector_state: Any  # params-shaped: ProjectedLeafState or optax.MaskedNode()


# Part of optax's message when a transformation that needs params gets None.
_NO_PARAMS_HINT = "not passing `params`"


def is_projected_leaf(x) -> bool:
  """Whether ``x`` is the projector state of one projected parameter (a
  :class:`ProjectedLeafState`); pass it as ``is_leaf`` to stop a tree walk there."""
  return isinstance(x, ProjectedLeafState)


class Projections(NamedTuple):
  """The three projectors of one leaf at step t."""

  stored: jax.Array  # P as the state held it before step t (before any refresh)
  current: jax.Array  # Pₜ: projects Gₜ and back-projects N
  next: jax.Array  # Pₜ₊₁: stored for step t + 1


class _Projected(NamedTuple):
  """What the projector rule gives for one projected leaf at step t."""

  g_hat: jax.Array  # Ĝ = Pₜᵀ G' (*batch, r, L)
  projections: Projections
  new_slot: ProjectedLeafState  # the leaf's projector state for step t + 1


def _validate_rank(rank) -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise TypeError(
        f"rank must be a positive Python int (it sets array shapes), got {rank!r} of type "
        f"{type(rank).__name__}. With optax.inject_hyperparams pass static_args=('rank',)."
    )
  if rank <= 0:
    raise ValueError(f"rank must be a positive int, got {rank}; use e.g. rank=128.")
  return int(rank)


def _vmap_batch(fn, num_batch_axes: int, in_axes):
  for _ in range(num_batch_axes):
    fn = jax.vmap(fn, in_axes=in_axes)
  return fn


def _matrix_seeds(seed: int, path: str, count, batch_shape, layer_index) -> jax.Array:
  """uint32 seeds, one per matrix of a leaf (``batch_shape``), from (``seed``, the leaf's path,
  the step, the matrix's index in the whole leaf): a layer's slice (``layer_index``, see
  :mod:`osd_jax.layerwise`) gets the seeds its matrices get in the whole stack."""
  n = math.prod(batch_shape)
  index = jax.lax.iota(jnp.uint32, n).reshape(batch_shape)
  if layer_index is not None:
    index = index + jnp.asarray(layer_index).astype(jnp.uint32) * n
  return rounding.combine_seeds(seed, rounding.path_seed(path), count, index)


def _matrix_keys(seeds: jax.Array) -> jax.Array:
  """PRNG keys from :func:`_matrix_seeds` (for the random and randomized inits)."""
  flat = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds.reshape(-1))
  return flat.reshape(seeds.shape)


_P_STREAM = 0x9E37  # P's stochastic rounding draws its own bits (the inits use the plain seeds)


def scale_by_subspace_descent(
    inner: optax.GradientTransformation,
    rank: int,
    projector: projectors_lib.ProjectorRule,
    *,
    scale: float = 1.0,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    projector_dtype: Any = None,
    side: str = "smaller",
    transport_state: bool = False,
    project_params: bool = False,
    seed: int = 0,
) -> skipping.SkippableTransformation:
  r"""Runs ``inner`` on gradients projected to a rank-r subspace that ``projector`` moves.

  For each selected weight with gradient G (viewed as G' ∈ ℝ^{s×L}, see
  :mod:`osd_jax.dimension_numbers`) and projector Pₜ ∈ ℝ^{s×r}:

      Ĝ = Pₜᵀ G'              (r×L; the inner optimizer's coordinates)
      N = inner(Ĝ)            (one inner transformation over the whole tree)
      U' = scale · Pₜ N       (back to s×L, then to the weight's shape)
      Pₜ₊₁ = projector(Gₜ, Pₜ)

  Leaves that are not projected (ndim < 2, mapped to None, or ``rank >= min(m, n)``) get
  ``inner`` at full rank; ``init`` names the selected ones left at full rank in one
  :class:`osd_jax.FullRankWarning`, and leaves with ndim > 2 that the default spec skips in one
  :class:`osd_jax.UnprojectedWarning`.  The compiled update holds one ``conditional``, however
  many matrices are projected: the rule's refresh of every matrix (an SVD, a QR) sits in its
  true branch, one matrix at a time (docs/design.md §4).  Inner state is kept when P changes
  (the paper's choice) unless ``transport_state=True``, which rotates the inner first moment M
  into the new basis, M ← (P_newᵀ P_old) M, where the rule replaced or moved P (docs/design.md
  §5); second moments are not rotated.

  Args:
    inner: an optax transformation that needs no params, e.g. ``optax.scale_by_adam()``.
    rank: r, a positive Python int.
    projector: a :class:`osd_jax.projectors.ProjectorRule`, e.g. ``projectors.online_pca``.
    scale: multiplies the back-projected update (GaLore's α).
    weight_dimension_numbers: which leaves/axes are projected; see
      :func:`osd_jax.dimension_numbers.resolve_layouts`. Default: every 2-D leaf.
    projector_dtype: dtype of P and its optimizer state (None = float32).
    side: ``"smaller"`` (P spans min(m, n)), ``"larger"``, ``"auto"`` (the side with fewer
      state bytes) or ``"reference"`` (the official code's: ties project the reduction side).
    transport_state: rotate the inner first moment into the new basis when P changes.
    project_params: give ``inner`` the params in its own coordinates (Pₜᵀ W' for projected
      leaves) instead of None, for inner transforms that read params; weight decay belongs
      outside (``optax.add_decayed_weights`` after this transformation, as the aliases do).
    seed: seeds the randomized/random projector inits (a key per leaf and step).

  Returns:
    A :class:`osd_jax.skipping.SkippableTransformation`; extra args are forwarded to ``inner``.
    With ``apply_step=False`` (:mod:`osd_jax.skipping`) the state comes back exactly as it was.

  Example:
    >>> import jax.numpy as jnp, optax, osd_jax
    >>> tx = optax.chain(
    ...     osd_jax.scale_by_subspace_descent(
    ...         optax.scale_by_adam(), rank=2,
    ...         projector=osd_jax.projectors.online_pca(learning_rate=5e-3)),
    ...     optax.scale_by_learning_rate(1e-3))
    >>> params = {"w": jnp.ones((4, 6)), "b": jnp.zeros(6)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state)
    >>> updates["w"].shape
    (4, 6)

  References:
    Liang, Liu, Chen & Liu, *Memory-Efficient LLM Training with Online Subspace Descent*,
    arXiv:2408.12857, 2024.
  """
  rank = _validate_rank(rank)
  if side not in SIDES:
    raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
  if not isinstance(projector, projectors_lib.ProjectorRule):
    raise TypeError(
        "projector must be an osd_jax.projectors.ProjectorRule (e.g. "
        f"osd_jax.projectors.online_pca(...)), got {type(projector).__name__}."
    )
  inner = optax.with_extra_args_support(inner)
  # getattr: optax.inject_hyperparams calls dtype classes like schedules and passes arrays.
  projector_dtype = jnp.dtype(getattr(projector_dtype, "dtype", projector_dtype) or jnp.float32)

  def layout_cost(layout: MatrixLayout, dtype) -> int:
    """State bytes of one projected matrix: projector state plus inner state."""
    proj = jax.eval_shape(lambda: projector.init(layout.s, layout.L, rank, projector_dtype))
    low = jax.ShapeDtypeStruct((rank, layout.L), dtype)
    return state_bytes(proj) + state_bytes(jax.eval_shape(inner.init, low))

  def layouts_for(params, warn=False):
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(params)]
    cost = None
    if side == "auto":
      # One dtype per call is enough for the orientation choice; use the widest.
      dtype = max(dtypes, key=lambda d: d.itemsize) if dtypes else jnp.float32
      cost = lambda layout: layout_cost(layout, dtype)  # noqa: E731
    return resolve_layouts(params, weight_dimension_numbers, rank, side, cost, warn)

  def init_fn(params):
    layouts, treedef = layouts_for(params, warn=True)  # FullRankWarning, UnprojectedWarning
    leaves = treedef.flatten_up_to(params)
    inner_leaves, projector_leaves = [], []
    for x, layout in zip(leaves, layouts):
      if layout is None:
        inner_leaves.append(x)
        projector_leaves.append(optax.MaskedNode())
        continue
      inner_leaves.append(jnp.zeros(layout.low_rank_shape, jnp.result_type(x)))
      state = projector.init(layout.s, layout.L, rank, projector_dtype)
      for n in reversed(layout.batch_shape):
        state = jax.tree.map(lambda a, n=n: jnp.broadcast_to(a, (n,) + a.shape), state)
      projector_leaves.append(ProjectedLeafState(state=state, layout=layout))
    return SubspaceDescentState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(treedef.unflatten(inner_leaves)),
        projector_state=treedef.unflatten(projector_leaves),
    )

  def update_fn(updates, state, params=None, **extra_args):
    apply_step = extra_args.get("apply_step")  # see osd_jax.skipping
    if project_params and params is None:
      raise ValueError("scale_by_subspace_descent(project_params=True) needs params in update().")
    leaves, treedef = jax.tree.flatten(updates)
    slots = treedef.flatten_up_to(state.projector_state)
    _check_shapes(leaves, slots)
    count = state.count
    layer_index = extra_args.get("layer_index")  # a layer of a stack (osd_jax.layerwise)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
    seeds = {i: _matrix_seeds(seed, paths[i], count, ps.layout.batch_shape, layer_index)
             for i, ps in enumerate(slots) if is_projected_leaf(ps)}
    # the rule keeps its own state on a skipped step (no copy of its moments), or it is selected
    rule_skips = apply_step is not None and projector.honours_apply_step
    rule_states = _rule_states_for_step(projector, leaves, slots, count, seeds)
    projected = {
        i: _project_leaf(projector, leaves[i], slots[i], rule_states[i], count,
                         apply_step if rule_skips else None, seeds[i])
        for i in rule_states
    }
    inner_in = [projected[i].g_hat.astype(g.dtype) if i in projected else g
                for i, g in enumerate(leaves)]
    inner_params = None
    if project_params:
      inner_params = treedef.unflatten(_params_in_inner_coordinates(
          treedef.flatten_up_to(params), slots, projected))
    inner_state = state.inner_state
    if transport_state:  # M ← (Pₜᵀ P_stored) M where the rule replaced P inside update
      inner_state = _transport_first_moment(inner_state, {
          i: _change_of_basis(pr.projections.current, pr.projections.stored, count == 0)
          for i, pr in projected.items()}, treedef)
    n_tree, new_inner_state = _run_inner(inner, treedef.unflatten(inner_in), inner_state,
                                         inner_params, extra_args)
    out = _back_project(leaves, treedef.flatten_up_to(n_tree), slots, projected, scale)
    if transport_state:  # M ← (Pₜ₊₁ᵀ Pₜ) M where the rule moves P for the next step
      new_inner_state = _transport_first_moment(new_inner_state, {
          i: _change_of_basis(pr.projections.next, pr.projections.current, False)
          for i, pr in projected.items()}, treedef)
    new_state = SubspaceDescentState(
        count=optax.safe_increment(count),
        inner_state=new_inner_state,
        projector_state=treedef.unflatten([projected[i].new_slot if i in projected else ps
                                           for i, ps in enumerate(slots)]),
    )
    if apply_step is not None:  # a skipped step leaves the whole state as it was
      new_state = _keep_on_skip(apply_step, new_state, state, rule_skips,
                                skipping.honours_apply_step(inner))
    return treedef.unflatten(out), new_state

  return skipping.skippable(init_fn, update_fn)


def _check_shapes(leaves: list, slots: list) -> None:
  for i, (g, ps) in enumerate(zip(leaves, slots)):
    if is_projected_leaf(ps) and tuple(g.shape) != ps.layout.shape:
      raise ValueError(
          f"Gradient leaf {i} has shape {g.shape} but the optimizer state was initialised "
          f"for shape {ps.layout.shape}; re-run init with params of the current shapes."
      )


def _rule_states_for_step(projector, leaves, slots, count, seeds: dict) -> dict[int, Any]:
  """``{leaf index: rule state for step t}`` of the projected leaves: refreshed (an SVD, a QR...
  of every projected matrix) inside ONE conditional for the whole tree on refresh steps."""
  projected = [i for i, ps in enumerate(slots) if is_projected_leaf(ps)]
  states = [slots[i].state for i in projected]
  if projector.is_refresh is not None and projected:
    states = _refresh_all(projector, [leaves[i] for i in projected],
                          [slots[i] for i in projected], [seeds[i] for i in projected], count)
  return dict(zip(projected, states))


def _project_leaf(projector, g, slot: ProjectedLeafState, rule_state, count,
                  apply_step, seeds) -> _Projected:
  """The rule's step on every matrix of one leaf: Ĝ = Pₜᵀ G', and the state for step t + 1.

  With ``apply_step`` the rule keeps its own state on a skipped step; P, which a refresh may
  have replaced, is put back to the stored one here. A rule that ``takes_seed`` gets one per
  matrix (for the stochastic rounding of a narrow P and its optimizer state).
  """
  layout = slot.layout
  rule = projector.oriented(layout.transpose)
  kwargs = {}
  if apply_step is not None:
    kwargs["apply_step"] = apply_step
  matrix_seeds = rounding.combine_seeds(seeds, _P_STREAM) if rule.takes_seed else None

  def step(g_, s_, seed_):
    extra = dict(kwargs, seed=seed_) if seed_ is not None else kwargs
    return rule.step(g_, s_, count, **extra)

  in_axes = (0, 0, None if matrix_seeds is None else 0)
  p_t, g_hat, new_state = _vmap_batch(step, len(layout.batch_shape), in_axes)(
      to_matrix(g, layout), rule_state, matrix_seeds)
  if apply_step is not None:
    new_state = new_state._replace(p=jnp.where(apply_step, new_state.p, slot.state.p))
  return _Projected(g_hat, Projections(slot.state.p, p_t, new_state.p),
                    ProjectedLeafState(state=new_state, layout=layout))


def _params_in_inner_coordinates(param_leaves, slots, projected) -> list:
  """Params as ``inner`` sees them: Pₜᵀ W' for projected leaves, W elsewhere."""
  out = []
  for i, (w, ps) in enumerate(zip(param_leaves, slots)):
    if i not in projected:
      out.append(w)
      continue
    p_t = projected[i].projections.current
    w_hat = jnp.matmul(jnp.swapaxes(p_t, -1, -2), to_matrix(w, ps.layout).astype(p_t.dtype))
    out.append(w_hat.astype(w.dtype))
  return out


def _run_inner(inner, grads, inner_state, inner_params, extra_args):
  """``inner.update`` in its own coordinates, with a hint when it wants params it cannot get."""
  try:
    return inner.update(grads, inner_state, inner_params, **extra_args)
  except ValueError as e:  # optax's "you are not passing `params`" (e.g. inner=optax.adamw)
    if inner_params is not None or _NO_PARAMS_HINT not in str(e):
      raise
    raise ValueError(
        "The inner transformation of scale_by_subspace_descent reads params, but it gets "
        "none unless project_params=True (then it gets Pₜᵀ W' for projected leaves). For "
        "weight decay, apply it outside instead: optax.chain(scale_by_subspace_descent("
        "optax.scale_by_adam(), ...), optax.add_decayed_weights(wd), "
        "optax.scale_by_learning_rate(lr)), as osd_jax.osd_adamw does."
    ) from e


def _back_project(leaves, n_leaves, slots, projected, scale) -> list:
  """U' = scale · Pₜ N for projected leaves (back in the weight's shape), N elsewhere."""
  out = []
  for i, (g, n, ps) in enumerate(zip(leaves, n_leaves, slots)):
    if i not in projected:
      out.append(n)
      continue
    p_t = projected[i].projections.current
    u = scale * jnp.matmul(p_t, n.astype(p_t.dtype))  # U' = scale · Pₜ N
    out.append(from_matrix(u, ps.layout).astype(g.dtype))
  return out


def _keep_on_skip(apply_step, new_state: SubspaceDescentState, state: SubspaceDescentState,
                  rule_skipped: bool, inner_skipped: bool) -> SubspaceDescentState:
  """The state of a skipped step: the old one, taking what the rule and ``inner`` kept
  themselves as it is (a select of it would cost a copy of every moment)."""
  projector_state = new_state.projector_state
  if not rule_skipped:
    projector_state = skipping.select_state(apply_step, projector_state, state.projector_state)
  inner_state = new_state.inner_state
  if not inner_skipped:
    inner_state = skipping.select_state(apply_step, inner_state, state.inner_state)
  return SubspaceDescentState(count=jnp.where(apply_step, new_state.count, state.count),
                              inner_state=inner_state, projector_state=projector_state)


def _matrix_layout(layout: MatrixLayout) -> MatrixLayout:
  """The layout of one matrix of a leaf with batch axes: ``layout`` without them."""
  keep = [a for a in range(len(layout.shape)) if a not in layout.batch_axes]
  where = {a: i for i, a in enumerate(keep)}
  return MatrixLayout(tuple(layout.shape[a] for a in keep), (),
                      tuple(where[a] for a in layout.reduction_axes),
                      tuple(where[a] for a in layout.output_axes), layout.transpose, layout.rank)


def _refresh_leaf(projector, g, layout: MatrixLayout, state, count, keys):
  """``projector.refresh`` of every matrix of one leaf, one matrix at a time.

  A leaf with batch axes (stacked layers, heads) is refreshed by a loop (``lax.map``) over its
  matrices, one batch axis at a time, not a vmap: an SVD works on a copy of its input and makes
  a Vᵀ as large as it, so a vmapped SVD of a stacked [n_layers, s, L] gradient would hold
  n_layers of those at once. The slices are taken from the gradient as stored (``to_matrix``
  inside the loop), so a transposed view is never materialised for the whole stack; and each
  iteration of the outer loop is one slice of the leading batch axis (for scanned layers: one
  layer, see :mod:`osd_jax.layerwise`).
  """
  rule = projector.oriented(layout.transpose)
  one = _matrix_layout(layout)
  rest = tuple(a for a in range(g.ndim) if a not in layout.batch_axes)
  g = jnp.transpose(g, layout.batch_axes + rest)  # (*batch, matrix axes as stored)

  def refresh(args, depth):
    g_i, state_i, key_i = args
    if depth == len(layout.batch_shape):
      return rule.refresh(to_matrix(g_i, one), state_i, count, key_i)
    return jax.lax.map(lambda a: refresh(a, depth + 1), (g_i, state_i, key_i))

  return refresh((g, state, keys), 0)


def _refresh_all(projector, grads, leaf_states, seeds, count) -> list:
  """Rule states for step t of the projected leaves: refreshed on refresh steps, else kept.

  One ``lax.cond`` for all of them: the refresh branch runs ``projector.refresh`` on every
  matrix, one after another (:func:`_refresh_leaf`: a loop over batch axes), so the branch's
  temporaries are those of one matrix's refresh, however many matrices there are; the other
  branch returns the states as they are.  The keys are made inside the refresh branch (from
  :func:`_matrix_seeds`); the gradients enter the branch as stored (``to_matrix`` inside), so
  the steady-state path neither copies nor gathers them.
  """
  states = [ps.state for ps in leaf_states]
  due = projector.is_refresh(count)

  def refresh_all(grads, states):
    out = []
    for g, ps, state, leaf_seeds in zip(grads, leaf_states, states, seeds):
      new = _refresh_leaf(projector, g, ps.layout, state, count, _matrix_keys(leaf_seeds))
      out.append(jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), new, state))
    return out

  if isinstance(due, (bool, np.bool_)):  # decided at trace time
    return refresh_all(grads, states) if due else states
  return jax.lax.cond(due, refresh_all, lambda grads, states: states, grads, states)


def _change_of_basis(p_new: jax.Array, p_old: jax.Array, skip) -> jax.Array:
  """R = P_newᵀ P_old (r×r, batched), or exactly I where P_new == P_old or ``skip``.

  A basis that did not change needs no rotation; PᵀP is only ≈ I for a P that is not
  orthonormal (online PCA), so it is not applied then.
  """
  eye = jnp.eye(p_new.shape[-1], dtype=p_new.dtype)
  same = jnp.all(p_new == p_old, axis=(-2, -1), keepdims=True) | skip
  return jnp.where(same, eye, jnp.matmul(jnp.swapaxes(p_new, -1, -2), p_old))


def _has_first_moment(x) -> bool:
  return isinstance(x, tuple) and hasattr(x, "_fields") and "mu" in x._fields


def _transport_first_moment(inner_state, rotations: dict, treedef):
  """M ← R M for every projected leaf (``rotations``: leaf index -> R) of every ``mu`` field in
  the inner state."""

  def rotate(node):
    if not _has_first_moment(node):
      return node
    try:
      mu_leaves = treedef.flatten_up_to(node.mu)
    except (ValueError, TypeError):
      return node
    new_mu = [
        m if i not in rotations else jnp.matmul(rotations[i], m.astype(rotations[i].dtype))
        .astype(m.dtype)
        for i, m in enumerate(mu_leaves)
    ]
    return node._replace(mu=treedef.unflatten(new_mu))

  return jax.tree.map(rotate, inner_state, is_leaf=_has_first_moment)
