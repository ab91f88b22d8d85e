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


def scale_by_reference_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, mu_dtype: Any = None
) -> optax.GradientTransformation:
  r"""Adam as the official OSD/GaLore code computes it (its ``AdamW``, transformers-style).

      m ← b1·m + (1 − b1)·g,   v ← b2·v + (1 − b2)·g²,
      N = √(1 − b2ᵗ)/(1 − b1ᵗ) · m / (√v + eps)  =  m̂ / (√v̂ + eps/√(1 − b2ᵗ)),

  i.e. eps is added to √v *before* the bias corrections (``optax.scale_by_adam`` adds it to
  √v̂, after them); the two differ by the factor √(1 − b2ᵗ) on eps, which matters early in
  training and wherever √v̂ is near eps.  The state is an ``optax.ScaleByAdamState``.
  """

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: ((1 - b1) * g + b1 * m).astype(m.dtype), updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * g * g + b2 * v, updates, state.nu)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.result_type(float))  # float64 under x64
    step = jnp.sqrt(1 - b2**t) / (1 - b1**t)  # √(1 − b2ᵗ)/(1 − b1ᵗ)
    out = jax.tree.map(
        lambda g, m, v: (step * m.astype(v.dtype) / (jnp.sqrt(v) + eps)).astype(g.dtype),
        updates, mu, nu)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleThenDecayState(NamedTuple):
  """State of :func:`scale_by_learning_rate_then_decay`."""

  count: jax.Array  # int32 [], the step t


def scale_by_learning_rate_then_decay(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, mask: Any = None
) -> optax.GradientTransformation:
  r"""The official code's step: the update first, then decay of the *updated* weights.

      W ← (W − lr(t)·U)·(1 − lr(t)·wd),   i.e. Δ = −lr(t)·U − lr(t)·wd·(W − lr(t)·U),

  where optax's ``add_decayed_weights → scale_by_learning_rate`` decays the old weights,
  Δ = −lr(t)·(U + wd·W); the two differ by lr(t)²·wd·U.  ``mask`` (a pytree of bools or a
  callable params -> such a pytree) selects the decayed leaves.  Needs params.
  """

  def init_fn(params):
    del params
    return ScaleThenDecayState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_learning_rate_then_decay needs params in update().")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    if mask is None:
      decayed = jax.tree.map(lambda _: True, params)
    else:
      decayed = mask(params) if callable(mask) else mask

    def step(u, w, d):
      delta = -lr * u  # W − lr·U
      decay = lr * weight_decay * jnp.asarray(d, u.dtype)
      return (delta - decay * (w + delta)).astype(u.dtype)  # then ·(1 − lr·wd)

    out = jax.tree.map(step, updates, params, decayed)
    return out, ScaleThenDecayState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


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
    projectors.check_every(update_proj_gap, "update_proj_gap")
    orthogonality_weight = 0.0
    if projector_weight_decay is None:
      projector_weight_decay = 0.01
    if projector_learning_rate is None:
      projector_learning_rate = reference_projector_learning_rate(
          learning_rate, peak_learning_rate, update_proj_gap)
  if projector_weight_decay is None:
    projector_weight_decay = weight_decay  # wd_P = wd (docs/design.md §2)
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
    eps: float | None = None,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    scale: float | None = None,
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
    side: str | None = None,
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
      ``optax.scale_by_adam`` that also honours ``apply_step``); eps defaults to 1e-8 (1e-6,
      the official default, with ``reference_code=True``).
    weight_decay: decoupled weight decay; ``mask`` selects the leaves it applies to.
    scale: multiplies the back-projected update; default 1.0 (0.25, the official README's
      OSD run, with ``reference_code=True``).
    orthogonality_weight: λ.
    projector_lr_ratio: α; the projector's step is α·lr(t).
    projector_learning_rate: overrides α·lr(t) with any float or schedule.
    projector_weight_decay: wd_P; defaults to ``weight_decay``.
    projector_init: ``"svd"``, ``"randomized"`` (range finder, no full SVD) or ``"random"``.
    projector_optimizer: default ``optax.scale_by_adam(0.9, 0.999, 1e-8)``.
    weight_dimension_numbers: which leaves/axes are projected (default: every 2-D leaf).
    projector_dtype: dtype of P and its optimizer state (None = float32).
    side, transport_state, seed: see :func:`osd_jax.scale_by_subspace_descent`; ``side``
      defaults to ``"smaller"`` (``"reference"`` with ``reference_code=True``).
    reference_code: reproduce the official PyTorch code (kyleliang919/Online-Subspace-Descent,
      ``GaLoreAdamW`` with ``proj_type="continuous"``) instead of the paper's equations:

      * λ = 0 (whatever ``orthogonality_weight`` is); P moved by AdamW with weight decay 0.01
        (unless ``projector_weight_decay`` is given) at step lr(t)/lr_max/``update_proj_gap``
        (unless ``projector_learning_rate`` is given; ``peak_learning_rate`` = lr_max is
        needed for schedules); no projector step at t = 0 (the official P optimizer has no
        gradient then).
      * Adam with eps added before the bias corrections (:func:`scale_by_reference_adam`),
        eps = 1e-6 unless given; scale = 0.25 unless given (the README's OSD command: lr
        1e-2, rank 128, update_proj_gap 200, weight decay 0, warmup 1000 of 10000 steps).
      * Decay of the updated weights, W ← (W − lr·U)(1 − lr·wd)
        (:func:`scale_by_learning_rate_then_decay`).
      * Square matrices project their reduction (input) side (``side="reference"``).

      Deliberate exceptions, not reproduced: (a) matrices with ``rank >= min(m, n)`` stay
      unprojected (plain AdamW); the official code still projects them with a square
      orthogonal P, i.e. Adam in a rotated basis times ``scale``, which saves no memory.
      (b) P and the SVD run in ``projector_dtype`` (float32 by default); the official code
      takes the SVD in float32 (also for float64 gradients) and stores P (and P's AdamW
      state) in the gradient's dtype, bf16 in its pure-bf16 runs.  (c) The official
      schedule's warmup starts at lr = 0; pass such a schedule (the trainer's
      ``--reference-code`` does).  (d) The gradient's norm is floored at the smallest
      normal float (the official code divides by it unguarded).

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
  eps, scale, side = _mode_defaults(reference_code, eps, scale, side, default_scale=1.0)
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
          _adam(reference_code, b1, b2, eps, eps_root, mu_dtype),
          rank, rule, scale=scale, weight_dimension_numbers=weight_dimension_numbers,
          projector_dtype=projector_dtype, side=side, transport_state=transport_state,
          seed=seed,
      ),
      *_learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask),
  )


