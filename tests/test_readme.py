"""The README's Python examples run as written and do what the text around them says."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from tests import numpy_reference as ref

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@functools.cache
def _run_block(index: int) -> dict:
  """Runs README python block ``index`` in a fresh namespace (the chain example assumes the
  quickstart's imports, as a reader who runs the blocks in order has them)."""
  namespace = {}
  exec("import jax, jax.numpy as jnp, optax, osd_jax", namespace)  # noqa: S102
  exec(compile(_python_blocks()[index], f"README-block-{index}", "exec"), namespace)  # noqa: S102
  return namespace


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_readme_python_block_runs_and_builds_an_optimizer(index):
  namespace = _run_block(index)
  tx = namespace["tx"]
  assert isinstance(tx, optax.GradientTransformation)
  state = tx.init({"w": jnp.zeros((300, 512))})
  assert jax.tree.leaves(state)


def test_readme_has_the_two_documented_examples():
  blocks = _python_blocks()
  assert len(blocks) == 2
  assert "osd_jax.osd_adamw(" in blocks[0]
  assert "osd_jax.scale_by_subspace_descent(" in blocks[1]


def test_readme_quickstart_runs_and_learns(capsys):
  _run_block.cache_clear()  # print output is captured only on a fresh run
  namespace = _run_block(0)
  assert float(namespace["loss"]) < 0.05 * float(namespace["loss_fn"](
      {"w": namespace["params"]["w"] * 0, "b": namespace["params"]["b"] * 0}))
  assert "optimizer state" in capsys.readouterr().out


def _hadamard_gradient(rng, s, L, r, scale):
  """G = U Σ Hᵀ: orthonormal U (s×r), distinct Σ, and H (L×r) with every entry ±1/√L.

  Then Pᵀ G' = Σ Hᵀ for P = span(U), whose entries are all bounded away from 0, so Lion's sign
  in the example cannot flip between float32 and float64.
  """
  u, _ = np.linalg.qr(rng.normal(size=(s, r)))
  h = scipy.linalg.hadamard(L)[:, :r] / np.sqrt(L)
  sigma = scale * 2.0 * 0.99 ** np.arange(r)
  return u, u @ np.diag(sigma) @ h.T


def test_readme_chain_example_update_matches_an_independent_computation():
  """The chain example is Lion in a rank-256 online-PCA subspace, weight decay 0.1, and a
  warmup-cosine schedule from 0 to 1e-3: check its first two updates in float64 NumPy."""
  tx = _run_block(1)["tx"]
  rng = np.random.default_rng(0)
  s, L, r = 300, 512, 256  # P spans the smaller side (300); rank 256 < 300, so w is projected
  _, g0 = _hadamard_gradient(rng, s, L, r, 1.0)
  _, g1 = _hadamard_gradient(np.random.default_rng(0), s, L, r, 1.5)  # same U and H, new Σ
  b_grads = [rng.normal(size=L), rng.normal(size=L)]
  params = {"w": rng.normal(size=(s, L)), "b": rng.normal(size=L)}

  schedule = optax.warmup_cosine_decay_schedule(0, 1e-3, 1000, 10000)
  lr = lambda t: float(schedule(t))  # noqa: E731
  expected = ref.run(
      params, [{"w": g0, "b": b_grads[0]}, {"w": g1, "b": b_grads[1]}], lr, 0.1,
      make_matrix=lambda shape: ref.ProjectedMatrix(
          shape, r, ref.Lion, lam=0.1, proj_lr=lambda t: 5e-3),
      make_vector=ref.Lion, rank=r)

  jparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(jparams)
  for t, g in enumerate([{"w": g0, "b": b_grads[0]}, {"w": g1, "b": b_grads[1]}]):
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    for k in ("w", "b"):
      got, want = np.asarray(updates[k], np.float64), expected[t][k]
      if t == 0:  # the schedule starts at 0: nothing moves at t = 0
        np.testing.assert_array_equal(got, 0.0)
        assert lr(0) == 0.0
        continue
      err = np.linalg.norm(got - want) / np.linalg.norm(want)
      assert err < 1e-3, f"step {t}, leaf {k}: relative error {err:.2e}"
  # at t = 1 the matrix update lies in the rank-256 subspace of P₀ plus the weight-decay term
  direction = -np.asarray(updates["w"], np.float64) / lr(1) - 0.1 * params["w"]
  assert np.linalg.matrix_rank(direction, tol=1e-3 * np.abs(direction).max()) <= r
