"""Ready-made optimizers: ``osd_adamw``, ``osd_lion`` and the ``galore_adamw`` baseline."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osd_jax import projectors, skipping
from osd_jax.dimension_numbers import WeightDimensionNumbers
from osd_jax.subspace_descent import scale_by_subspace_descent


def _check_learning_rate(learning_rate) -> None:
  if learning_rate is None:
    raise ValueError("learning_rate is required: a float or an optax schedule, e.g. 1e-3.")


def reference_projector_learning_rate(
    learning_rate: optax.ScalarOrSchedule,
    peak_learning_rate: float | None = None,
    update_proj_gap: int = 200,
) -> optax.ScalarOrSchedule:
  """The official code's projector step size: (1/update_proj_gap) · lr(t) / lr_max.

  ``peak_learning_rate`` (lr_max) is required when ``learning_rate`` is a schedule.
  """
  if callable(learning_rate):
    if peak_learning_rate is None:
      raise ValueError(
          "peak_learning_rate is required with reference_code=True and a learning-rate "
          "schedule: the reference projector step is lr(t) / lr_max / update_proj_gap."
      )
    return lambda count: learning_rate(count) / peak_learning_rate / update_proj_gap
  peak = learning_rate if peak_learning_rate is None else peak_learning_rate
  return learning_rate / peak / update_proj_gap


def _projector_rule(
    learning_rate, *, orthogonality_weight, projector_lr_ratio, projector_learning_rate,
    projector_weight_decay, weight_decay, projector_init, projector_optimizer, reference_code,
    peak_learning_rate, update_proj_gap,
):
  """Online-PCA rule with the alias defaults (paper) or the reference-code variant."""
  if reference_code:
    projectors._check_every(update_proj_gap, "update_proj_gap")  # noqa: SLF001
    orthogonality_weight = 0.0
    if projector_weight_decay is None:
      projector_weight_decay = 0.01
    if projector_learning_rate is None:
      projector_learning_rate = reference_projector_learning_rate(
          learning_rate, peak_learning_rate, update_proj_gap)
  if projector_weight_decay is None:
    projector_weight_decay = weight_decay  # wd_P = wd (DESIGN §2)
  if projector_learning_rate is None:  # η(t) = α · lr(t)
    if callable(learning_rate):
      projector_learning_rate = lambda count: projector_lr_ratio * learning_rate(count)  # noqa: E731
    else:
      projector_learning_rate = projector_lr_ratio * learning_rate
  return projectors.online_pca(
      learning_rate=projector_learning_rate,
      optimizer=projector_optimizer,
      orthogonality_weight=orthogonality_weight,
      weight_decay=projector_weight_decay,
      init=projector_init,
  )


def osd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    orthogonality_weight: float = 0.1,
    projector_lr_ratio: float = 5.0,
    projector_learning_rate: optax.ScalarOrSchedule | None = None,
    projector_weight_decay: float | None = None,
    projector_init: str = "svd",
    projector_optimizer: optax.GradientTransformation | None = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mask: Any = None,
    mu_dtype: Any = None,
    projector_dtype: Any = None,
    side: str = "smaller",
    transport_state: bool = False,
    reference_code: bool = False,
    peak_learning_rate: float | None = None,
    update_proj_gap: int = 200,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW in a rank-r subspace moved every step by online PCA (Online Subspace Descent).

  Per projected weight (G' ∈ ℝ^{s×L}, P ∈ ℝ^{s×r}):

      Ĝ = PₜᵀG',  N = Adam(Ĝ),  U = scale·PₜN,  W ← W − lr(t)·(U + wd·W),
      Pₜ₊₁ = Pₜ − α·lr(t)·(Adam_P(∇L(Pₜ)) + wd_P·Pₜ),
      L(P) = ‖PPᵀG̃ − G̃‖²_F + λ‖PᵀP − I‖²_F,  G̃ = G'/‖G'‖_F,

  with P₀ the top-r singular vectors of G'₀ and no projector step at t = 0.  Other leaves
  (vectors, ``rank >= min(m, n)``, or mapped to None) get plain AdamW.

  Under ``optax.inject_hyperparams`` every numeric argument may be an (array) hyperparameter;
  ``rank`` sets shapes and goes in ``static_args``, as does any callable that is not a schedule
  (``mu_dtype``, a callable ``weight_dimension_numbers`` or ``mask``).  The same holds for
  :func:`osd_lion` and :func:`galore_adamw`.

  Args:
    learning_rate: lr(t), a float or an optax schedule.
    rank: r.
    b1, b2, eps, eps_root, mu_dtype: the inner Adam (:func:`osd_jax.skipping.scale_by_adam`,
      ``optax.scale_by_adam`` that also honours ``apply_step``).
    weight_decay: decoupled weight decay; ``mask`` selects the leaves it applies to.
    scale: multiplies the back-projected update.
    orthogonality_weight: λ.
    projector_lr_ratio: α; the projector's step is α·lr(t).
    projector_learning_rate: overrides α·lr(t) with any float or schedule.
    projector_weight_decay: wd_P; defaults to ``weight_decay``.
    projector_init: ``"svd"``, ``"randomized"`` (range finder, no full SVD) or ``"random"``.
    projector_optimizer: default ``optax.scale_by_adam(0.9, 0.999, 1e-8)``.
    weight_dimension_numbers: which leaves/axes are projected (default: every 2-D leaf).
    projector_dtype: dtype of P and its optimizer state (None = float32).
    side, transport_state, seed: see :func:`osd_jax.scale_by_subspace_descent`.
    reference_code: the official code's choices instead of the paper's: λ = 0 (whatever
      ``orthogonality_weight`` is), AdamW on P with weight decay 0.01 (unless
      ``projector_weight_decay`` is given), projector step lr(t)/lr_max/``update_proj_gap``
      (unless ``projector_learning_rate`` is given; ``peak_learning_rate`` = lr_max is
      needed for schedules).

  Example:
    >>> import jax, jax.numpy as jnp, optax, osd_jax
    >>> params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
    >>> tx = osd_jax.osd_adamw(1e-3, rank=2, weight_decay=0.1)
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Liang, Liu, Chen & Liu, *Memory-Efficient LLM Training with Online Subspace Descent*,
    arXiv:2408.12857, 2024.
  """
  _check_learning_rate(learning_rate)
  rule = _projector_rule(
      learning_rate, orthogonality_weight=orthogonality_weight,
      projector_lr_ratio=projector_lr_ratio, projector_learning_rate=projector_learning_rate,
      projector_weight_decay=projector_weight_decay, weight_decay=weight_decay,
      projector_init=projector_init, projector_optimizer=projector_optimizer,
      reference_code=reference_code, peak_learning_rate=peak_learning_rate,
      update_proj_gap=update_proj_gap,
  )
  return optax.chain(
      scale_by_subspace_descent(
          skipping.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
          rank, rule, scale=scale, weight_dimension_numbers=weight_dimension_numbers,
          projector_dtype=projector_dtype, side=side, transport_state=transport_state,
          seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )


class ScaleByLionMomentumState(NamedTuple):
  """State of :func:`scale_by_lion_momentum`."""

  mu: Any  # first moment, params-shaped


def scale_by_lion_momentum(b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None):
  """Lion without the sign: c = (1 − b1)·g + b1·m, then m ← (1 − b2)·g + b2·m.

  Used by ``osd_lion(sign_after_projection=True)`` (the reference code), where the sign is
  taken after the back-projection.
  """

  def init_fn(params):
    return ScaleByLionMomentumState(optax.tree.zeros_like(params, dtype=mu_dtype))

  def update_fn(updates, state, params=None):
    del params
    c = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m.astype(g.dtype), updates, state.mu)
    mu = jax.tree.map(lambda g, m: ((1 - b2) * g + b2 * m).astype(m.dtype), updates, state.mu)
    return c, ScaleByLionMomentumState(mu)

  return optax.GradientTransformation(init_fn, update_fn)


