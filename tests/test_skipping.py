"""apply_step: a skipped step inside the optimizer (osd_jax.skipping)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osd_jax
from osd_jax import skipping


def _grads(seed, shapes):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, shapes.items())}


SHAPES = {"w": (12, 20), "b": (20,)}


def test_scale_by_adam_matches_optax():
  ours, ref = skipping.scale_by_adam(b1=0.8, b2=0.95, eps=1e-6), optax.scale_by_adam(0.8, 0.95,
                                                                                    1e-6)
  s_ours, s_ref = ours.init(_grads(0, SHAPES)), ref.init(_grads(0, SHAPES))
  for t in range(3):
    g = _grads(t + 1, SHAPES)
    n_ours, s_ours = ours.update(g, s_ours, apply_step=jnp.bool_(True) if t else None)
    n_ref, s_ref = ref.update(g, s_ref)
    for a, b in zip(jax.tree.leaves((n_ours, s_ours)), jax.tree.leaves((n_ref, s_ref))):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("make", [
    lambda: osd_jax.osd_adamw(1e-2, 4, weight_decay=0.1),
    lambda: osd_jax.galore_adamw(1e-2, 4, update_proj_gap=2),
    lambda: osd_jax.osd_lion(1e-3, 4),  # its inner does not honour apply_step: osd selects
], ids=["osd_adamw", "galore_adamw", "osd_lion"])
def test_a_skipped_step_leaves_the_whole_state_as_it_was(make):
  tx = make()
  params = _grads(0, SHAPES)
  state = tx.init(params)
  update = jax.jit(lambda g, s, ok: tx.update(g, s, params, apply_step=ok))
  for t in range(3):  # t = 0 (the refresh step) skipped, then applied steps and skipped ones
    nan = jax.tree.map(lambda x: x * jnp.nan, _grads(10 + t, SHAPES))
    _, kept = update(nan, state, jnp.bool_(False))
    _assert_equal(kept, state)
    _, state = update(_grads(20 + t, SHAPES), state, jnp.bool_(True))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  # and applied steps are those of the same optimizer without apply_step
  ref_state = tx.init(params)
  for t in range(3):
    _, ref_state = tx.update(_grads(20 + t, SHAPES), ref_state, params)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_honouring_apply_step_is_a_property_of_the_transformation():
  """Structural: the aliases and skipping.chain say so themselves; optax's chain does not."""
  assert skipping.honours_apply_step(osd_jax.osd_adamw(1e-3, 4))
  assert skipping.honours_apply_step(osd_jax.galore_adamw(1e-3, 4))
  assert skipping.honours_apply_step(skipping.scale_by_adam())
  assert not skipping.honours_apply_step(optax.scale_by_adam())
  assert not skipping.honours_apply_step(optax.chain(osd_jax.osd_adamw(1e-3, 4)))
  tx = skipping.chain(optax.clip_by_global_norm(1.0), osd_jax.osd_adamw(1e-3, 4))
  assert skipping.honours_apply_step(tx)
  # ... and it keeps every part's state on a skipped step (the clip's and the schedule's too)
  params = _grads(0, SHAPES)
  state = tx.init(params)
  _, state = tx.update(_grads(1, SHAPES), state, params)
  _, kept = tx.update(_grads(2, SHAPES), state, params, apply_step=jnp.bool_(False))
  _assert_equal(kept, state)


def test_honour_apply_step_wraps_any_transformation():
  tx = skipping.honour_apply_step(optax.scale_by_lion(b1=0.8))
  assert skipping.honours_apply_step(tx)
  assert skipping.honour_apply_step(tx) is tx
  g = _grads(0, SHAPES)
  state = tx.init(g)
  _, moved = tx.update(g, state, apply_step=jnp.bool_(True))
  _, kept = tx.update(g, moved, apply_step=jnp.bool_(False))
  _assert_equal(kept, moved)
  ref_state = optax.scale_by_lion(b1=0.8).init(g)
  _, ref_state = optax.scale_by_lion(b1=0.8).update(g, ref_state)
  _assert_equal(moved, ref_state)
  assert not all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(moved))


def _donated_update_hlo(apply_step: str) -> str:
  """The compiled donated update of a stacked 8×256×1024 leaf (r = 32) with the skip decision
  ``"outside"`` (the caller selects params and state with ``where(ok, new, old)``), ``"inside"``
  (passed as ``apply_step``; the caller selects params only) or ``"none"`` (no skipping)."""
  params = {"w": jax.ShapeDtypeStruct((8, 256, 1024), jnp.float32)}
  tx = osd_jax.osd_adamw(1e-3, 32, weight_dimension_numbers={"w": osd_jax.DimensionNumbers(1, 2)})
  state = jax.eval_shape(tx.init, params)

  def step(p, s, g, ok):
    extra = {"apply_step": ok} if apply_step == "inside" else {}
    u, new = tx.update(g, s, p, **extra)
    p_new = optax.apply_updates(p, u)
    if apply_step == "none":
      return p_new, new
    p_new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), p_new, p)
    if apply_step == "outside":
      new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s)
    return p_new, new

  return jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, params, jax.ShapeDtypeStruct((), jnp.bool_)).compile().as_text()


def _copies(text: str, shape: str) -> int:
  return len(re.findall(rf"f32\[{shape}\]\{{[0-9,]*\}} copy\(", text))


def test_skipping_inside_the_optimizer_copies_no_moment():
  # the inner moments, r × L per layer; where(ok, new, old) outside: m and v copied
  assert _copies(_donated_update_hlo("outside"), "8,32,1024") >= 2
  assert _copies(_donated_update_hlo("inside"), "8,32,1024") == 0


@pytest.mark.parametrize("apply_step", ["none", "inside"])
def test_online_pca_copies_no_projector_moment(apply_step):
  """P's Adam moments skip their t = 0 (and skipped) steps inside the projector optimizer, so
  the donated update copies at most P itself (read by the back-projection after Pₜ₊₁ is
  written), not P's moments: selecting the optimizer's outputs copied all three [8, 256, 32]."""
  assert _copies(_donated_update_hlo(apply_step), "8,256,32") <= 1
