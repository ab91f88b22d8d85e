"""Projector rules: how the subspace P of each weight matrix is chosen and moved.

A rule is a :class:`ProjectorRule` of pure functions that act on ONE matrix
G' ∈ ℝ^{s×L} (``scale_by_subspace_descent`` vmaps them over batch axes). Its work is split
in two, so that a whole tree of matrices costs one ``conditional`` per step:

* ``init(s, L, rank, dtype) -> state`` allocates the state (it must have a field ``p``,
  the projector P ∈ ℝ^{s×r}); no gradient is seen yet, so P is a placeholder.
* ``is_refresh(count) -> bool`` says whether step ``count`` = t is a refresh step; it must
  not depend on the matrix (t = 0 for online PCA and ``frozen``, t % T == 0 for ``svd`` and
  ``random``).
* ``refresh(g, state, count, key) -> state`` is the expensive part (an SVD, a QR...): the
  state whose ``p`` is the new Pₜ.  ``scale_by_subspace_descent`` runs it for every
  projected matrix inside ONE ``lax.cond(is_refresh(t), refresh all, keep all)``, so a
  steady-state step executes no SVD/QR/eigh and holds no per-matrix branch.
* ``step(g, state, count) -> (p_t, g_hat, new_state)`` is the cheap per-step part, given the
  state after the (possible) refresh: the projector Pₜ used at step t, the projected gradient
  Ĝ = Pₜᵀ G' (r×L, float in P's dtype) and the state holding the P for step t + 1.  It must
  not branch: online PCA skips its projector step at t = 0 with an elementwise
  ``jnp.where`` on the s×r results.  A rule built with ``honours_apply_step=True`` also takes
  ``step(..., apply_step=ok)`` (a traced bool, see :mod:`osd_jax.skipping`) and then keeps
  every field of its state but ``p`` when ``ok`` is False (the transformation restores ``p``,
  which a refresh may have replaced), so a skipped step costs no copy of its moments.
* ``rule.update(g, state, count, key) -> (p_t, g_hat, new_state)`` is the whole step of one
  matrix on its own (refresh if due, then step), for using a rule outside the transformation.

Orientation.  G' is either the gradient G as stored or a transposed view Gᵀ (a weight whose
projector spans its output side).  That changes no value of a product, only how XLA is best
asked to lay it out, so the built-in rules take it explicitly: ``rule.oriented(transposed)``
is the rule to use on such a view (:func:`project`, :func:`gradient_times` and
:func:`frobenius_norm` take the same flag), and ``scale_by_subspace_descent`` asks for it per
leaf.  A rule without an ``orient`` function ignores it.

Rules: :func:`online_pca` (the paper's), :func:`svd` (GaLore), :func:`random`,
:func:`frozen`.  Write your own with :func:`projector_rule`.

Signs of singular vectors.  The initial P is sign-canonicalised (the largest-magnitude entry
of every column is positive), so every backend gives the same P₀.  For :func:`online_pca` the
signs of P's columns change nothing: flipping column i flips row i of Ĝ and of the inner first
moment, and Adam, Lion and the projector's Adam are all odd per coordinate, so U = P·N and the
next P (up to the same flip) are unchanged.  For the periodic rules (:func:`svd`,
:func:`random`) they DO matter: the inner state is carried across a refresh, so a new column
whose sign is opposite to the old one meets its old momentum with the wrong sign.  By default
every refresh after the first aligns each new column with the previous P
(:func:`align_signs`: the sign of diag(P_newᵀ P_old)), which is backend-independent and never
flips momentum spuriously.  ``svd(method="official")`` instead keeps the raw LAPACK signs of
svd(G) in the official PyTorch code's orientation (:func:`official_singular_subspace`), as
``galore_adamw(reference_code=True)`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from osd_jax import rounding, skipping, transforms

INITS = ("svd", "randomized", "random")


class ProjectorRule(NamedTuple):
  """A projector rule: pure functions on one matrix (see the module docstring).

  Build one with :func:`projector_rule`, which checks the fields.
  """

  init: Callable[[int, int, int, Any], Any]
  step: Callable[..., tuple[jax.Array, jax.Array, Any]]
  is_refresh: Callable[[jax.Array], Any] | None = None
  refresh: Callable[[jax.Array, Any, jax.Array, jax.Array], Any] | None = None
  honours_apply_step: bool = False  # step(..., apply_step=ok) keeps the state (but p) if not ok
  # transposed -> the same rule laid out for a transposed view G' = Gᵀ (None: ignores it)
  orient: Callable[[bool], ProjectorRule] | None = None
  takes_seed: bool = False  # step(..., seed=s): a uint32 per matrix for stochastic rounding

  def oriented(self, transposed: bool) -> ProjectorRule:
    """This rule for G' = Gᵀ (``transposed``) or G' = G; the values are the same."""
    return self if self.orient is None else self.orient(bool(transposed))

  def update(self, g: jax.Array, state: Any, count, key: jax.Array):
    """One matrix's whole step: refresh if due, then step. Returns ``(p_t, g_hat, new_state)``."""
    if self.refresh is not None:
      due = self.is_refresh(count)
      if isinstance(due, (bool, np.bool_)):
        state = self.refresh(g, state, count, key) if due else state
      else:
        state = jax.lax.cond(due, lambda: self.refresh(g, state, count, key), lambda: state)
    return self.step(g, state, count)