def osd_lion(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    orthogonality_weight: float = 0.1,
    projector_lr_ratio: float = 5.0,
    projector_learning_rate: optax.ScalarOrSchedule | None = None,
    projector_weight_decay: float | None = None,
    projector_init: str = "svd",
    projector_optimizer: optax.GradientTransformation | None = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mask: Any = None,
    mu_dtype: Any = None,
    projector_dtype: Any = None,
    side: str = "smaller",
    transport_state: bool = False,
    sign_after_projection: bool = False,
    reference_code: bool = False,
    peak_learning_rate: float | None = None,
    update_proj_gap: int = 200,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Lion in a rank-r subspace moved by online PCA (the paper's OSD-Lion).

      Ĝ = PₜᵀG',  N = sign((1−b1)Ĝ + b1M),  M ← (1−b2)Ĝ + b2M,
      U = scale·PₜN,  W ← W − lr(t)·(U + wd·W),

  with P moved as in :func:`osd_adamw`.  ``sign_after_projection=True`` (implied by
  ``reference_code=True``) takes the sign of the back-projected update instead,
  U = sign(scale·Pₜ((1−b1)Ĝ + b1M)), as the official code does; then ``scale`` (> 0) has
  no effect.  Other arguments as :func:`osd_adamw` (``reference_code=True`` also sets λ = 0
  whatever ``orthogonality_weight`` is).

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.osd_lion(1e-4, rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 16))})

  References:
    Liang, Liu, Chen & Liu, arXiv:2408.12857, 2024; Chen et al., *Symbolic Discovery of
    Optimization Algorithms*, NeurIPS 2023.
  """
  _check_learning_rate(learning_rate)
  sign_after_projection = sign_after_projection or reference_code
  rule = _projector_rule(
      learning_rate, orthogonality_weight=orthogonality_weight,
      projector_lr_ratio=projector_lr_ratio, projector_learning_rate=projector_learning_rate,
      projector_weight_decay=projector_weight_decay, weight_decay=weight_decay,
      projector_init=projector_init, projector_optimizer=projector_optimizer,
      reference_code=reference_code, peak_learning_rate=peak_learning_rate,
      update_proj_gap=update_proj_gap,
  )
  if sign_after_projection:
    inner = scale_by_lion_momentum(b1=b1, b2=b2, mu_dtype=mu_dtype)
  else:
    inner = optax.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype)
  parts = [
      scale_by_subspace_descent(
          inner, rank, rule, scale=scale, weight_dimension_numbers=weight_dimension_numbers,
          projector_dtype=projector_dtype, side=side, transport_state=transport_state,
          seed=seed,
      )
  ]
  if sign_after_projection:
    parts.append(optax.scale_by_sign())
  parts += [optax.add_decayed_weights(weight_decay, mask),
            optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*parts)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    svd_method: str = "svd",
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mask: Any = None,
    mu_dtype: Any = None,
    projector_dtype: Any = None,
    side: str = "smaller",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW (the baseline): AdamW in the top-r singular subspace, refreshed every T steps.

      Pₜ = top-r left singular vectors of G'ₜ  if t % T == 0  else Pₜ₋₁,
      N = Adam(PₜᵀG'),  U = scale·PₜN,  W ← W − lr(t)·(U + wd·W).

  P spans the smaller side of each matrix (the GaLore code's orientation); Adam's state
  is kept across refreshes.  ``svd_method="randomized"`` swaps the SVD for a range finder.

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.galore_adamw(1e-2, rank=2, update_proj_gap=200)
    >>> state = tx.init({"w": jnp.ones((8, 16))})

  References:
    Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection*,
    ICML 2024.
  """
  _check_learning_rate(learning_rate)
  projectors._check_every(update_proj_gap, "update_proj_gap")  # noqa: SLF001
  return optax.chain(
      scale_by_subspace_descent(
          skipping.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
          rank, projectors.svd(every=update_proj_gap, method=svd_method), scale=scale,
          weight_dimension_numbers=weight_dimension_numbers, projector_dtype=projector_dtype,
          side=side, seed=seed,
      ),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
