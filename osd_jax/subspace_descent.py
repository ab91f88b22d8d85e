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
from osd_jax import skipping
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


def _is_projected(x) -> bool:
  return isinstance(x, ProjectedLeafState)


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


def _leaf_keys(base_key: jax.Array, leaf_index: int, count, batch_shape) -> jax.Array:
  key = jax.random.fold_in(jax.random.fold_in(base_key, leaf_index), count)
  if not batch_shape:
    return key
  return jax.random.split(key, math.prod(batch_shape)).reshape(batch_shape)


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
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``inner`` on gradients projected to a rank-r subspace that ``projector`` moves.

  For each selected weight with gradient G (viewed as G' ∈ ℝ^{s×L}, see
  :mod:`osd_jax.dimension_numbers`) and projector Pₜ ∈ ℝ^{s×r}:

      Ĝ = Pₜᵀ G'              (r×L; the inner optimizer's coordinates)
      N = inner(Ĝ)            (one inner transformation over the whole tree)
      U' = scale · Pₜ N       (back to s×L, then to the weight's shape)
      Pₜ₊₁ = projector(Gₜ, Pₜ)

  Leaves that are not projected (ndim < 2, mapped to None, or ``rank >= min(m, n)``) get
  ``inner`` at full rank; ``init`` names the last kind in one :class:`osd_jax.FullRankWarning`
  (``warnings.simplefilter("ignore", osd_jax.FullRankWarning)`` silences it).

  The compiled update holds at most one ``conditional``, however many matrices are
  projected: ``lax.cond(projector.is_refresh(t), refresh every matrix, keep every P)``, the
  matrices refreshed one at a time (a loop over stacked layers, not a vmap), so the branch's
  temporaries are one matrix's SVD workspace however many layers there are. The
  expensive refresh (the SVD of P₀, GaLore's periodic SVD, a QR) sits in its true branch, and
  with sharded params the full-gradient all-gathers that the SVD needs sit there too; the
  steady-state path (the rule's ``step``, ``inner`` and U') runs no SVD/QR/eigh and, with P
  sharded like the side it spans (:func:`osd_jax.optimizer_state_sharding`), communicates only
  rank-r partial sums (Ĝ or B, [PᵀP, PᵀB], ‖G‖).  A rule given only as
  ``ProjectorRule(init, update)`` keeps whatever branches its ``update`` has.

  Inner state is kept when P changes (the paper's choice), unless
  ``transport_state=True``, which keeps the inner first moment M (every ``mu`` field of the
  inner state) in the basis of the stored P, as LDAdam, for any rule:

      M ← (Pₜᵀ P_stored) M   before ``inner``, where the rule replaced P inside ``update``
                              (``svd``/``random`` at a refresh; nothing at t = 0)
      M ← (Pₜ₊₁ᵀ Pₜ) M       after ``inner``, where the rule moved P for step t + 1
                              (``online_pca`` every step t ≥ 1)

  A P that did not change gives exactly I (not PᵀP, which is only ≈ I for online PCA's P).
  Second moments are not rotated.

  Args:
    inner: an optax transformation that needs no params, e.g. ``optax.scale_by_adam()``.
    rank: r, a positive Python int.
    projector: a :class:`osd_jax.projectors.ProjectorRule`, e.g. ``projectors.online_pca``.
    scale: multiplies the back-projected update (GaLore's α).
    weight_dimension_numbers: which leaves/axes are projected; see
      :func:`osd_jax.dimension_numbers.resolve_layouts`. Default: every 2-D leaf.
    projector_dtype: dtype of P and its optimizer state (None = float32).
    side: ``"smaller"`` (P spans min(m, n), docs/design.md §3), ``"larger"``, ``"auto"`` (the
      side with fewer state bytes for this inner optimizer and projector rule) or
      ``"reference"`` (the official code's: the smaller side, ties project the reduction side).
    transport_state: rotate the inner first moment into the new basis when P changes.
    project_params: give ``inner`` the params in its own coordinates (Pₜᵀ W' for projected
      leaves, one more rank-r matmul each) instead of None; needed by inner transforms that
      read params, e.g. ``optax.scale_by_factored_rms``.  Without it ``inner`` gets no
      params, so weight decay belongs outside (``optax.add_decayed_weights`` after this
      transformation, as the aliases do), not in ``inner`` (e.g. ``optax.adamw``).
    seed: seeds the randomized/random projector inits (a key per leaf and step).

  Returns:
    A ``GradientTransformationExtraArgs``; extra args are forwarded to ``inner``. With the
    extra arg ``apply_step`` (a bool scalar, :mod:`osd_jax.skipping`) a False step returns the
    state exactly as it was (a trainer's skipped step), the updates being left to the caller.

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

  def layouts_for(params, warn_full_rank=False):
    dtypes = [jnp.result_type(x) for x in jax.tree.leaves(params)]
    cost = None
    if side == "auto":
      # One dtype per call is enough for the orientation choice; use the widest.
      dtype = max(dtypes, key=lambda d: d.itemsize) if dtypes else jnp.float32
      cost = lambda layout: layout_cost(layout, dtype)  # noqa: E731
    return resolve_layouts(params, weight_dimension_numbers, rank, side, cost, warn_full_rank)

  def init_fn(params):
    # warns (osd_jax.FullRankWarning) about matrices left unprojected since rank >= min(m, n)
    layouts, treedef = layouts_for(params, warn_full_rank=True)
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
    leaves, treedef = jax.tree.flatten(updates)
    projector_leaves = treedef.flatten_up_to(state.projector_state)
    count = state.count
    base_key = jax.random.key(seed)

    if project_params and params is None:
      raise ValueError("scale_by_subspace_descent(project_params=True) needs params in update().")
    param_leaves = treedef.flatten_up_to(params) if project_params else [None] * len(leaves)
    for i, (g, ps) in enumerate(zip(leaves, projector_leaves)):
      if _is_projected(ps) and tuple(g.shape) != ps.layout.shape:
        raise ValueError(
            f"Gradient leaf {i} has shape {g.shape} but the optimizer state was initialised "
            f"for shape {ps.layout.shape}; re-run init with params of the current shapes."
        )
    projected = [i for i, ps in enumerate(projector_leaves) if _is_projected(ps)]
    # Rule states for step t: refreshed (SVD/QR... of every projected matrix at once) inside
    # ONE conditional for the whole tree, on refresh steps only.
    rule_states = {i: projector_leaves[i].state for i in projected}
    if projector.is_split and projector.is_refresh is not None and projected:
      rule_states = _refresh_all(projector, [leaves[i] for i in projected],
                                 [projector_leaves[i] for i in projected], projected, count,
                                 base_key)
      rule_states = dict(zip(projected, rule_states))

    rule_keeps_state = (apply_step is not None and projector.is_split
                        and projector.honours_apply_step)
    inner_in, inner_params, projections, new_projector_leaves = [], [], [], []
    for i, (g, ps) in enumerate(zip(leaves, projector_leaves)):
      if not _is_projected(ps):
        inner_in.append(g)
        inner_params.append(param_leaves[i])
        projections.append(None)
        new_projector_leaves.append(ps)
        continue
      layout = ps.layout
      nb = len(layout.batch_shape)
      with projectors_lib.transposed_view(layout.transpose):
        if rule_keeps_state:  # skips by itself: no select (and no copy) of its moments
          rule_step = _vmap_batch(
              lambda g_, s_, c_, ok: projector.step(g_, s_, c_, apply_step=ok), nb,
              in_axes=(0, 0, None, None))
          p_t, g_hat, new_rule_state = rule_step(to_matrix(g, layout), rule_states[i], count,
                                                 apply_step)
          # ... but P may have been refreshed at this step: back to the stored one
          new_rule_state = new_rule_state._replace(
              p=jnp.where(apply_step, new_rule_state.p, ps.state.p))
        elif projector.is_split:  # the cheap per-step part, on the state after any refresh
          rule_step = _vmap_batch(projector.step, nb, in_axes=(0, 0, None))
          p_t, g_hat, new_rule_state = rule_step(to_matrix(g, layout), rule_states[i], count)
        else:  # a rule given as (init, update) only, with its own branches
          rule_update = _vmap_batch(projector.update, nb, in_axes=(0, 0, None, 0))
          keys = _leaf_keys(base_key, i, count, layout.batch_shape)
          p_t, g_hat, new_rule_state = rule_update(to_matrix(g, layout), ps.state, count, keys)
      inner_in.append(g_hat.astype(g.dtype))  # Ĝ = Pₜᵀ G'
      if project_params:
        w = param_leaves[i]
        w_hat = jnp.matmul(jnp.swapaxes(p_t, -1, -2), to_matrix(w, layout).astype(p_t.dtype))
        inner_params.append(w_hat.astype(w.dtype))
      projections.append((ps.state.p, p_t, new_rule_state.p))  # stored P, Pₜ, Pₜ₊₁
      new_projector_leaves.append(ProjectedLeafState(state=new_rule_state, layout=layout))

    inner_state = state.inner_state
    if transport_state:  # M ← (Pₜᵀ P_stored) M where the rule replaced P inside update
      rotations = [
          None if proj is None else _change_of_basis(proj[1], proj[0], count == 0)
          for proj in projections
      ]
      inner_state = _transport_first_moment(inner_state, rotations, treedef)
    try:
      inner_updates, new_inner_state = inner.update(
          treedef.unflatten(inner_in), inner_state,
          treedef.unflatten(inner_params) if project_params else None, **extra_args
      )
    except ValueError as e:  # optax's "you are not passing `params`" (e.g. inner=optax.adamw)
      if project_params or _NO_PARAMS_HINT not in str(e):
        raise
      raise ValueError(
          "The inner transformation of scale_by_subspace_descent reads params, but it gets "
          "none unless project_params=True (then it gets Pₜᵀ W' for projected leaves). For "
          "weight decay, apply it outside instead: optax.chain(scale_by_subspace_descent("
          "optax.scale_by_adam(), ...), optax.add_decayed_weights(wd), "
          "optax.scale_by_learning_rate(lr)), as osd_jax.osd_adamw does."
      ) from e
    n_leaves = treedef.flatten_up_to(inner_updates)
    out = []
    for g, n, proj, ps in zip(leaves, n_leaves, projections, projector_leaves):
      if proj is None:
        out.append(n)
        continue
      p_t = proj[1]
      u = scale * jnp.matmul(p_t, n.astype(p_t.dtype))  # U' = scale · Pₜ N
      out.append(from_matrix(u, ps.layout).astype(g.dtype))

    if transport_state:  # M ← (Pₜ₊₁ᵀ Pₜ) M where the rule moves P for the next step
      rotations = [
          None if proj is None else _change_of_basis(proj[2], proj[1], False)
          for proj in projections
      ]
      new_inner_state = _transport_first_moment(new_inner_state, rotations, treedef)

    new_count = optax.safe_increment(count)
    new_projector_state = treedef.unflatten(new_projector_leaves)
    if apply_step is not None:  # a skipped step leaves the whole state as it was
      new_count = jnp.where(apply_step, new_count, count)
      if not rule_keeps_state:
        new_projector_state = skipping.select_state(apply_step, new_projector_state,
                                                    state.projector_state)
      if not skipping.honours_apply_step(inner):  # else inner kept its state itself
        new_inner_state = skipping.select_state(apply_step, new_inner_state, state.inner_state)
    new_state = SubspaceDescentState(
        count=new_count,
        inner_state=new_inner_state,
        projector_state=new_projector_state,
    )
    if apply_step is not None:
      skipping.record_honoured(new_state)
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _matrix_layout(layout: MatrixLayout) -> MatrixLayout:
  """The layout of one matrix of a leaf with batch axes: ``layout`` without them."""
  keep = [a for a in range(len(layout.shape)) if a not in layout.batch_axes]
  where = {a: i for i, a in enumerate(keep)}
  return MatrixLayout(tuple(layout.shape[a] for a in keep), (),
                      tuple(where[a] for a in layout.reduction_axes),
                      tuple(where[a] for a in layout.output_axes), layout.transpose, layout.rank)


def _refresh_leaf(projector, g, layout: MatrixLayout, state, count, keys):
  """``projector.refresh`` of every matrix of one leaf, one matrix at a time.

  A leaf with batch axes (stacked layers) is refreshed by a loop (``lax.map``) over its
  matrices, not a vmap: an SVD works on a copy of its input and makes a Vᵀ as large as it, so
  a vmapped SVD of a stacked [n_layers, s, L] gradient would hold n_layers of those at once.
  The slices are taken from the gradient as stored (``to_matrix`` inside the loop), so a
  transposed view is never materialised for the whole stack.
  """
  if not layout.batch_shape:
    with projectors_lib.transposed_view(layout.transpose):
      return projector.refresh(to_matrix(g, layout), state, count, keys)
  one = _matrix_layout(layout)
  n = math.prod(layout.batch_shape)
  rest = tuple(a for a in range(g.ndim) if a not in layout.batch_axes)
  g_flat = jnp.transpose(g, layout.batch_axes + rest).reshape((n,) + one.shape)
  flat = lambda a: a.reshape((n,) + a.shape[len(layout.batch_shape):])  # noqa: E731
  state_flat = jax.tree.map(flat, state)

  def body(args):
    g_i, state_i, key_i = args
    with projectors_lib.transposed_view(layout.transpose):
      return projector.refresh(to_matrix(g_i, one), state_i, count, key_i)

  new = jax.lax.map(body, (g_flat, state_flat, keys.reshape((n,))))
  return jax.tree.map(lambda a: a.reshape(layout.batch_shape + a.shape[1:]), new)


def _refresh_all(projector, grads, leaf_states, indices, count, base_key) -> list:
  """Rule states for step t of the projected leaves: refreshed on refresh steps, else kept.

  One ``lax.cond`` for all of them: the refresh branch runs ``projector.refresh`` on every
  matrix, one after another (:func:`_refresh_leaf`: a loop over batch axes), so the branch's
  temporaries are those of one matrix's refresh, however many matrices there are; the other
  branch returns the states as they are.  The keys are made inside the refresh branch; the
  gradients enter the branch as stored (``to_matrix`` inside), so the steady-state path
  neither copies nor gathers them.
  """
  states = [ps.state for ps in leaf_states]
  due = projector.is_refresh(count)

  def refresh_all(grads, states):
    out = []
    for g, ps, state, i in zip(grads, leaf_states, states, indices):
      keys = _leaf_keys(base_key, i, count, ps.layout.batch_shape)
      new = _refresh_leaf(projector, g, ps.layout, state, count, keys)
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


def _transport_first_moment(inner_state, rotations, treedef):
  """M ← R M for every projected leaf of every ``mu`` field in the inner state."""

  def rotate(node):
    if not _has_first_moment(node):
      return node
    try:
      mu_leaves = treedef.flatten_up_to(node.mu)
    except (ValueError, TypeError):
      return node
    new_mu = [
        m if r is None else jnp.matmul(r, m.astype(r.dtype)).astype(m.dtype)
        for m, r in zip(mu_leaves, rotations)
    ]
    return node._replace(mu=treedef.unflatten(new_mu))

  return jax.tree.map(rotate, inner_state, is_leaf=_has_first_moment)