def projector_rule(
    init: Callable[[int, int, int, Any], Any],
    step: Callable[..., tuple[jax.Array, jax.Array, Any]],
    is_refresh: Callable[[jax.Array], Any] | None = None,
    refresh: Callable[[jax.Array, Any, jax.Array, jax.Array], Any] | None = None,
    honours_apply_step: bool = False,
    orient: Callable[[bool], ProjectorRule] | None = None,
    takes_seed: bool = False,
) -> ProjectorRule:
  """A :class:`ProjectorRule` from its parts.

  Args:
    init: ``(s, L, rank, dtype) -> state`` with a field ``p`` (s×r).
    step: ``(g, state, count) -> (p_t, g_hat, new_state)``, the per-step part on the state
      after any refresh (``state.p`` is Pₜ); no SVD/QR/eigh and no ``lax.cond`` here.
    is_refresh: ``count -> bool`` (a traced scalar or a Python bool), the same for every
      matrix; None for a rule that never refreshes.
    refresh: ``(g, state, count, key) -> state`` with ``p`` = the new Pₜ, run only when
      ``is_refresh(count)``; ``key`` is a fresh PRNG key per matrix and step.
    honours_apply_step: ``step`` also takes ``apply_step=ok`` and, when ``ok`` is False,
      returns the state it was given except for ``p`` (the state must be a NamedTuple).
    orient: ``transposed -> ProjectorRule``, the rule laid out for a transposed view of the
      gradient (see the module docstring); None when the layout does not matter.
    takes_seed: ``step`` also takes ``seed=`` (a uint32 scalar per matrix, deterministic in the
      run's seed, the step, the leaf and the matrix) for stochastic rounding of its state.

  Example:
    >>> import jax.numpy as jnp, optax, osd_jax
    >>> from osd_jax import projectors
    >>> rule = projectors.projector_rule(  # P = the first r coordinate axes, never moved
    ...     init=lambda s, L, r, dtype: projectors.PeriodicProjectorState(jnp.eye(s, r)),
    ...     step=lambda g, state, count: (state.p, state.p.T @ g, state))
    >>> tx = osd_jax.scale_by_subspace_descent(optax.identity(), rank=2, projector=rule)
    >>> u, _ = tx.update({"w": jnp.ones((3, 4))}, tx.init({"w": jnp.ones((3, 4))}))
    >>> u["w"][2].tolist()
    [0.0, 0.0, 0.0, 0.0]
  """
  if (is_refresh is None) != (refresh is None):
    raise ValueError("projector_rule: give both is_refresh and refresh, or neither.")
  if not callable(init) or not callable(step):
    raise TypeError("projector_rule: init and step must be functions "
                    "(init(s, L, rank, dtype), step(g, state, count)).")
  return ProjectorRule(init, step, is_refresh, refresh, honours_apply_step, orient, takes_seed)


