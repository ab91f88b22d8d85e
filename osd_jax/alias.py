"""Ready-made optimizers: ``osd_adamw``, ``osd_lion`` and the ``galore_adamw`` baseline."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from osd_jax import projectors, skipping, transforms
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


class ProjectorOptions(NamedTuple):
  """How :func:`osd_adamw` and :func:`osd_lion` build and move each projector P (online PCA).

  Example:
    >>> import osd_jax
    >>> tx = osd_jax.osd_adamw(3e-3, rank=32,
    ...                        projector=osd_jax.ProjectorOptions(lr_ratio=2.0))
  """

  lr_ratio: float = 5.0  # α: the projector's step is α·lr(t)
  orthogonality_weight: float = 0.1  # λ, the weight of ‖PᵀP − I‖² (0 with reference_code)
  learning_rate: optax.ScalarOrSchedule | None = None  # the step η(t), instead of α·lr(t)
  weight_decay: float | None = None  # wd_P (default: the optimizer's weight_decay)
  init: str = "svd"  # P₀: "svd", "randomized" (range finder) or "random"
  # P's optimizer: a name of osd_jax.projectors.projector_optimizer ("adam", "lion",
  # "adafactor"; its moments in the alias's state_dtype) or any transformation
  optimizer: str | optax.GradientTransformation = "adam"
  dtype: Any = None  # of P and its optimizer state (None: float32)
  side: str | None = None  # the side P spans; "smaller" ("reference" with reference_code)
  seed: int = 0  # seeds the randomized/random inits
  # reference_code only: the projector step lr(t)/peak_learning_rate/update_proj_gap
  update_proj_gap: int = 200
  peak_learning_rate: float | None = None  # lr_max; needed when learning_rate is a schedule


def _online_pca_rule(learning_rate, weight_decay, options: ProjectorOptions, reference_code,
                     state_dtype=None):
  """Online-PCA rule with the alias defaults (paper) or the reference-code variant; a named
  projector optimizer keeps its moments in ``state_dtype``."""
  orthogonality_weight, wd_p, eta = (options.orthogonality_weight, options.weight_decay,
                                     options.learning_rate)
  if reference_code:
    projectors.check_every(options.update_proj_gap, "update_proj_gap")
    orthogonality_weight = 0.0
    wd_p = 0.01 if wd_p is None else wd_p
    if eta is None:
      eta = reference_projector_learning_rate(learning_rate, options.peak_learning_rate,
                                              options.update_proj_gap)
  if wd_p is None:
    wd_p = weight_decay  # wd_P = wd (docs/design.md §2)
  if eta is None:  # η(t) = α · lr(t)
    ratio = options.lr_ratio
    eta = ((lambda count: ratio * learning_rate(count)) if callable(learning_rate)
           else ratio * learning_rate)
  optimizer = options.optimizer
  if optimizer is None or isinstance(optimizer, str):
    optimizer = projectors.projector_optimizer(optimizer or "adam", state_dtype=state_dtype,
                                               seed=options.seed)
  return projectors.online_pca(learning_rate=eta, optimizer=optimizer,
                               orthogonality_weight=orthogonality_weight, weight_decay=wd_p,
                               init=options.init)


def _projector_options(projector) -> ProjectorOptions:
  if projector is None:
    return ProjectorOptions()
  if not isinstance(projector, ProjectorOptions):
    raise TypeError(f"projector must be an osd_jax.ProjectorOptions, e.g. "
                    f"ProjectorOptions(lr_ratio=2.0), got {type(projector).__name__}.")
  return projector


def _online_subspace_descent(inner, learning_rate, rank, *, weight_decay, mask, scale,
                             projector, weight_dimension_numbers, transport_state,
                             reference_code, state_dtype, tail=()):
  """``inner`` in the subspace online PCA moves, then [tail,] weight decay and the lr."""
  _check_learning_rate(learning_rate)
  options = _projector_options(projector)
  side = options.side or ("reference" if reference_code else "smaller")
  rule = _online_pca_rule(learning_rate, weight_decay, options, reference_code, state_dtype)
  return skipping.chain(
      scale_by_subspace_descent(
          inner, rank, rule,
          scale=DEFAULT_SCALE if scale is None else scale,
          weight_dimension_numbers=weight_dimension_numbers, projector_dtype=options.dtype,
          side=side, transport_state=transport_state, seed=options.seed),
      *tail,
      *_learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask),
  )


#: The back-projection scale of every alias: GaLore's α, the official OSD run's, and the
#: trainer's; at tiny scale, each at its best lr, eval perplexity 115.0 ± 1.7 against 182.0 ± 8.3
#: with scale 1 (benchmarks/RESULTS.md §4c).
DEFAULT_SCALE = 0.25


def osd_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float | None = None,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: float = 0.0,
    mask: Any = None,
    scale: float | None = None,
    projector: ProjectorOptions | None = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    transport_state: bool = False,
    reference_code: bool = False,
    state_dtype: Any = None,
) -> skipping.SkippableTransformation:
  r"""AdamW in a rank-r subspace moved every step by online PCA (Online Subspace Descent).

  Per projected weight (G' ∈ ℝ^{s×L}, P ∈ ℝ^{s×r}):

      Ĝ = PₜᵀG',  N = Adam(Ĝ),  U = scale·PₜN,  W ← W − lr(t)·(U + wd·W),
      Pₜ₊₁ = Pₜ − α·lr(t)·(Adam_P(∇L(Pₜ)) + wd_P·Pₜ),
      L(P) = ‖PPᵀG̃ − G̃‖²_F + λ‖PᵀP − I‖²_F,  G̃ = G'/‖G'‖_F,

  with P₀ the top-r singular vectors of G'₀ and no projector step at t = 0 (docs/design.md §2).
  Other leaves (vectors, ``rank >= min(m, n)``, or mapped to None) get plain AdamW.

  Under ``optax.inject_hyperparams`` every numeric argument may be an (array) hyperparameter;
  ``rank`` sets shapes and goes in ``static_args``, as does any callable that is not a schedule
  (``mu_dtype``, a callable ``weight_dimension_numbers`` or ``mask``). The ``projector`` options
  are passed as they are.

  Args:
    learning_rate: lr(t), a float or an optax schedule.
    rank: r.
    b1, b2, eps, eps_root, mu_dtype: the inner Adam (:func:`osd_jax.skipping.scale_by_adam`);
      eps defaults to 1e-8 (1e-6, the official default, with ``reference_code=True``).
    weight_decay: decoupled weight decay; ``mask`` selects the leaves it applies to.
    scale: multiplies the back-projected update; default :data:`DEFAULT_SCALE` (0.25).
    projector: :class:`ProjectorOptions` (α, λ, P's init, optimizer and dtype...).
    weight_dimension_numbers: which leaves/axes are projected (default: every 2-D leaf).
    transport_state: see :func:`osd_jax.scale_by_subspace_descent`.
    state_dtype: where the moments live — the inner Adam's (projected and full-rank leaves)
      and the projector's Adam's: None (the gradients' dtype; ``mu_dtype`` for the first
      moment), ``"float32"``, ``"bfloat16"``, ``"int8"`` (8 bits per element: e4m3 codes with
      a scale per block of 256; ``"float8"`` is the same, ``"int8_dynamic"`` the dynamic map:
      :mod:`osd_jax.quantization`); compact moments are updated in float32 and written back
      by stochastic rounding (:mod:`osd_jax.transforms`). P itself keeps
      ``projector.dtype`` (bfloat16 is enough with stochastic rounding; never 8 bits).
    reference_code: reproduce the official PyTorch code (kyleliang919/Online-Subspace-Descent,
      ``GaLoreAdamW`` with ``proj_type="continuous"``) instead of the paper's equations: λ = 0;
      P moved by AdamW with weight decay 0.01 at step lr(t)/lr_max/``update_proj_gap`` (both in
      ``projector``); Adam's eps added before the bias corrections
      (:func:`scale_by_reference_adam`, eps 1e-6); decay of the updated weights,
      W ← (W − lr·U)(1 − lr·wd) (:func:`scale_by_learning_rate_then_decay`); square matrices
      project their reduction side.  The exceptions not reproduced are listed in
      docs/design.md §6.

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
  if eps is None:
    eps = 1e-6 if reference_code else 1e-8
  return _online_subspace_descent(
      _adam(reference_code, b1, b2, eps, eps_root, mu_dtype, state_dtype,
            _projector_options(projector).seed),
      learning_rate, rank, weight_decay=weight_decay, mask=mask, scale=scale,
      projector=projector, weight_dimension_numbers=weight_dimension_numbers,
      transport_state=transport_state, reference_code=reference_code, state_dtype=state_dtype)


def _no_compact_reference(reference_code, state_dtype):
  if reference_code and state_dtype is not None:
    raise ValueError("state_dtype is not available with reference_code=True (the official "
                     "code's optimizers keep float32 state); leave it None.")


def _adam(reference_code, b1, b2, eps, eps_root, mu_dtype, state_dtype=None, seed=0):
  _no_compact_reference(reference_code, state_dtype)
  if not reference_code:  # optax.scale_by_adam, honouring apply_step, compact state
    return transforms.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                                    state_dtype=state_dtype, seed=seed)
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
    mu_dtype: Any = None,
    sign_after_projection: bool = False,
    weight_decay: float = 0.0,
    mask: Any = None,
    scale: float | None = None,
    projector: ProjectorOptions | None = None,
    weight_dimension_numbers: WeightDimensionNumbers = None,
    transport_state: bool = False,
    reference_code: bool = False,
    state_dtype: Any = None,
) -> skipping.SkippableTransformation:
  r"""Lion in a rank-r subspace moved by online PCA (the paper's OSD-Lion).

      Ĝ = PₜᵀG',  N = sign((1−b1)Ĝ + b1M),  M ← (1−b2)Ĝ + b2M,
      U = scale·PₜN,  W ← W − lr(t)·(U + wd·W),

  with P moved as in :func:`osd_adamw`.  ``sign_after_projection=True`` (implied by
  ``reference_code=True``) takes the sign of the back-projected update instead,
  U = sign(scale·Pₜ((1−b1)Ĝ + b1M)), as the official code does; then ``scale`` (> 0) has
  no effect.  ``reference_code=True`` reproduces the official ``GaLoreLion`` with
  ``proj_type="continuous"``, with the choices listed in :func:`osd_adamw`.

  Args:
    learning_rate: lr(t), a float or an optax schedule (Lion wants a smaller lr than AdamW,
      e.g. 3–10× smaller).
    rank: r.
    b1: Lion's interpolation weight for the update direction.
    b2: Lion's decay rate of the momentum M; ``mu_dtype`` its dtype.
    sign_after_projection: take the sign of the back-projected update (the official code's
      choice) instead of Lion's sign in the r×L coordinates.
    weight_decay, mask, scale, projector, weight_dimension_numbers, transport_state,
      reference_code, state_dtype: as in :func:`osd_adamw` (``state_dtype`` is Lion's momentum
      and the projector's Adam; not with ``sign_after_projection``).

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.osd_lion(1e-4, rank=2)
    >>> state = tx.init({"w": jnp.ones((8, 16))})

  References:
    Liang, Liu, Chen & Liu, arXiv:2408.12857, 2024; Chen et al., *Symbolic Discovery of
    Optimization Algorithms*, NeurIPS 2023.
  """
  sign_after_projection = sign_after_projection or reference_code
  if sign_after_projection:
    if state_dtype is not None:
      raise ValueError("state_dtype is not available with sign_after_projection (or "
                       "reference_code); leave it None.")
    inner, tail = scale_by_lion_momentum(b1=b1, b2=b2, mu_dtype=mu_dtype), [optax.scale_by_sign()]
  else:
    inner = transforms.scale_by_lion(b1=b1, b2=b2, mu_dtype=mu_dtype, state_dtype=state_dtype,
                                     seed=_projector_options(projector).seed)
    tail = []
  return _online_subspace_descent(
      inner, learning_rate, rank, weight_decay=weight_decay, mask=mask, scale=scale,
      projector=projector, weight_dimension_numbers=weight_dimension_numbers,
      transport_state=transport_state, reference_code=reference_code, state_dtype=state_dtype,
      tail=tail)


def galore_adamw(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = DEFAULT_SCALE,
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
    state_dtype: Any = None,
) -> skipping.SkippableTransformation:
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
    state_dtype: the inner Adam's moments, as in :func:`osd_adamw`.

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
  if eps is None:
    eps = 1e-6 if reference_code else 1e-8
  side = side or ("reference" if reference_code else "smaller")
  if reference_code and svd_method == "svd":
    svd_method = "official"
  rule = projectors.svd(every=update_proj_gap, method=svd_method, align=align_signs)
  return skipping.chain(
      scale_by_subspace_descent(
          _adam(reference_code, b1, b2, eps, 0.0, mu_dtype, state_dtype, seed),
          rank, rule, scale=scale,
          weight_dimension_numbers=weight_dimension_numbers, projector_dtype=projector_dtype,
          side=side, seed=seed,
      ),
      *_learning_rate_and_decay(reference_code, learning_rate, weight_decay, mask),
  )
