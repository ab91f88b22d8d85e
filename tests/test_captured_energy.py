"""osd_jax.captured_energy against a NumPy reference (the projection P(PᵀP)⁻¹Pᵀ, no QR)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osd_jax

SPECS = {"wide": osd_jax.DimensionNumbers(0, 1), "tall": osd_jax.DimensionNumbers(0, 1),
         "scanned": osd_jax.DimensionNumbers(1, 2), "bias": None}
SHAPES = {"wide": (6, 14), "tall": (15, 7), "scanned": (3, 9, 5), "bias": (7,)}


def _reference(grads, state):
  """e = tr(G'ᵀ Π G')/‖G'‖² with Π = P(PᵀP)⁻¹Pᵀ, per matrix, in the order captured_energy uses."""
  ps = iter(np.asarray(p, np.float64) for p in osd_jax.projectors_of(state))
  out = []
  for k in sorted(SHAPES):  # dict leaves are in sorted key order
    if SPECS[k] is None:
      continue
    p, g = next(ps), np.asarray(grads[k], np.float64)
    mats = g if g.ndim == 3 else g[None]  # the scanned leaf: one matrix per layer
    p = p if p.ndim == 3 else p[None]
    for gi, pi in zip(mats, p):
      gp = gi if gi.shape[0] < gi.shape[1] else gi.T  # P spans the smaller side
      proj = pi @ np.linalg.solve(pi.T @ pi, pi.T)
      out.append(np.trace(gp.T @ proj @ gp) / np.sum(gp**2))
  return np.array(out)


@pytest.mark.parametrize("make", [
    lambda: osd_jax.osd_adamw(1e-2, 3, weight_dimension_numbers=SPECS,
        projector=osd_jax.ProjectorOptions(lr_ratio=20.0)),
    lambda: osd_jax.galore_adamw(1e-2, 3, update_proj_gap=2, weight_dimension_numbers=SPECS),
], ids=["osd_adamw", "galore_adamw"])
def test_captured_energy_matches_numpy(make):
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  tx = make()
  state = tx.init(params)
  for _ in range(3):
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    _, state = jax.jit(tx.update)(grads, state, params)
    got = np.asarray(jax.jit(osd_jax.captured_energy)(grads, state))
    want = _reference(grads, state)
    assert got.shape == (5,)  # wide, tall and the 3 layers of scanned; not the bias
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all((got > 0) & (got < 1))
  # a gradient inside span(P) is captured whole, one orthogonal to it not at all (matrices in
  # tree order: scanned ×3, tall, wide)
  p = np.asarray(osd_jax.projectors_of(state)[1])  # "tall": P spans n = 7
  q = np.linalg.qr(p)[0]
  inside = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  inside["tall"] = jnp.asarray((q @ rng.normal(size=(3, 15))).T)
  np.testing.assert_allclose(np.asarray(osd_jax.captured_energy(inside, state))[3], 1.0, rtol=1e-5)
  outside = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  outside["tall"] = jnp.asarray(((np.eye(7) - q @ q.T) @ rng.normal(size=(7, 15))).T)
  assert float(osd_jax.captured_energy(outside, state)[3]) < 1e-5


def test_captured_energy_is_empty_without_projections():
  params = {"b": jnp.ones(4)}
  tx = osd_jax.osd_adamw(1e-2, 2)
  assert osd_jax.captured_energy(params, tx.init(params)).shape == (0,)
