"""Bad input gives clear errors; degenerate gradients never produce NaN."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osd_jax
from osd_jax import projectors


def _params():
  return {"w": jax.random.normal(jax.random.key(0), (6, 10)), "b": jnp.zeros(10)}


@pytest.mark.parametrize("make", [
    lambda: osd_jax.osd_adamw(1e-2, rank=2),
    lambda: osd_jax.osd_adamw(1e-2, rank=2, projector=osd_jax.ProjectorOptions(init="randomized")),
    lambda: osd_jax.osd_lion(1e-2, rank=2),
    lambda: osd_jax.galore_adamw(1e-2, rank=2, update_proj_gap=2),
])
def test_zero_gradients_keep_everything_finite(make):
  params = _params()
  tx = make()
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(4):
    u, state = jax.jit(tx.update)(zeros, state, params)
    chex.assert_tree_all_finite((u, state))


def test_zero_first_gradient_then_real_ones():
  """A frozen/unused param at t = 0 (zero gradient) must not poison P later."""
  params = _params()
  tx = osd_jax.osd_adamw(1e-2, rank=2)
  state = tx.init(params)
  u, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  for t in range(3):
    g = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
    u, state = tx.update(g, state, params)
  chex.assert_tree_all_finite((u, state))


def test_nan_step_with_apply_if_finite_leaves_state_unchanged():
  params = _params()
  tx = optax.apply_if_finite(osd_jax.osd_adamw(1e-2, rank=2), max_consecutive_errors=5)
  state = tx.init(params)
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  _, state = tx.update(g, state, params)
  bad = {"w": g["w"].at[2, 3].set(jnp.inf), "b": g["b"].at[0].set(jnp.nan)}
  u, new_state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
  _, newer = tx.update(g, new_state, params)  # training continues
  chex.assert_tree_all_finite(newer.inner_state)


def test_rank_larger_than_dims_falls_back_to_full_rank():
  params = {"w": jnp.ones((4, 50)), "v": jnp.ones((30, 40))}
  state = osd_jax.osd_adamw(1e-2, rank=8).init(params)
  assert isinstance(state[0].projector_state["w"], optax.MaskedNode)
  assert state[0].projector_state["v"].state.p.shape == (30, 8)


@pytest.mark.parametrize("rank,err", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                      ("8", TypeError), (True, TypeError),
                                      (jnp.asarray(4), TypeError)])
def test_bad_rank(rank, err):
  with pytest.raises(err, match="rank"):
    osd_jax.osd_adamw(1e-2, rank=rank)


@pytest.mark.parametrize("wdn,err,match", [
    (osd_jax.DimensionNumbers(0, 0), ValueError, "overlap"),
    (osd_jax.DimensionNumbers(0, 5), ValueError, "out of range"),
    (osd_jax.DimensionNumbers((), 1), ValueError, "empty"),
    (osd_jax.DimensionNumbers(0.5, 1), TypeError, "reduction_axis"),
    ({"w": (0, 1), "b": None}, TypeError, "DimensionNumbers"),
    ({"w": osd_jax.DimensionNumbers()}, ValueError, "does not match"),
    ({"w": osd_jax.DimensionNumbers(), "b": osd_jax.DimensionNumbers()}, ValueError, "ndim >= 2"),
])
def test_bad_dimension_numbers(wdn, err, match):
  tx = osd_jax.osd_adamw(1e-2, rank=2, weight_dimension_numbers=wdn)
  with pytest.raises(err, match=match):
    tx.init(_params())


@pytest.mark.parametrize("make,match", [
    (lambda: osd_jax.osd_adamw(1e-2, 2, projector=osd_jax.ProjectorOptions(init="qr")), "init"),
    (lambda: osd_jax.osd_adamw(1e-2, 2, projector=osd_jax.ProjectorOptions(side="left")), "side"),
    (lambda: osd_jax.osd_adamw(None, 2), "learning_rate"),
    (lambda: osd_jax.galore_adamw(1e-2, 2, update_proj_gap=0), "update_proj_gap"),
    (lambda: osd_jax.projectors.svd(every=0), "every"),
    (lambda: osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), 2, projector="svd"),
     "ProjectorRule"),
    (lambda: osd_jax.osd_adamw(optax.linear_schedule(1e-3, 0, 10), 2, reference_code=True),
     "peak_learning_rate"),
])
def test_bad_arguments(make, match):
  with pytest.raises((ValueError, TypeError), match=match):
    make()


def test_inner_that_reads_params_points_at_project_params():
  """inner=optax.adamw(weight_decay=...) needs params, which inner gets only with project_params."""
  params = {"w": jnp.ones((6, 10)), "b": jnp.ones(10)}
  rule = osd_jax.projectors.online_pca(1e-2)
  tx = osd_jax.scale_by_subspace_descent(optax.adamw(1e-2, weight_decay=0.1), 2, rule)
  with pytest.raises(ValueError, match="project_params=True.*add_decayed_weights"):
    tx.update(params, tx.init(params), params)
  tx = osd_jax.scale_by_subspace_descent(optax.adamw(1e-2, weight_decay=0.1), 2, rule,
                                         project_params=True)
  u, _ = tx.update(params, tx.init(params), params)
  chex.assert_tree_all_finite(u)


def test_shape_change_after_init_is_reported():
  tx = osd_jax.osd_adamw(1e-2, rank=2)
  state = tx.init({"w": jnp.ones((6, 10))})
  with pytest.raises(ValueError, match="shape"):
    tx.update({"w": jnp.ones((10, 6))}, state)


def test_project_params_gives_inner_the_projected_weights():
  """inner = add_decayed_weights(1): N = Ĝ + PᵀW', so U = P Pᵀ (G + W)."""
  params = {"w": jax.random.normal(jax.random.key(0), (5, 9))}
  g = {"w": jax.random.normal(jax.random.key(1), (5, 9))}
  tx = osd_jax.scale_by_subspace_descent(optax.add_decayed_weights(1.0), 2,
                                         projectors.frozen(), project_params=True)
  state = tx.init(params)
  u, state = tx.update(g, state, params)
  p = np.asarray(state.projector_state["w"].state.p)
  np.testing.assert_allclose(u["w"], p @ p.T @ np.asarray(g["w"] + params["w"]), rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="params"):
    tx.update(g, state)
