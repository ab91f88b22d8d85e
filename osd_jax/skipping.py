"""Skipping a step inside the optimizer: the ``apply_step`` extra argument.

A trainer that skips non-finite steps keeps the old optimizer state with
``where(ok, new, old)``. For Adam's moments that select costs a copy of every moment: the update
N = m̂/(√v̂ + ε) is computed from the new moments while the selected ones are written over the
old (donated) buffers, so XLA keeps the old ones apart (7B, r = 512: 4.4 GiB; see
benchmarks/RESULTS.md §7). Passing the decision into the update instead,

    updates, state = tx.update(grads, state, params, apply_step=ok)

lets :func:`scale_by_adam` select its moments first and compute N from the selected ones (the
same N whenever ``ok``), and :func:`osd_jax.scale_by_subspace_descent` return its whole state
unchanged when ``ok`` is False. The updates are not zeroed: the caller keeps its params.

:func:`honouring_apply_step` lets a caller check, at trace time, which subspace-descent states
honoured it (a wrapper that does not forward extra arguments would drop it).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax

# update functions of the transformations that honour ``apply_step`` themselves
_HONOURING: set = set()
_SEEN: contextvars.ContextVar = contextvars.ContextVar("osd_jax_apply_step_seen", default=None)


def honours_apply_step(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx`` leaves its state as it was when called with ``apply_step=False``."""
  return tx.update in _HONOURING


def select_state(apply_step, new: Any, old: Any) -> Any:
  """``new`` where ``apply_step``, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(apply_step, a, b), new, old)


@contextlib.contextmanager
def honouring_apply_step() -> Iterator[list]:
  """Collects (trace time) every subspace-descent state that honoured ``apply_step``.

  Example:
    >>> import jax.numpy as jnp, osd_jax
    >>> tx = osd_jax.osd_adamw(1e-3, rank=2)
    >>> params = {"w": jnp.ones((4, 6))}
    >>> with osd_jax.skipping.honouring_apply_step() as seen:
    ...   _ = tx.update(params, tx.init(params), params, apply_step=jnp.bool_(False))
    >>> len(seen)
    1
  """
  seen: list = []
  token = _SEEN.set(seen)
  try:
    yield seen
  finally:
    _SEEN.reset(token)


def record_honoured(state) -> None:
  """Called (at trace time) by a transformation that kept its own state for ``apply_step``."""
  seen = _SEEN.get()
  if seen is not None:
    seen.append(state)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  mu_dtype: Any = None) -> optax.GradientTransformationExtraArgs:
  r"""Adam's scaling, as ``optax.scale_by_adam``, that also honours ``apply_step``.

      m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   t ← t + 1   (only where ``apply_step``)
      N = m̂ / (√(v̂ + ε_root) + ε),   m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)

  N is computed from the (selected) moments, so the select is written in place. The state is an
  ``optax.ScaleByAdamState``; without ``apply_step`` the values are optax's.

  Example:
    >>> import jax.numpy as jnp
    >>> from osd_jax import skipping
    >>> tx = skipping.scale_by_adam()
    >>> g = {"w": jnp.ones(3)}
    >>> state = tx.init(g)
    >>> _, kept = tx.update(g, state, apply_step=jnp.bool_(False))
    >>> int(kept.count), kept.mu["w"].tolist()
    (0, [0.0, 0.0, 0.0])
  """
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    nu = optax.tree.zeros_like(params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  def update_fn(updates, state, params=None, *, apply_step=None, **extra_args):
    del params, extra_args
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    if apply_step is not None:
      mu, nu = select_state(apply_step, mu, state.mu), select_state(apply_step, nu, state.nu)
      count = jnp.where(apply_step, count, state.count)
    # at a skipped step count may be 0: the bias correction then divides by 0 (N is unused)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    n = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    mu = optax.tree.cast(mu, mu_dtype)
    nu = optax.tree.cast_like(nu, state.nu)
    return n, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  _HONOURING.add(update_fn)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
