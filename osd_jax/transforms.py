"""Adam's and Lion's scaling with compact state, honouring ``apply_step``.

``scale_by_adam`` and ``scale_by_lion`` compute what ``optax.scale_by_adam`` and
``optax.scale_by_lion`` compute, and add two things:

* ``apply_step`` (:mod:`osd_jax.skipping`): a False step returns the state bitwise as it was,
  the moments selected before the direction is computed from them (no copy of the moments);
* ``state_dtype``: the moments stored in float32, bfloat16 or 8 bits
  (:mod:`osd_jax.quantization`). The arithmetic is float32 whatever the storage: a stored
  moment is read as float32, updated, and written back by stochastic rounding, so its small
  per-step changes survive on average. The rounding draws its bits from (``seed``, the step
  count, the leaf's path, the element's index): deterministic, so a resumed run continues
  bitwise; with the extra argument ``layer_index`` (:mod:`osd_jax.layerwise` passes it) a layer's
  slice draws the bits it draws inside the whole stack.

Usable in any optax chain (``state_dtype=None``: optax's state, in the gradients' dtype):

  >>> import jax.numpy as jnp, optax
  >>> from osd_jax import transforms
  >>> tx = optax.chain(transforms.scale_by_adam(state_dtype="int8"),
  ...                  optax.scale_by_learning_rate(1e-3))
  >>> state = tx.init({"w": jnp.zeros((4, 300))})
  >>> state[0].mu["w"].codes.dtype, state[0].mu["w"].scale.shape
  (dtype('uint8'), (4, 2))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from osd_jax import quantization, rounding
from osd_jax.skipping import SkippableTransformation, select_state, skippable

_FIRST, _SECOND = 1, 2  # the moments' streams of rounding bits


def _is_leaf(x) -> bool:  # a stored moment: an array, or one Quantized node
  return quantization.is_quantized(x)


def _moments_like(params, state_dtype, *, signed: bool):
  return jax.tree.map(lambda x: quantization.zeros(x, state_dtype, signed=signed), params)


def _load(stored, state_dtype, *, root: bool = False):
  """The moments to compute with: as stored (optax's state), or float32 (compact state).
  ``root``: the 8-bit leaves hold √v (:func:`_store_all`), squared here."""
  if state_dtype is None:
    return stored

  def load(s):
    x = quantization.load(s).astype(jnp.float32)
    return jnp.square(x) if root and quantization.is_quantized(s) else x

  return jax.tree.map(load, stored, is_leaf=_is_leaf)


def _storer(seed, count, extra_args: dict):
  """``store(path, x, like, stream)``: ``x`` into ``like``'s storage with this step's bits.

  The extra args ``rounding_seed`` (replaces ``seed``, e.g. one per matrix from
  :func:`osd_jax.scale_by_subspace_descent`) and ``layer_index`` (:mod:`osd_jax.layerwise`)
  choose the bits."""
  layer = extra_args.get("layer_index")
  seed = extra_args.get("rounding_seed", seed)

  def store(path, x, like, stream):
    offset = 0 if layer is None else jnp.asarray(layer).astype(jnp.uint32) * x.size
    leaf_seed = rounding.combine_seeds(seed, count, rounding.path_seed(path), stream)
    return quantization.store(x, like, seed=leaf_seed, offset=offset)

  return store


def _paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]]


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                  mu_dtype: Any = None, state_dtype: Any = None,
                  seed: int = 0) -> SkippableTransformation:
  r"""Adam's scaling (``optax.scale_by_adam``), honouring ``apply_step``, with compact state.

      m ← β₁m + (1−β₁)g,   v ← β₂v + (1−β₂)g²,   t ← t + 1   (only where ``apply_step``)
      N = m̂ / (√(v̂ + ε_root) + ε),   m̂ = m/(1−β₁ᵗ),  v̂ = v/(1−β₂ᵗ)

  Args:
    b1, b2, eps, eps_root: as ``optax.scale_by_adam``.
    mu_dtype: the first moment's dtype (as optax; ignored when ``state_dtype`` is given).
    state_dtype: None (optax's: the gradients' dtype, ``mu_dtype`` for m), ``"float32"``,
      ``"bfloat16"``, ``"int8"`` (= ``"float8"``: 8-bit e4m3 codes with a scale per block of 256) or
      ``"int8_dynamic"`` (the dynamic map; :mod:`osd_jax.quantization`) for both moments; in 8
      bits Adam's v is stored as √v.
    seed: of the stochastic rounding of compact moments.

  The state is an ``optax.ScaleByAdamState``; its moment leaves are arrays, or
  :class:`osd_jax.quantization.Quantized` in 8 bits.

  Example:
    >>> import jax.numpy as jnp
    >>> from osd_jax import transforms
    >>> tx = transforms.scale_by_adam()
    >>> g = {"w": jnp.ones(3)}
    >>> _, kept = tx.update(g, tx.init(g), apply_step=jnp.bool_(False))
    >>> int(kept.count), kept.mu["w"].tolist()
    (0, [0.0, 0.0, 0.0])
  """
  state_dtype = quantization.check_state_dtype(state_dtype)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    if state_dtype is None:  # optax's own state
      return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                    mu=optax.tree.zeros_like(params, dtype=mu_dtype),
                                    nu=optax.tree.zeros_like(params))
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=_moments_like(params, state_dtype, signed=True),
        nu=_moments_like(params, state_dtype, signed=False))

  def update_fn(updates, state, params=None, *, apply_step=None, **extra_args):
    del params
    mu_old, nu_old = _load(state.mu, state_dtype), _load(state.nu, state_dtype, root=True)
    mu = optax.tree.update_moment(updates, mu_old, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, nu_old, b2, 2)
    count = optax.safe_increment(state.count)
    if apply_step is not None:
      mu, nu = select_state(apply_step, mu, mu_old), select_state(apply_step, nu, nu_old)
      count = jnp.where(apply_step, count, state.count)
    # at a skipped step count may be 0: the bias correction then divides by 0 (N is unused)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    n = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
    if state_dtype is None:
      mu = optax.tree.cast(mu, mu_dtype)
      nu = optax.tree.cast_like(nu, state.nu)
    else:
      store = _storer(seed, count, extra_args)
      mu = _store_all(store, mu, state.mu, _FIRST, apply_step)
      nu = _store_all(store, nu, state.nu, _SECOND, apply_step, root=True)
    return n, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return skippable(init_fn, update_fn)


def _store_all(store, new, stored, stream: int, apply_step, *, root: bool = False):
  """Every leaf of ``new`` into the storage of ``stored``; a skipped step keeps ``stored``
  bitwise (8-bit codes are not re-rounded).

  ``root`` (Adam's v): an 8-bit leaf stores √v, not v. A block's codes reach down to about
  4·10⁻⁶ (e4m3) or 10⁻⁷ (the dynamic map) of its largest value; v = E[g²] spans twice the orders of
  magnitude of the gradients, so stored as it is, a small element of a block rounds to 0 often,
  and the next step divides its m by √((1−β₂)g²) ≈ 0.03|g| instead of |g|: updates 30× too large
  (measured: the tiny demo diverged). √v halves the range in orders of magnitude, as g has."""
  paths = _paths(stored)
  leaves, treedef = jax.tree.flatten(stored, is_leaf=_is_leaf)
  new_leaves = treedef.flatten_up_to(new)
  out = [store(p, jnp.sqrt(x) if root and quantization.is_quantized(like) else x, like, stream)
         for p, x, like in zip(paths, new_leaves, leaves)]
  out = treedef.unflatten(out)
  if apply_step is not None:
    out = select_state(apply_step, out, stored)
  return out


def scale_by_lion(b1: float = 0.9, b2: float = 0.99, mu_dtype: Any = None,
                  state_dtype: Any = None, seed: int = 0) -> SkippableTransformation:
  r"""Lion's scaling (``optax.scale_by_lion``), honouring ``apply_step``, with compact state.

      N = sign((1−b1)g + b1·m),   m ← (1−b2)g + b2·m   (only where ``apply_step``)

  ``state_dtype``, ``seed``: as :func:`scale_by_adam`. The state is an
  ``optax.ScaleByLionState``.

  Example:
    >>> import jax.numpy as jnp
    >>> from osd_jax import transforms
    >>> tx = transforms.scale_by_lion(state_dtype="bfloat16")
    >>> n, state = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
    >>> n["w"].tolist(), state.mu["w"].dtype
    ([1.0, 1.0, 1.0], dtype(bfloat16))
  """
  state_dtype = quantization.check_state_dtype(state_dtype)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    if state_dtype is None:
      mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    else:
      mu = _moments_like(params, state_dtype, signed=True)
    return optax.ScaleByLionState(count=jnp.zeros([], jnp.int32), mu=mu)

  def update_fn(updates, state, params=None, *, apply_step=None, **extra_args):
    del params
    mu_old = _load(state.mu, state_dtype)
    n = jax.tree.map(lambda g, m: jnp.sign((1.0 - b1) * g + b1 * m), updates, mu_old)
    mu = optax.tree.update_moment(updates, mu_old, b2, 1)
    count = optax.safe_increment(state.count)
    if apply_step is not None:
      mu = select_state(apply_step, mu, mu_old)
      count = jnp.where(apply_step, count, state.count)
    if state_dtype is None:
      mu = optax.tree.cast(mu, mu_dtype)
    else:
      mu = _store_all(_storer(seed, count, extra_args), mu, state.mu, _FIRST, apply_step)
    return n, optax.ScaleByLionState(count=count, mu=mu)

  return skippable(init_fn, update_fn)
