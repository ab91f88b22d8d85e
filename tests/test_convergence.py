"""Convergence on low-rank least squares, with the first step checked against a closed form.

Problem: f(W) = ½‖W − W*‖²_F, W* = ABᵀ of rank r, W₀ = 0, so G₀ = −W* has rank r and
P₀ (top-r singular vectors of G₀) spans W*'s column space exactly.

First step (Adam and Lion both give sign(Ĝ) at t = 0, up to Adam's eps): with
U = P₀ sign(P₀ᵀG₀) and η = lr(0),

    f(W₁) = ½‖G₀ − ηU‖² = f₀ − η‖P₀ᵀG₀‖₁ + ½η²·r·n          (P₀ orthonormal)

and, since ‖P₀ᵀG₀‖₁ ≥ ‖P₀ᵀG₀‖_F = ‖G₀‖_F = √(2f₀), the decrease is at least
η√(2f₀) − ½η²rn.  Both are asserted exactly (float64).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osd_jax

M, N, R = 8, 20, 2


def _target():
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.normal(size=(M, R)) @ rng.normal(size=(R, N)))


def _loss(w, w_star):
  return 0.5 * jnp.sum((w - w_star) ** 2)


def _train(tx, steps, w_star):
  params = {"w": jnp.zeros((M, N))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  losses = []
  for _ in range(steps):
    grads = jax.grad(lambda p: _loss(p["w"], w_star))(params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(_loss(params["w"], w_star)))
  return losses


# scale 1 (not the aliases' 0.25), the step the closed form above is written for
OPTIMIZERS = {
    "osd_adamw": lambda lr: osd_jax.osd_adamw(
        lr, R, eps=1e-14, scale=1.0, projector=osd_jax.ProjectorOptions(dtype=jnp.float64)),
    "osd_lion": lambda lr: osd_jax.osd_lion(
        lr, R, scale=1.0, projector=osd_jax.ProjectorOptions(lr_ratio=1.0, dtype=jnp.float64)),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_first_step_matches_closed_form(name):
  with jax.enable_x64(True):
    w_star = _target()
    eta = 0.05
    f0 = float(_loss(jnp.zeros((M, N)), w_star))
    g0 = -np.asarray(w_star)
    p0 = np.linalg.svd(g0, full_matrices=False)[0][:, :R]
    expected = f0 - eta * np.abs(p0.T @ g0).sum() + 0.5 * eta**2 * R * N
    f1 = _train(OPTIMIZERS[name](eta), 1, w_star)[0]
    np.testing.assert_allclose(f1, expected, rtol=1e-10)
    assert f0 - f1 >= eta * np.sqrt(2 * f0) - 0.5 * eta**2 * R * N - 1e-9


@pytest.mark.parametrize("name,peak", [("osd_adamw", 0.05), ("osd_lion", 0.1)])
def test_reduces_loss_by_two_orders(name, peak):
  """300 cosine-scheduled steps bring the loss below 1% of f₀ (both reach ~0.1% or less).

  Lion moves each subspace coordinate by ±lr(t) per step, so it needs Σₜ lr(t) ≈ 0.51·300·peak
  to exceed the largest coordinate of P₀ᵀW* (≈ 10 here): peak 0.1; its projector step α·lr is
  kept ≤ 0.1 (α = 1), since a large projector step is unstable (the paper's warning).
  """
  with jax.enable_x64(True):
    w_star = _target()
    f0 = float(_loss(jnp.zeros((M, N)), w_star))
    losses = _train(OPTIMIZERS[name](optax.cosine_decay_schedule(peak, 300, 0.02)), 300, w_star)
    assert losses[-1] < 1e-2 * f0, (losses[0], losses[-1], f0)
    chex.assert_tree_all_finite(jnp.asarray(losses))


def test_full_rank_reproduces_adamw_exactly():
  params = {"w": jax.random.normal(jax.random.key(0), (6, 9)), "b": jnp.ones(9)}
  tx = osd_jax.osd_adamw(1e-2, rank=6, weight_decay=0.1)  # rank ≥ min(m, n): not projected
  ref = optax.adamw(1e-2, weight_decay=0.1)
  s, rs = tx.init(params), ref.init(params)
  for t in range(5):
    g = jax.tree.map(lambda p, t=t: jax.random.normal(jax.random.key(t), p.shape), params)
    u, s = tx.update(g, s, params)
    ru, rs = ref.update(g, rs, params)
    chex.assert_trees_all_equal(u, ru)
    params = optax.apply_updates(params, u)
