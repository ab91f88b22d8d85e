"""Skipping a step inside the optimizer: the ``apply_step`` extra argument.

A trainer that skips non-finite steps keeps the old optimizer state with
``where(ok, new, old)``. For Adam's moments that select costs a copy of every moment: the update
N = m̂/(√v̂ + ε) is computed from the new moments while the selected ones are written over the
old (donated) buffers, so XLA keeps the old ones apart (7B, r = 512: 4.4 GiB; see
benchmarks/RESULTS.md §7). Passing the decision into the update instead,

    updates, state = tx.update(grads, state, params, apply_step=ok)

lets a transformation that *honours* ``apply_step`` keep its own state (and compute N from the
kept moments: the same N whenever ``ok``), so no copy is needed. The updates are not zeroed: the
caller keeps its params.

Whether a transformation honours it is structural, a property of the transformation object: it
is a :class:`SkippableTransformation` (an ``optax.GradientTransformationExtraArgs`` subclass that
adds no field). :func:`osd_jax.transforms.scale_by_adam`, ``scale_by_lion``,
:func:`osd_jax.scale_by_subspace_descent`, the aliases and :func:`chain` of skippable parts are;
``optax.chain`` or ``optax.inject_hyperparams`` around them are not (they do not say so), and
:func:`honour_apply_step` makes any transformation honour it by selecting its state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


class SkippableTransformation(optax.GradientTransformationExtraArgs):
  """A transformation whose ``update(..., apply_step=False)`` returns its state unchanged.

  Bitwise unchanged, with the updates still computed (the caller keeps its params). Build one
  with :func:`skippable`; test for one with :func:`honours_apply_step`.
  """

  __slots__ = ()


def skippable(init_fn, update_fn) -> SkippableTransformation:
  """Marks ``(init_fn, update_fn)`` as honouring ``apply_step`` (see the module docstring)."""
  return SkippableTransformation(init_fn, update_fn)


def honours_apply_step(tx: optax.GradientTransformation) -> bool:
  """Whether ``tx`` leaves its state as it was when called with ``apply_step=False``."""
  return isinstance(tx, SkippableTransformation)


def select_state(apply_step, new: Any, old: Any) -> Any:
  """``new`` where ``apply_step``, else ``old``, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(apply_step, a, b), new, old)


def _without_apply_step(extra_args: dict) -> dict:
  return {k: v for k, v in extra_args.items() if k != "apply_step"}


def honour_apply_step(tx: optax.GradientTransformation) -> SkippableTransformation:
  """``tx`` made to honour ``apply_step``: its state is selected with ``where(ok, new, old)``.

  ``tx`` itself is returned when it honours it already. The select is free for small states
  (step counts, empty states) and costs a copy of each selected array otherwise.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from osd_jax import skipping
    >>> tx = skipping.honour_apply_step(optax.scale_by_lion())
    >>> g = {"w": jnp.ones(3)}
    >>> _, kept = tx.update(g, tx.init(g), apply_step=jnp.bool_(False))
    >>> kept.mu["w"].tolist()
    [0.0, 0.0, 0.0]
  """
  if honours_apply_step(tx):
    return tx
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    apply_step = extra_args.get("apply_step")
    out, new_state = tx.update(updates, state, params, **_without_apply_step(extra_args))
    if apply_step is not None:
      new_state = select_state(apply_step, new_state, state)
    return out, new_state

  return skippable(tx.init, update_fn)


def chain(*transformations: optax.GradientTransformation) -> SkippableTransformation:
  """``optax.chain`` that honours ``apply_step``: the same state (a tuple of the parts' states).

  Parts that honour ``apply_step`` get it; the states of the others are selected
  (:func:`honour_apply_step`), which is free for the usual tail of a chain (weight decay,
  learning rate: empty states and a step count).

  Example:
    >>> import optax
    >>> from osd_jax import skipping
    >>> tx = skipping.chain(skipping.scale_by_adam(), optax.scale_by_learning_rate(1e-3))
    >>> skipping.honours_apply_step(tx)
    True
  """
  parts = tuple(honour_apply_step(t) for t in transformations)
  inner = optax.chain(*parts)
  return skippable(inner.init, inner.update)


def scale_by_adam(*args, **kwargs) -> SkippableTransformation:
  """Adam's scaling that honours ``apply_step``: :func:`osd_jax.transforms.scale_by_adam`
  (which also keeps its moments in bfloat16 or 8 bits)."""
  from osd_jax import transforms  # transforms builds on this module

  return transforms.scale_by_adam(*args, **kwargs)
