"""Projector rules: the online-PCA gradient, its fixed point, subspace tracking, inits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import osd_jax
from osd_jax import projectors
from tests import numpy_reference as ref


def principal_angles(p, q):
  """Principal angles (radians) between span(p) and span(q), via NumPy float64."""
  qp, _ = np.linalg.qr(np.asarray(p, np.float64))
  qq, _ = np.linalg.qr(np.asarray(q, np.float64))
  cos = np.linalg.svd(qp.T @ qq, compute_uv=False)
  return np.arccos(np.clip(cos, -1.0, 1.0))


@settings(max_examples=25, deadline=None)
@given(s=st.integers(2, 9), extra=st.integers(0, 9), r=st.integers(1, 4),
       lam=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
def test_online_pca_gradient_equals_autodiff(s, extra, r, lam, seed):
  r = min(r, s)
  L = s + extra  # noqa: N806
  with jax.enable_x64(True):
    rng = np.random.default_rng(seed)
    p = jnp.asarray(rng.normal(size=(s, r)))
    g = jnp.asarray(rng.normal(size=(s, L)))
    closed = projectors.online_pca_gradient(p, g, lam)
    auto = jax.grad(projectors.online_pca_loss)(p, g, lam)
    chex.assert_trees_all_close(closed, auto, rtol=1e-9, atol=1e-11)
    # and against the NumPy transcription with the residual materialised
    np.testing.assert_allclose(closed, ref.online_pca_grad(np.asarray(p), np.asarray(g), lam),
                               rtol=1e-9, atol=1e-11)


def test_gradient_vanishes_at_the_top_subspace():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    g = jnp.asarray(rng.normal(size=(8, 30)))
    p = projectors.top_singular_subspace(g, 3)
    grad = projectors.online_pca_gradient(p, g, orthogonality_weight=0.5)
    assert float(jnp.max(jnp.abs(grad))) < 1e-12
    # ... and does not vanish at a generic orthonormal basis
    q = projectors.random_subspace(8, 3, jax.random.key(0), jnp.float64)
    assert float(jnp.max(jnp.abs(projectors.online_pca_gradient(q, g, 0.5)))) > 1e-3


def test_zero_and_tiny_gradients_stay_finite():
  p = projectors.random_subspace(6, 2, jax.random.key(0))
  for scale in (0.0, 1e-30, 1e-40):
    grad = projectors.online_pca_gradient(p, jnp.full((6, 11), scale, jnp.float32), 0.1)
    chex.assert_tree_all_finite(grad)


def _low_rank_plus_noise(key, s, L, r, noise):  # noqa: N803
  k1, k2, k3 = jax.random.split(key, 3)
  basis, _ = jnp.linalg.qr(jax.random.normal(k1, (s, r)))
  coeffs = jax.random.normal(k2, (r, L)) * jnp.linspace(3.0, 2.0, r)[:, None]
  return basis, basis @ coeffs + noise * jax.random.normal(k3, (s, L))


def test_online_pca_tracks_the_top_subspace():
  """Run alone from a random start on a fixed low-rank + noise G: angles shrink toward 0."""
  s, L, r = 24, 64, 3  # noqa: N806
  basis, g = _low_rank_plus_noise(jax.random.key(3), s, L, r, noise=0.05)
  rule = projectors.online_pca(learning_rate=0.02, orthogonality_weight=0.1, init="random")
  state = rule.init(s, L, r, jnp.float32)
  step = jax.jit(rule.update)
  angles = []
  for t in range(400):
    p_t, _, state = step(g, state, jnp.int32(t), jax.random.key(t))
    if t % 100 == 0 or t == 399:
      angles.append(principal_angles(p_t, basis).max())
  assert angles[0] > 0.5, angles  # random start is far
  assert angles[-1] < 0.05, angles  # tracked
  assert all(a >= b - 1e-3 for a, b in zip(angles, angles[1:])), angles
  gram = np.asarray(state.p).T @ np.asarray(state.p)
  np.testing.assert_allclose(gram, np.eye(r), atol=0.05)


@pytest.mark.parametrize("method", ["svd", "randomized"])
def test_inits_recover_the_top_subspace(method):
  basis, g = _low_rank_plus_noise(jax.random.key(5), 40, 90, 4, noise=0.01)
  p = projectors.initial_projector(g, 4, jax.random.key(1), method)
  assert p.shape == (40, 4)
  np.testing.assert_allclose(np.asarray(p.T @ p), np.eye(4), atol=1e-5)
  assert principal_angles(p, basis).max() < 0.02


def test_randomized_matches_svd_on_a_full_rank_matrix():
  g = jax.random.normal(jax.random.key(2), (30, 50)) * jnp.linspace(5, 0.1, 50)
  g = g.T[:30] @ jnp.diag(jnp.linspace(6, 0.5, 30))  # decaying spectrum
  exact = projectors.top_singular_subspace(g, 3)
  approx = projectors.randomized_subspace(g, 3, jax.random.key(0), oversampling=10,
                                          power_iterations=3)
  assert principal_angles(exact, approx).max() < 0.05


def test_canonical_signs_are_deterministic():
  u = jnp.array([[0.1, -0.9], [-0.8, 0.2], [0.3, 0.1]])
  c = projectors.canonical_signs(u)
  np.testing.assert_allclose(c, jnp.array([[-0.1, 0.9], [0.8, -0.2], [-0.3, -0.1]]))


def test_random_subspace_is_orthonormal():
  q = projectors.random_subspace(20, 5, jax.random.key(4))
  np.testing.assert_allclose(np.asarray(q.T @ q), np.eye(5), atol=1e-5)


def _rule_trace(rule, steps, s=10, L=16, r=2):  # noqa: N803
  state = rule.init(s, L, r, jnp.float32)
  ps = []
  for t in range(steps):
    g = jax.random.normal(jax.random.key(100 + t), (s, L))
    p_t, g_hat, state = rule.update(g, state, jnp.int32(t), jax.random.key(t))
    np.testing.assert_allclose(g_hat, p_t.T @ g, rtol=1e-5, atol=1e-5)
    ps.append(np.asarray(p_t))
  return ps


def test_svd_rule_refreshes_every_period():
  ps = _rule_trace(projectors.svd(every=3), 7)
  assert np.array_equal(ps[0], ps[1]) and np.array_equal(ps[1], ps[2])
  assert not np.allclose(ps[2], ps[3])
  assert np.array_equal(ps[3], ps[5]) and not np.allclose(ps[5], ps[6])


def test_random_rule_refreshes_and_ignores_gradient():
  ps = _rule_trace(projectors.random(every=2, seed=7), 5)
  assert np.array_equal(ps[0], ps[1]) and not np.allclose(ps[1], ps[2])
  np.testing.assert_allclose(ps[2].T @ ps[2], np.eye(2), atol=1e-5)


def test_frozen_rule_never_moves():
  ps = _rule_trace(projectors.frozen(), 5)
  assert all(np.array_equal(ps[0], p) for p in ps)


def test_online_pca_takes_no_step_at_t0_and_moves_after():
  ps = _rule_trace(projectors.online_pca(1e-2), 4)
  assert np.array_equal(ps[0], ps[1])  # P₁ = P₀: no projector step at t = 0
  assert not np.allclose(ps[1], ps[2]) and not np.allclose(ps[2], ps[3])  # moves every step
  rule = projectors.online_pca(1e-2)
  state = rule.init(10, 16, 2, jnp.float32)
  g = jax.random.normal(jax.random.key(0), (10, 16))
  p0, _, state = rule.update(g, state, jnp.int32(0), jax.random.key(0))
  np.testing.assert_array_equal(state.p, p0)  # no projector step at t = 0
  assert int(state.opt_state.count) == 0  # the projector optimizer's count starts at t = 1
  p1, _, state = rule.update(g, state, jnp.int32(1), jax.random.key(1))
  np.testing.assert_array_equal(p1, p0)
  assert int(state.opt_state.count) == 1 and not np.allclose(state.p, p0)


@pytest.mark.parametrize("bad, message", [
    (lambda: projectors.online_pca(1e-3, init="qr"), r"init must be one of .*'qr'"),
    (lambda: projectors.svd(every=0), r"every must be a positive int.*got 0"),
    (lambda: projectors.random(every=1.5), r"every must be a positive int.*got 1\.5"),
    (lambda: projectors.frozen(init="bogus"), r"init must be one of .*'bogus'"),
    (lambda: projectors.svd(every=5, method="eig"), r"method must be one of .*got 'eig'"),
])
def test_bad_rule_arguments(bad, message):
  """Each bad argument gets one ValueError that names the parameter and the value given."""
  with pytest.raises(ValueError, match=message):
    bad()


def test_custom_rule_plugs_in():
  """A user-written rule (P = first r coordinate axes) works through the whole transform."""

  def init(s, L, r, dtype):  # noqa: N803
    return projectors.PeriodicProjectorState(jnp.eye(s, r, dtype=dtype))

  def step(g, state, count):
    return state.p, state.p.T @ g.astype(state.p.dtype), state

  tx = osd_jax.scale_by_subspace_descent(optax.identity(), 2,
                                         projectors.projector_rule(init, step))
  g = {"w": jnp.arange(12.0).reshape(3, 4)}
  u, _ = tx.update(g, tx.init(g))
  expected = np.asarray(g["w"]).copy()
  expected[2] = 0.0  # rows outside the first two coordinate axes are projected out
  np.testing.assert_allclose(u["w"], expected)


def test_align_signs_flips_only_columns_that_point_away():
  rng = np.random.default_rng(0)
  p_old = np.linalg.qr(rng.normal(size=(9, 3)))[0]
  flips = np.array([-1.0, 1.0, -1.0])
  p_new = p_old * flips + 0.05 * rng.normal(size=(9, 3))
  aligned = np.asarray(projectors.align_signs(jnp.asarray(p_new), jnp.asarray(p_old)))
  np.testing.assert_allclose(aligned, p_new * flips, rtol=1e-6)
  assert np.all(np.sum(aligned * p_old, axis=0) > 0)
  zeros = np.asarray(projectors.align_signs(jnp.asarray(p_new), jnp.zeros((9, 3))))
  # before the first refresh: nothing to align to
  np.testing.assert_allclose(zeros, p_new, rtol=1e-6)


def test_svd_rule_refreshes_keep_column_signs_unless_official():
  ps = _rule_trace(projectors.svd(every=2), 7)
  for t in (2, 4, 6):
    assert np.all(np.sum(ps[t] * ps[t - 1], axis=0) >= 0)
  raw = _rule_trace(projectors.svd(every=2, method="official"), 7)
  for t in range(7):  # same subspaces, signs as LAPACK returns them
    np.testing.assert_allclose(np.abs(raw[t].T @ ps[t]), np.eye(2), atol=1e-4)


def test_official_singular_subspace_keeps_raw_signs_in_the_official_orientation():
  """G' = G_torch (transposed view): P = U[:, :r] of svd(G'); otherwise Vh[:r]ᵀ of svd(G'ᵀ)."""
  g = np.random.default_rng(1).normal(size=(6, 11))
  with jax.enable_x64(True):
    p_out = np.asarray(projectors.official_singular_subspace(jnp.asarray(g), 3, transposed=True))
    p_in = np.asarray(projectors.official_singular_subspace(jnp.asarray(g), 3, transposed=False))
  np.testing.assert_allclose(p_out, np.linalg.svd(g, full_matrices=False)[0][:, :3], atol=1e-12)
  np.testing.assert_allclose(p_in, np.linalg.svd(g.T, full_matrices=False)[2][:3].T, atol=1e-12)
