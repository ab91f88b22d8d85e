"""osd_adamw / osd_lion / galore_adamw against a float64 NumPy transcription of the update.

The transcription (tests/numpy_reference.py) follows docs/design.md §2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osd_jax
from tests import numpy_reference as ref

SHAPES = {"wide": (6, 10), "tall": (12, 5), "square": (7, 7), "thin": (3, 20), "vec": (9,)}
RANK = 3  # "thin" (3×20) has rank ≥ min(m, n): it must get the full-rank inner optimizer.
STEPS = 7


def lr_schedule(t):
  return 0.02 / (1.0 + 0.15 * t)  # works on Python ints and traced jnp counts alike


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s) * (1 + 0.3 * t) for k, s in SHAPES.items()}
           for t in range(STEPS)]
  return params, grads


def _run_jax(tx, params, grads):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(lambda p, d: p + d, params, u)
    history.append(jax.tree.map(np.asarray, u))
  return history, state


def _assert_close(history, expected):
  for t, (got, want) in enumerate(zip(history, expected)):
    for k in SHAPES:
      err = np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])
      assert err < 1e-6, f"step {t}, leaf {k}: relative error {err:.2e}"
      assert got[k].dtype == np.float64


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


CASES = {
    "osd_adamw": dict(
        tx=lambda: osd_jax.osd_adamw(lr_schedule, RANK, weight_decay=0.05, scale=0.7,
            projector=osd_jax.ProjectorOptions(orthogonality_weight=0.3, lr_ratio=2.0,
            dtype=jnp.float64)),
        matrix=lambda s: ref.ProjectedMatrix(s, RANK, ref.Adam, scale=0.7, lam=0.3,
                                             proj_lr=lambda t: 2.0 * lr_schedule(t),
                                             proj_wd=0.05),
        vector=ref.Adam, wd=0.05),
    # P moved by Lion or Adafactor instead of Adam (ProjectorOptions.optimizer)
    **{f"osd_adamw_projector_{name}": dict(
        tx=lambda name=name: osd_jax.osd_adamw(lr_schedule, RANK, weight_decay=0.05, scale=0.7,
            projector=osd_jax.ProjectorOptions(orthogonality_weight=0.3, lr_ratio=2.0,
            dtype=jnp.float64, optimizer=name)),
        matrix=lambda s, opt=opt: ref.ProjectedMatrix(s, RANK, ref.Adam, scale=0.7, lam=0.3,
                                                      proj_lr=lambda t: 2.0 * lr_schedule(t),
                                                      proj_wd=0.05, proj_opt=opt),
        vector=ref.Adam, wd=0.05) for name, opt in (("lion", ref.Lion),
                                                    ("adafactor", ref.FactoredRMS))},
    # The official code's projector rule through the paper-mode alias (reference_code=True
    # itself is checked against the official update in tests/test_official_parity.py).
    "osd_adamw_reference_projector": dict(
        tx=lambda: osd_jax.osd_adamw(lr_schedule, RANK, weight_decay=0.05,
            projector=osd_jax.ProjectorOptions(orthogonality_weight=0.0, weight_decay=0.01,
            dtype=jnp.float64, learning_rate=osd_jax.reference_projector_learning_rate(
                lr_schedule, peak_learning_rate=0.02, update_proj_gap=10))),
        # the default scale: osd_jax.DEFAULT_SCALE
        matrix=lambda s: ref.ProjectedMatrix(s, RANK, ref.Adam, scale=0.25, lam=0.0,
                                             proj_wd=0.01,
                                             proj_lr=lambda t: lr_schedule(t) / 0.02 / 10),
        vector=ref.Adam, wd=0.05),
    "osd_lion": dict(
        tx=lambda: osd_jax.osd_lion(lr_schedule, RANK, weight_decay=0.1, scale=1.5,
            projector=osd_jax.ProjectorOptions(dtype=jnp.float64)),
        matrix=lambda s: ref.ProjectedMatrix(s, RANK, ref.Lion, scale=1.5, lam=0.1,
                                             proj_lr=lambda t: 5.0 * lr_schedule(t),
                                             proj_wd=0.1),
        vector=ref.Lion, wd=0.1),
    "osd_lion_sign_after_projection": dict(
        tx=lambda: osd_jax.osd_lion(lr_schedule, RANK, weight_decay=0.1,
            sign_after_projection=True, projector=osd_jax.ProjectorOptions(dtype=jnp.float64)),
        matrix=lambda s: ref.ProjectedMatrix(s, RANK, functools.partial(ref.Lion, sign=False),
                                             lam=0.1, proj_lr=lambda t: 5.0 * lr_schedule(t),
                                             proj_wd=0.1, sign_after=True),
        vector=ref.Lion, wd=0.1),
    "galore_adamw": dict(
        tx=lambda: osd_jax.galore_adamw(
            lr_schedule, RANK, update_proj_gap=3, scale=0.25, weight_decay=0.02,
            projector_dtype=jnp.float64),
        matrix=lambda s: ref.ProjectedMatrix(s, RANK, ref.Adam, rule="galore", scale=0.25, gap=3),
        vector=ref.Adam, wd=0.02),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_reference(name):
  case = CASES[name]
  params, grads = _problem()
  expected = ref.run(params, grads, lr_schedule, case["wd"], case["matrix"],
                     lambda s: case["vector"](s), RANK)
  history, state = _run_jax(case["tx"](), params, grads)
  _assert_close(history, expected)


def test_projection_layouts_follow_the_spec():
  params, _ = _problem()
  state = osd_jax.osd_adamw(1e-3, RANK).init(jax.tree.map(jnp.asarray, params))
  projected = {
      k: v for k, v in state[0].projector_state.items()
      if isinstance(v, osd_jax.ProjectedLeafState)
  }
  assert set(projected) == {"wide", "tall", "square"}
  assert projected["wide"].layout.transpose is False  # m < n: P spans m
  assert projected["tall"].layout.transpose is True  # m > n: P spans n
  assert projected["square"].layout.transpose is True  # ties project the columns
  assert projected["wide"].state.p.shape == (6, RANK)
  assert projected["tall"].state.p.shape == (5, RANK)