# --------------------------------------------------------------------------- rank-r products


def project(p: jax.Array, g: jax.Array, transposed: bool = False) -> jax.Array:
  """Ĝ = Pᵀ G' (r×L) for P (s×r) and G' (s×L).

  When G' = Gᵀ is a transposed view (``transposed``), the product is taken as (G P)ᵀ in G's
  own layout; the optimization barrier keeps XLA from folding the transposes back into one
  transposed-operand dot, which ran 25–40% slower on CPU for the 60M shapes.
  """
  if transposed:
    return jax.lax.optimization_barrier(g.T @ p).T
  return p.T @ g


def frobenius_norm(g: jax.Array, transposed: bool = False) -> jax.Array:
  """‖G'‖_F, read in G's own layout when G' = Gᵀ is a transposed view (``transposed``).

  (XLA's CPU reduction wants a row-major operand and would otherwise copy Gᵀ first.)
  """
  return jnp.linalg.norm(g.T if transposed else g)


def gradient_times(g: jax.Array, a: jax.Array, transposed: bool = False) -> jax.Array:
  """G' Aᵀ (s×r) for G' (s×L) and A (r×L), laid out as :func:`project`."""
  if transposed:
    return jax.lax.optimization_barrier(a @ g.T).T
  return g @ a.T


# --------------------------------------------------------------------------- initial P


def canonical_signs(u: jax.Array) -> jax.Array:
  """Flips each column of ``u`` so that its largest-magnitude entry is positive."""
  idx = jnp.argmax(jnp.abs(u), axis=0)
  pivots = jnp.take_along_axis(u, idx[None, :], axis=0)[0]
  return u * jnp.where(pivots < 0, -1, 1).astype(u.dtype)


def top_singular_subspace(g: jax.Array, rank: int) -> jax.Array:
  """The top-``rank`` left singular vectors of g (s×L) by a full (thin) SVD."""
  u, _, _ = jnp.linalg.svd(g, full_matrices=False)
  return canonical_signs(u[:, :rank])


def official_singular_subspace(g: jax.Array, rank: int, transposed: bool = False) -> jax.Array:
  """Top-``rank`` singular vectors of g (s×L) as the official PyTorch code computes them.

  The official code takes ``torch.linalg.svd`` of the gradient in ``nn.Linear`` layout,
  G_torch = (output × reduction), and keeps the raw LAPACK signs: P = U[:, :r] when P spans the
  output side (here G' = G_torch, a transposed view: ``transposed``) and P = Vh[:r]ᵀ when it
  spans the reduction side (G' = G_torchᵀ).  The subspace equals
  :func:`top_singular_subspace`'s; only the signs can differ, and they follow the LAPACK
  backend, so results match the official code wherever the backends agree.
  """
  if transposed:  # G' = G_torch: P = U[:, :r] of svd(G_torch)
    u, _, _ = jnp.linalg.svd(g, full_matrices=False)
    return u[:, :rank]
  _, _, vh = jnp.linalg.svd(g.T, full_matrices=False)  # G' = G_torchᵀ: P = Vh[:r]ᵀ
  return vh[:rank].T


def align_signs(p_new: jax.Array, p_old: jax.Array) -> jax.Array:
  """Flips each column of ``p_new`` whose inner product with the same column of ``p_old`` is < 0.

  d = diag(P_newᵀ P_old);  P_new ← P_new · diag(sign(d)), with sign(0) = +1 (so a zero
  ``p_old``, e.g. before the first refresh, changes nothing).
  """
  d = jnp.sum(p_new * p_old.astype(p_new.dtype), axis=-2, keepdims=True)
  return p_new * jnp.where(d < 0, -1, 1).astype(p_new.dtype)