def _mode_defaults(reference_code, eps, scale, side, default_scale):
  """eps, scale and side when not given: the paper's, or the official code's."""
  if eps is None:
    eps = 1e-6 if reference_code else 1e-8
  if scale is None:
    scale = 0.25 if reference_code else default_scale
  if side is None:
    side = "reference" if reference_code else "smaller"
  return eps, scale, side


def _adam(reference_code, b1, b2, eps, eps_root, mu_dtype):
  if not reference_code:  # optax.scale_by_adam, honouring apply_step (osd_jax.skipping)
    return skipping.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)
  if not isinstance(eps_root, jax.core.Tracer) and bool(jnp.any(jnp.asarray(eps_root) != 0)):
    raise ValueError("eps_root is not used by the official code; leave it at 0.0 with "
                     "reference_code=True.")
  return scale_by_reference_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)


def _learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask):
  """W ← W − lr·(U + wd·W) (optax order), or W ← (W − lr·U)(1 − lr·wd) (the official code)."""
  if reference_code:
    return [scale_by_learning_rate_then_decay(learning_rate, weight_decay, mask)]
  return [optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate)]


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
    scale: float | None = None,
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
    side: str | None = None,
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
  no effect.  ``reference_code=True`` reproduces the official ``GaLoreLion`` with
  ``proj_type="continuous"`` — sign after back-projection, λ = 0, the official projector step
  and P's AdamW, decay of the updated weights W ← (W − lr·U)(1 − lr·wd), ``side="reference"``
  — with the exceptions listed in :func:`osd_adamw`.

  Args:
    learning_rate: lr(t), a float or an optax schedule (Lion wants a smaller lr than AdamW,
      e.g. 3–10× smaller).
    rank: r.
    b1: Lion's interpolation weight for the update direction.
    b2: Lion's decay rate of the momentum M.
    weight_decay: decoupled weight decay; ``mask`` selects the leaves it applies to.
    scale: multiplies the back-projected update (default 1.0, 0.25 with ``reference_code``;
      no effect with ``sign_after_projection``).
    orthogonality_weight: λ.
    projector_lr_ratio: α; the projector's step is α·lr(t).
    projector_learning_rate: overrides α·lr(t) with any float or schedule.
    projector_weight_decay: wd_P; defaults to ``weight_decay``.
    projector_init: ``"svd"``, ``"randomized"`` (range finder, no full SVD) or ``"random"``.
    projector_optimizer: default ``optax.scale_by_adam(0.9, 0.999, 1e-8)``.
    weight_dimension_numbers: which leaves/axes are projected (default: every 2-D leaf).
    mask: the leaves weight decay applies to (as ``optax.add_decayed_weights``).
    mu_dtype: dtype of the momentum M (None = the gradient's dtype).
    projector_dtype: dtype of P and its optimizer state (None = float32).
    side, transport_state, seed: see :func:`osd_jax.scale_by_subspace_descent`.
    sign_after_projection: take the sign of the back-projected update (the official code's
      choice) instead of Lion's sign in the r×L coordinates.
    reference_code: the official code's choices instead of the paper's (see above): λ = 0
      (whatever ``orthogonality_weight`` is), AdamW on P with weight decay 0.01 (unless
      ``projector_weight_decay`` is given), projector step lr(t)/lr_max/``update_proj_gap``
      (unless ``projector_learning_rate`` is given), ``sign_after_projection=True``, decay of
      the updated weights and ``side="reference"``.
    peak_learning_rate: lr_max for ``reference_code`` with a schedule.
    update_proj_gap: the reference code's projector step divisor (only with
      ``reference_code``).

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.osd_lion(1e-4, rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 16))})

  References:
    Liang, Liu, Chen & Liu, arXiv:2408.12857, 2024; Chen et al., *Symbolic Discovery of
    Optimization Algorithms*, NeurIPS 2023.
  """
  _check_learning_rate(learning_rate)
  _, scale, side = _mode_defaults(reference_code, None, scale, side, default_scale=1.0)
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
  parts += _learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask)
  return optax.chain(*parts)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    weight_decay: float = 0.0,
    svd_method: str = "svd",
    align_signs: bool | None = None,
    reference_code: bool = False,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    mask: Any = None,
    mu_dtype: Any = None,
    projector_dtype: Any = None,
    side: str | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore-AdamW (the baseline): AdamW in the top-r singular subspace, refreshed every T steps.

      Pₜ = top-r left singular vectors of G'ₜ  if t % T == 0  else Pₜ₋₁,
      N = Adam(PₜᵀG'),  U = scale·PₜN,  W ← W − lr(t)·(U + wd·W).

  P spans the smaller side of each matrix (the GaLore code's orientation); Adam's state
  is kept across refreshes, and each refreshed column of P is sign-aligned with the previous
  P (``align_signs``, default True) so that the carried first moment is not negated by an
  arbitrary SVD sign.  ``svd_method="randomized"`` swaps the SVD for a range finder.  eps
  defaults to 1e-8.

  ``reference_code=True`` reproduces the official ``GaLoreAdamW`` with ``proj_type="std"``
  wherever the LAPACK backends agree: P from ``svd(G)`` in the official orientation with its
  raw LAPACK signs and no alignment (``projectors.svd(method="official")``), Adam with eps
  before the bias corrections and eps = 1e-6 unless given
  (:func:`scale_by_reference_adam`), decay of the updated weights
  (:func:`scale_by_learning_rate_then_decay`), ``side="reference"``.  Exceptions as listed in
  :func:`osd_adamw` (a), (b), (c).

  Args:
    learning_rate: lr(t), a float or an optax schedule.
    rank: r.
    update_proj_gap: T, the steps between SVD refreshes of P (a positive int).
    scale: multiplies the back-projected update (GaLore's α; 0.25 in the GaLore paper).
    b1, b2, eps, mu_dtype: the inner ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay; ``mask`` selects the leaves it applies to.
    svd_method: ``"svd"`` (full thin SVD) or ``"randomized"`` (range finder, no full SVD).
    weight_dimension_numbers: which leaves/axes are projected (default: every 2-D leaf).
    projector_dtype: dtype of P (None = float32).
    side, seed: see :func:`osd_jax.scale_by_subspace_descent`.

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.galore_adamw(1e-2, rank=2, update_proj_gap=200)
    >>> state = tx.init({"w": jnp.ones((8, 16))})

  References:
    Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection*,
    ICML 2024.
  """
  _check_learning_rate(learning_rate)
  projectors.check_every(update_proj_gap, "update_proj_gap")
  eps, scale, side = _mode_defaults(reference_code, eps, scale, side, default_scale=0.25)
  if reference_code and svd_method == "svd":
    svd_method = "official"
  rule = projectors.svd(every=update_proj_gap, method=svd_method, align=align_signs)
  return optax.chain(
      scale_by_subspace_descent(
          _adam(reference_code, b1, b2, eps, 0.0, mu_dtype),
          rank, rule, scale=scale,
          weight_dimension_numbers=weight_dimension_numbers, projector_dtype=projector_dtype,
          side=side, seed=seed,
      ),
      *_learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask),
  )
