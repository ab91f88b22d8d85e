"""Read projectors out of an optimizer state for metrics: orthogonality error and drift."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from osd_jax.subspace_descent import ProjectedLeafState


def _projected_states(opt_state: Any) -> list[ProjectedLeafState]:
  is_projected = lambda x: isinstance(x, ProjectedLeafState)  # noqa: E731
  return [x for x in jax.tree.leaves(opt_state, is_leaf=is_projected) if is_projected(x)]


def projectors_of(opt_state: Any) -> list[jax.Array]:
  """Every projector P (shape ``(*batch, s, r)``) in an optimizer state, in tree order."""
  return [leaf.state.p for leaf in _projected_states(opt_state)]


def _as_matrices(p: jax.Array) -> jax.Array:
  return p.reshape((-1,) + p.shape[-2:]).astype(jnp.float32)


def projector_orthogonality_error(opt_state: Any) -> jax.Array:
  """Mean over projected matrices of ‖PᵀP − I_r‖_F (0.0 when nothing is projected)."""
  errors = []
  for p in projectors_of(opt_state):
    p = _as_matrices(p)
    gram = jnp.einsum("bsr,bsq->brq", p, p) - jnp.eye(p.shape[-1])
    errors.append(jnp.sqrt(jnp.sum(gram**2, axis=(-2, -1))))
  if not errors:
    return jnp.zeros([], jnp.float32)
  return jnp.mean(jnp.concatenate(errors))


def subspace_drift(old_state: Any, new_state: Any) -> jax.Array:
  """Mean over matrices of 1 − ‖Q_newᵀ Q_old‖²_F / r ∈ [0, 1] (mean sin² of principal angles).

  Q are orthonormal bases of the two projectors (QR); 0 means the subspace did not move.
  """
  drifts = []
  for p_old, p_new in zip(projectors_of(old_state), projectors_of(new_state)):
    q_old, _ = jnp.linalg.qr(_as_matrices(p_old))
    q_new, _ = jnp.linalg.qr(_as_matrices(p_new))
    overlap = jnp.sum(jnp.einsum("bsr,bsq->brq", q_new, q_old) ** 2, axis=(-2, -1))
    drifts.append(1.0 - overlap / p_old.shape[-1])
  if not drifts:
    return jnp.zeros([], jnp.float32)
  return jnp.mean(jnp.concatenate(drifts))