def randomized_subspace(
    g: jax.Array, rank: int, key: jax.Array, oversampling: int = 8, power_iterations: int = 2
) -> jax.Array:
  """Top-``rank`` left singular subspace of g (s×L) by a randomized range finder.

  Halko, Martinsson & Tropp (2011), Alg. 4.4: Y = (G Gᵀ)^q G Ω with QR re-orthonormalisation,
  then the top-r eigenvectors of the small (r+p)×(r+p) matrix QᵀG GᵀQ.  Cost O(s·L·(r+p))
  per matmul and no SVD of G.
  """
  s, L = g.shape
  k = min(rank + oversampling, s, L)
  omega = jax.random.normal(key, (L, k), g.dtype)
  q, _ = jnp.linalg.qr(g @ omega)
  for _ in range(power_iterations):
    q, _ = jnp.linalg.qr(g.T @ q)
    q, _ = jnp.linalg.qr(g @ q)
  b = q.T @ g  # k × L
  _, vecs = jnp.linalg.eigh(b @ b.T)  # ascending eigenvalues
  return canonical_signs(q @ vecs[:, ::-1][:, :rank])


def random_subspace(s: int, rank: int, key: jax.Array, dtype=jnp.float32) -> jax.Array:
  """A uniformly random orthonormal s×r basis (QR of a Gaussian matrix)."""
  q, r = jnp.linalg.qr(jax.random.normal(key, (s, rank), dtype))
  return q * jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(dtype)


def initial_projector(g: jax.Array, rank: int, key: jax.Array, method: str = "svd") -> jax.Array:
  """P₀ from the first gradient g (s×L): ``"svd"``, ``"randomized"`` or ``"random"``."""
  if method == "svd":
    return top_singular_subspace(g, rank)
  if method == "randomized":
    return randomized_subspace(g, rank, key)
  if method == "random":
    return random_subspace(g.shape[0], rank, key, g.dtype)
  raise ValueError(f"projector init must be one of {INITS}, got {method!r}.")


