"""Projectors read out of an optimizer state for metrics: orthogonality, drift, captured energy."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from osd_jax.dimension_numbers import to_matrix
from osd_jax.subspace_descent import (
  ProjectedLeafState,
  SubspaceDescentState,
  is_projected_leaf,
)


def _projected_states(opt_state: Any) -> list[ProjectedLeafState]:
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_projected_leaf)
          if is_projected_leaf(x)]


def projectors_of(opt_state: Any) -> list[jax.Array]:
  """Every projector P (shape ``(*batch, s, r)``) in an optimizer state, in tree order."""
  return [leaf.state.p for leaf in _projected_states(opt_state)]


def _as_matrices(p: jax.Array) -> jax.Array:
  return p.reshape((-1,) + p.shape[-2:]).astype(jnp.float32)


def projector_orthogonality_error(opt_state: Any) -> jax.Array:
  """Mean over projected matrices of ‖PᵀP − I_r‖_F (0.0 when nothing is projected).

  P is set from the first gradient, so until the first update every P is all zeros (whose
  error would read √r, like a broken projector): such projectors are left out of the mean,
  and the result is NaN while none is set yet, e.g. for ``tx.init(params)``.

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.osd_adamw(1e-3, rank=2)
    >>> params = {"w": jnp.arange(32.0).reshape(4, 8)}
    >>> state = tx.init(params)
    >>> bool(jnp.isnan(osd_jax.projector_orthogonality_error(state)))
    True
    >>> _, state = tx.update(params, state, params)  # P₀ = top singular vectors: orthonormal
    >>> float(osd_jax.projector_orthogonality_error(state)) < 1e-5
    True
  """
  errors, set_ = [], []
  for p in projectors_of(opt_state):
    p = _as_matrices(p)
    gram = jnp.einsum("bsr,bsq->brq", p, p) - jnp.eye(p.shape[-1])
    errors.append(jnp.sqrt(jnp.sum(gram**2, axis=(-2, -1))))
    set_.append(jnp.any(p != 0, axis=(-2, -1)))
  if not errors:
    return jnp.zeros([], jnp.float32)
  errors, set_ = jnp.concatenate(errors), jnp.concatenate(set_)
  n_set = jnp.sum(set_)
  return jnp.where(n_set > 0, jnp.sum(jnp.where(set_, errors, 0.0)) / jnp.maximum(n_set, 1),
                   jnp.nan)


ORTHONORMALIZATIONS = ("qr", "newton_schulz")
NEWTON_SCHULZ_STEPS = 12


def _orthonormal(p: jax.Array, method: str) -> jax.Array:
  """An orthonormal basis Q (*batch, s, r) of span(P).

  ``"qr"``: a QR (LAPACK on CPU). ``"newton_schulz"``: Q = P (PᵀP)^(−1/2), the inverse square
  root by :data:`NEWTON_SCHULZ_STEPS` coupled Newton–Schulz iterations — matmuls only (no LAPACK
  call, which XLA:CPU can deadlock on inside a loop), exact to float32 for a P near orthonormal
  (the projectors here: ‖PᵀP − I‖ well below 1), approximate for a badly conditioned one.
  """
  if method == "qr":  # a zero P (not set yet) spans nothing: Q = 0, as Newton–Schulz gives
    q = jnp.linalg.qr(p)[0]
    return jnp.where(jnp.any(p != 0, axis=(-2, -1), keepdims=True), q, 0.0)
  if method != "newton_schulz":
    raise ValueError(f"method must be one of {ORTHONORMALIZATIONS}, got {method!r}")
  a = jnp.einsum("...sr,...sq->...rq", p, p)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  # scaled by an upper bound of its largest eigenvalue (the largest absolute row sum), so the
  # iteration converges; for PᵀP ≈ I the bound is ≈ 1 and a few steps suffice
  c = jnp.maximum(jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1), jnp.finfo(a.dtype).tiny)
  y, z = a / c[..., None, None], jnp.broadcast_to(eye, a.shape)
  for _ in range(NEWTON_SCHULZ_STEPS):
    t = 0.5 * (3.0 * eye - z @ y)
    y, z = y @ t, t @ z
  return p @ (z / jnp.sqrt(c)[..., None, None])  # z → (A/c)^(−1/2)


def subspace_drift(old_state: Any, new_state: Any, method: str = "qr") -> jax.Array:
  """Mean over matrices of 1 − ‖Q_newᵀ Q_old‖²_F / r ∈ [0, 1] (mean sin² of principal angles).

  Q are orthonormal bases of the two projectors (``method``: ``"qr"`` or ``"newton_schulz"``,
  see :func:`_orthonormal`); 0 means the subspace did not move, 1 that it is new (also when the
  old P was not set yet: a zero P spans nothing).
  """
  drifts = []
  for p_old, p_new in zip(projectors_of(old_state), projectors_of(new_state)):
    q_old = _orthonormal(_as_matrices(p_old), method)
    q_new = _orthonormal(_as_matrices(p_new), method)
    overlap = jnp.sum(jnp.einsum("bsr,bsq->brq", q_new, q_old) ** 2, axis=(-2, -1))
    drifts.append(1.0 - overlap / p_old.shape[-1])
  if not drifts:
    return jnp.zeros([], jnp.float32)
  return jnp.mean(jnp.concatenate(drifts))


def _is_subspace_state(x) -> bool:
  return isinstance(x, SubspaceDescentState)


def captured_energy(grads: Any, opt_state: Any, method: str = "qr") -> jax.Array:
  """Per projected matrix, the fraction of the gradient's energy inside span(P).

      e = ‖QᵀG'‖²_F / ‖G'‖²_F ∈ [0, 1],   Q = an orthonormal basis of P (QR),

  for every projected matrix of ``grads`` (each batch slice of a scanned or stacked weight
  counts as one matrix), with G' the gradient in the projector's orientation and P the
  projector stored in ``opt_state``.  Returns a 1-D float32 array in tree order (empty when
  nothing is projected); its mean and min are what the trainer logs.

  Which P is measured is the caller's choice: with the state after ``update`` it is the P the
  optimizer carries forward — for ``svd``/``random``/``frozen`` the Pₜ that projected Gₜ, for
  ``online_pca`` Pₜ₊₁, one projector step (of size α·lr) after Pₜ.  ``grads`` must have the
  structure of the params the state was built for; ``method``: as :func:`subspace_drift`.

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> params = {"w": jnp.ones((8, 16))}
    >>> tx = osd_jax.galore_adamw(1e-2, rank=2)
    >>> g = {"w": jnp.arange(128.0).reshape(8, 16)}
    >>> _, state = tx.update(g, tx.init(params), params)
    >>> float(osd_jax.captured_energy(g, state)[0]) > 0.99  # P₀ spans G's top singular vectors
    True
  """
  # optax.MaskedNode positions (optax.masked, a layer of osd_jax.layerwise) line up too
  grad_leaves = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  out = []
  for sub in jax.tree.leaves(opt_state, is_leaf=_is_subspace_state):
    if not _is_subspace_state(sub):
      continue
    nodes = jax.tree.leaves(sub.projector_state, is_leaf=lambda x: is_projected_leaf(x)
                            or isinstance(x, optax.MaskedNode))
    if len(nodes) != len(grad_leaves):
      raise ValueError(
          f"captured_energy: grads have {len(grad_leaves)} leaves but the optimizer state was "
          f"built for {len(nodes)}; pass gradients with the structure of the params.")
    for g, node in zip(grad_leaves, nodes):
      if not is_projected_leaf(node):
        continue
      gp = to_matrix(g, node.layout).astype(jnp.float32)  # G' (*batch, s, L)
      q = _orthonormal(node.state.p.astype(jnp.float32), method)  # (*batch, s, r)
      inside = jnp.sum(jnp.matmul(jnp.swapaxes(q, -1, -2), gp) ** 2, axis=(-2, -1))
      total = jnp.sum(gp**2, axis=(-2, -1))
      out.append((inside / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)).reshape(-1))
  if not out:
    return jnp.zeros([0], jnp.float32)
  return jnp.concatenate(out)