def _working_dtype(dtype) -> jnp.dtype:
  """The dtype to compute a projector in: P's own, but at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_init(init: str) -> None:
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}.")


def check_every(every, name: str = "every") -> None:
  """Validates a refresh period T: a positive int, NumPy int or integer array scalar.

  Traced values (e.g. from ``optax.inject_hyperparams`` under ``jit``) are used as they are:
  ``count % T == 0`` works on them.
  """
  if isinstance(every, jax.core.Tracer):
    return
  if isinstance(every, (jax.Array, np.ndarray, np.generic)) and not isinstance(every, np.bool_):
    value = np.asarray(every)
    if value.ndim == 0 and np.issubdtype(value.dtype, np.integer) and value >= 1:
      return
  elif not isinstance(every, bool) and isinstance(every, int) and every >= 1:
    return
  raise ValueError(f"{name} must be a positive int (steps between refreshes), got {every!r}.")


# --------------------------------------------------------------------------- online PCA


def online_pca_loss(p: jax.Array, g: jax.Array, orthogonality_weight: float) -> jax.Array:
  """L(P) = ‖P Pᵀ G̃ − G̃‖²_F + λ‖PᵀP − I_r‖²_F with G̃ = G' / max(‖G'‖_F, tiny)."""
  g_tilde = g / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(g.dtype).tiny)
  residual = p @ (p.T @ g_tilde) - g_tilde
  gram_error = p.T @ p - jnp.eye(p.shape[1], dtype=p.dtype)
  return jnp.sum(residual**2) + orthogonality_weight * jnp.sum(gram_error**2)


def online_pca_gradient(
    p: jax.Array, g: jax.Array, orthogonality_weight: float, g_hat: jax.Array | None = None,
    transposed: bool = False,
) -> jax.Array:
  """∇L(P) of :func:`online_pca_loss` in closed form, O(s·L·r) work.

  With A = PᵀG̃ (r×L), B = G̃Aᵀ (s×r), C = AAᵀ = PᵀB and E = PᵀP − I (r×r), R = PA − G̃:

      ∇L = 2(R G̃ᵀ P + G̃ Rᵀ P) + 4λ P E = 2(P C − B + B E) + 4λ P E
         = 2 [P B] [C + 2λE; E − I],

  since R G̃ᵀ P = P A Aᵀ − G̃ Aᵀ and Rᵀ P = Aᵀ (PᵀP − I).  Besides the two s×L×r products
  (A, B) that is one s×r×2r product for [PᵀP, PᵀB] and one for the result: no r×r×L product,
  and no s×s, L×L or s×L temporary beyond G̃ itself.  With P and G sharded over s, A and
  [PᵀP, PᵀB] are partial sums (one all-reduce each) and everything else stays local.  Pass
  ``g_hat = Pᵀ G'`` (already computed for the projection) to skip the first matmul;
  ``transposed`` as in :func:`project`.
  """
  norm = jnp.maximum(frobenius_norm(g, transposed), jnp.finfo(g.dtype).tiny)
  a = (project(p, g, transposed) if g_hat is None else g_hat) / norm  # A = Pᵀ G̃
  b = gradient_times(g, a, transposed) / norm  # B = G̃ Aᵀ
  rank = p.shape[-1]
  eye = jnp.eye(rank, dtype=p.dtype)
  pb = jnp.concatenate([p, b], axis=-1)  # [P B] (s×2r)
  gram = p.T @ pb  # [PᵀP, PᵀB] = [E + I, C]
  e = gram[:, :rank] - eye  # E = PᵀP − I
  c = gram[:, rank:]  # C = PᵀB = A Aᵀ
  coeffs = jnp.concatenate([c + (2.0 * orthogonality_weight) * e, e - eye], axis=0)  # 2r×r
  return 2.0 * (pb @ coeffs)


class OnlinePCAState(NamedTuple):
  """State of :func:`online_pca` for one matrix."""

  p: jax.Array  # [s, r] projector for the next step
  opt_state: Any  # projector optimizer state ([s, r] leaves)


def _schedule_value(learning_rate, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


#: :func:`projector_optimizer`'s names: what each keeps per s×r projector besides P.
PROJECTOR_OPTIMIZERS = {
    "adam": "two s×r moments (the paper's)",
    "lion": "one s×r moment",
    "adafactor": "s + r floats (a factored second moment, no momentum)",
}


def projector_optimizer(name: str = "adam", *, state_dtype: Any = None,
                        seed: int = 0) -> optax.GradientTransformation:
  r"""P's optimizer by name: the D of :func:`online_pca`'s step Pₜ₊₁ = Pₜ − η(D + wd·Pₜ).

  * ``"adam"``: D = m̂/(√v̂ + ε) (b1 0.9, b2 0.999, ε 1e-8), two s×r moments, in ``state_dtype``;
  * ``"lion"``: D = sign((1−b1)∇L + b1·m) (b1 0.9, b2 0.99), one s×r moment, in ``state_dtype``;
  * ``"adafactor"``: D = clip(∇L / √V̂) with V̂ = (R Cᵀ)/mean(R), R and C the running row and
    column means of (∇L)² (``optax.scale_by_factored_rms``, factored at every size, decay
    1 − t^-0.8), and Adafactor's update clipping D ← D / max(1, RMS(D)) per projector
    (``optax.clip_by_block_rms(1)``): without it a factored V̂ that underestimates (∇L)² lets
    single entries of D grow far past 1, and P left orthonormality at 60M within 20 steps.
    s + r float32 numbers per projector, at any ``state_dtype``.

  All three are odd per coordinate of ∇L with steps of order one per element, so one η(t) = α·lr(t)
  serves them (plain SGD does not: ∇L of the Frobenius-normalised G̃ is O(1/√(s·r)) per element).
  The memory they keep is :func:`osd_jax.expected_state_bytes`'s ``projector_optimizer``.

  Example:
    >>> import osd_jax
    >>> rule = osd_jax.projectors.online_pca(
    ...     5e-3, optimizer=osd_jax.projectors.projector_optimizer("adafactor"))
  """
  if name == "adam":
    return transforms.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8, state_dtype=state_dtype, seed=seed)
  if name == "lion":
    return transforms.scale_by_lion(b1=0.9, b2=0.99, state_dtype=state_dtype, seed=seed)
  if name == "adafactor":
    factored = optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=1),
                           optax.clip_by_block_rms(1.0))
    # its statistics stay float32 whatever P's dtype (a bf16 P would otherwise give bf16 ones)
    return skipping.honour_apply_step(optax.GradientTransformation(
        lambda p: factored.init(p.astype(jnp.float32)), factored.update))
  raise ValueError(f"projector optimizer must be one of {', '.join(PROJECTOR_OPTIMIZERS)}, "
                   f"got {name!r}.")


def online_pca(
    learning_rate: optax.ScalarOrSchedule,
    optimizer: optax.GradientTransformation | None = None,
    orthogonality_weight: float = 0.1,
    weight_decay: float = 0.0,
    init: str = "svd",
) -> ProjectorRule:
  r"""Online-PCA projector rule (Liang et al., 2024): one optimizer step on L(P) per step.

  At t = 0, P₀ = ``init``(G'₀) and no step is taken.  For t ≥ 1, with the same Gₜ and Pₜ:

      G̃ = G'/max(‖G'‖_F, tiny),  R = PPᵀG̃ − G̃,
      L(P) = ‖R‖²_F + λ‖PᵀP − I‖²_F,   ∇L = 2(RG̃ᵀP + G̃RᵀP) + 4λP(PᵀP − I),
      D = optimizer(∇L),   Pₜ₊₁ = Pₜ − η(t)·(D + wd·Pₜ).

  Args:
    learning_rate: η, a float or a schedule of the global step t (the aliases pass α·lr(t)).
    optimizer: the projector optimizer; default ``projector_optimizer("adam")``
      (``optax.scale_by_adam``'s values; see :func:`projector_optimizer` for the others). Its
      count starts at its first step (t = 1).
    orthogonality_weight: λ, the weight of the ‖PᵀP − I‖² penalty (0 in the reference code).
    weight_decay: decoupled weight decay on P (0.01 in the reference code).
    init: ``"svd"`` (top-r singular vectors of G'₀), ``"randomized"`` or ``"random"``.

  Example:
    >>> import optax, osd_jax
    >>> rule = osd_jax.projectors.online_pca(learning_rate=5e-3)
    >>> tx = osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), rank=2, projector=rule)

  References:
    Liang, Liu, Chen & Liu, *Memory-Efficient LLM Training with Online Subspace Descent*,
    arXiv:2408.12857, 2024.
  """
  _check_init(init)
  if optimizer is None:  # optax.scale_by_adam's values; it also honours apply_step
    optimizer = projector_optimizer("adam")

  def init_fn(s, L, rank, dtype):  # noqa: N803
    p = jnp.zeros((s, rank), dtype)
    return OnlinePCAState(p=p, opt_state=optimizer.init(p))

  def is_refresh(count):
    return count == 0

  def refresh(g, state, count, key):  # P₀ = init(G'₀), in float32 at least (LAPACK's)
    p = state.p
    work = _working_dtype(p.dtype)
    return state._replace(p=initial_projector(g.astype(work), p.shape[-1], key, init)
                          .astype(p.dtype))

  def rule(transposed: bool) -> ProjectorRule:
    def step(g, state, count, apply_step=None, seed=None):
      p_t = state.p
      dtype = p_t.dtype
      p32 = p_t.astype(jnp.float32) if jnp.dtype(dtype).itemsize < 4 else p_t
      g = g.astype(p32.dtype)
      g_hat = project(p32, g, transposed)  # Ĝ = Pₜᵀ G'
      grad = online_pca_gradient(p32, g, orthogonality_weight, g_hat, transposed)  # ∇L(Pₜ)
      # No projector step at t = 0 (nor on a skipped step): an elementwise select on the s×r
      # results, not a branch.
      hold = count == 0 if apply_step is None else (count == 0) | ~apply_step
      extra = {} if seed is None else {"rounding_seed": seed}
      if skipping.honours_apply_step(optimizer):
        # the optimizer keeps its own state and computes D from the kept moments, so the
        # select is written in place (selecting its outputs here instead made XLA copy P's
        # moments at every step: D is computed from the unselected ones)
        d, opt_state = optimizer.update(grad, state.opt_state, p32, apply_step=~hold,
                                        **extra)  # D
      else:
        d, opt_state = optimizer.update(grad, state.opt_state, p32)  # D
        opt_state = skipping.select_state(~hold, opt_state, state.opt_state)
      eta = _schedule_value(learning_rate, count)
      p_next = p32 - eta * (d + weight_decay * p32)  # Pₜ₊₁ = Pₜ − η(D + wd·Pₜ)
      # a P narrower than float32 (bfloat16) keeps the small steps on average: rounded
      # stochastically when given a seed (scale_by_subspace_descent gives one per matrix)
      p_next = (p_next.astype(dtype) if seed is None
                else rounding.stochastic_round(p_next, dtype, rounding.combine_seeds(seed, 1)))
      p_next = jnp.where(hold, p_t, p_next)
      return p_t, g_hat.astype(dtype), OnlinePCAState(p_next, opt_state)

    return projector_rule(init_fn, step, is_refresh, refresh, honours_apply_step=True,
                          orient=rule, takes_seed=True)

  return rule(False)


# --------------------------------------------------------------------------- periodic rules


class PeriodicProjectorState(NamedTuple):
  """State of :func:`svd`, :func:`random` and :func:`frozen`: just P."""

  p: jax.Array  # [s, r]


def _periodic(refresh_fn, is_refresh_step, align: bool = False) -> ProjectorRule:
  """A rule that keeps P between refreshes; ``refresh_fn(g, rank, key, transposed) -> P``."""

  def init_fn(s, L, rank, dtype):  # noqa: N803
    return PeriodicProjectorState(jnp.zeros((s, rank), dtype))

  def rule(transposed: bool) -> ProjectorRule:
    def refresh(g, state, count, key):
      dtype = state.p.dtype
      work = _working_dtype(dtype)  # float32 at least: LAPACK has no bfloat16
      p_new = refresh_fn(g.astype(work), state.p.shape[-1], key, transposed)
      # P_old = 0 at t = 0: no flip
      p_new = align_signs(p_new, state.p.astype(work)) if align else p_new
      return PeriodicProjectorState(p_new.astype(dtype))

    def step(g, state, count):
      p_t = state.p
      return p_t, project(p_t, g.astype(p_t.dtype), transposed), state  # Ĝ = Pₜᵀ G'

    return projector_rule(init_fn, step, is_refresh_step, refresh, orient=rule)

  return rule(False)


SVD_METHODS = ("svd", "randomized", "official")


def svd(every: int = 200, method: str = "svd", align: bool | None = None) -> ProjectorRule:
  """GaLore's rule: P = top-r left singular vectors of G'ₜ whenever t % ``every`` == 0.

  ``method="randomized"`` uses :func:`randomized_subspace` instead of a full SVD;
  ``method="official"`` keeps the raw LAPACK signs of the official code's orientation
  (:func:`official_singular_subspace`).  ``align`` (default: True, except for
  ``method="official"``) flips each refreshed column to agree in sign with the previous P
  (:func:`align_signs`), so the carried inner state is not spuriously negated.

  References:
    Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection*,
    ICML 2024.
  """
  check_every(every)
  if method not in SVD_METHODS:
    raise ValueError(f"method must be one of {SVD_METHODS}, got {method!r}.")
  if align is None:
    align = method != "official"
  if method == "official":
    refresh = lambda g, r, key, t: official_singular_subspace(g, r, t)  # noqa: E731
  else:
    refresh = lambda g, r, key, t: initial_projector(g, r, key, method)  # noqa: E731
  return _periodic(refresh, lambda count: count % every == 0, align)


def random(every: int = 200, seed: int = 0, align: bool = True) -> ProjectorRule:
  """A fresh random orthonormal P every ``every`` steps (ignores the gradient).

  ``align``: as in :func:`svd`.
  """
  check_every(every)

  def refresh(g, rank, key, transposed):
    return random_subspace(g.shape[0], rank, jax.random.fold_in(key, seed), g.dtype)

  return _periodic(refresh, lambda count: count % every == 0, align)


def frozen(init: str = "svd") -> ProjectorRule:
  """P is set once from the first gradient (by ``init``) and never moves."""
  _check_init(init)
  return _periodic(lambda g, r, key, t: initial_projector(g, r, key, init),
                   lambda count: count == 0)
