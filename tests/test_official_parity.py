"""``reference_code=True`` against a float64 NumPy transcription of the official PyTorch code.

A least-squares problem with three weight matrices in ``nn.Linear`` layout — (6, 10) (out < in:
P spans the output side), (12, 5) (out > in) and (7, 7) (a tie: the official code projects the
input side) — and a bias vector; each step draws a new mini-batch and recomputes the gradient
from the current weights of each implementation.  Warmup-cosine schedule with lr(0) = 0, weight
decay > 0.  The cumulative change W_t − W_0 must agree to 1e-9 (relative) at every step.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osd_jax
from tests import official_reference as off

SHAPES = {"a": (6, 10), "b": (12, 5), "c": (7, 7)}  # torch layout (out, in)
RANK, STEPS, WARMUP, LR, BATCH = 3, 24, 4, 1e-2, 16


def lr_factor(t):
  return off.official_lr_lambda(t, WARMUP, STEPS)


def jax_schedule(count):
  t = jnp.asarray(count, jnp.float64)
  cosine = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(math.pi * (t - WARMUP) / (STEPS - WARMUP)))
  return LR * jnp.where(t < WARMUP, t / WARMUP, cosine)


def _problem():
  rng = np.random.default_rng(0)
  truth = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  params = {k: 0.3 * rng.normal(size=s) for k, s in SHAPES.items()}
  params["bias"] = 0.1 * rng.normal(size=6)
  return truth, params


def _grads(params, truth, t):
  """∇ of Σ_k ½/B‖X_k W_kᵀ (+ bias for "a") − Y_k‖² on step t's mini-batch (torch layout)."""
  rng = np.random.default_rng(1000 + t)
  grads = {}
  for k, (out, inp) in SHAPES.items():
    x = rng.normal(size=(BATCH, inp))
    y = x @ truth[k].T + 0.1 * rng.normal(size=(BATCH, out))
    pred = x @ params[k].T + (params["bias"] if k == "a" else 0.0)
    r = (pred - y) / BATCH
    grads[k] = r.T @ x
    if k == "a":
      grads["bias"] = r.sum(axis=0)
  return grads


def _to_jax(tree):  # torch layout (out, in) -> JAX kernel layout (in, out)
  return {k: jnp.asarray(v.T if v.ndim == 2 else v) for k, v in tree.items()}


def _from_jax(tree):
  return {k: np.asarray(v).T if v.ndim == 2 else np.asarray(v) for k, v in tree.items()}


def _run_official(opt, truth):
  w0 = {k: v.copy() for k, v in opt.params.items()}
  changes = []
  for t in range(STEPS):
    opt.step(_grads(opt.params, truth, t), LR * lr_factor(t))
    changes.append({k: opt.params[k] - w0[k] for k in w0})
  return changes


def _run_jax(tx, params, truth):
  params = _to_jax(params)
  w0 = _from_jax(params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  changes = []
  for t in range(STEPS):
    grads = _to_jax(_grads(_from_jax(params), truth, t))
    u, state = update(grads, state, params)
    params = jax.tree.map(lambda p, d: p + d, params, u)
    now = _from_jax(params)
    changes.append({k: now[k] - w0[k] for k in w0})
  return changes


def _errors(got, want):
  """Max over leaves of ‖ΔW_got − ΔW_want‖/‖ΔW_want‖ per step (0 where both are exactly 0)."""
  out = []
  for g, w in zip(got, want):
    errs = []
    for k in w:
      num, den = np.linalg.norm(g[k] - w[k]), np.linalg.norm(w[k])
      errs.append(0.0 if num == 0 else num / den if den > 0 else np.inf)
    out.append(max(errs))
  return np.array(out)


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


WD = 0.1
CASES = {
    "osd_adamw": (
        lambda p: off.GaLoreAdamW(p, SHAPES, LR, RANK, gap=10, scale=0.25,
                                  proj_type="continuous", weight_decay=WD),
        lambda **kw: osd_jax.osd_adamw(jax_schedule, RANK, weight_decay=WD, **kw,
            projector=osd_jax.ProjectorOptions(peak_learning_rate=LR, update_proj_gap=10,
            dtype=jnp.float64))),
    "osd_lion": (
        lambda p: off.GaLoreLion(p, SHAPES, LR, RANK, gap=10, scale=0.25,
                                 proj_type="continuous", weight_decay=WD),
        lambda **kw: osd_jax.osd_lion(jax_schedule, RANK, weight_decay=WD, **kw,
            projector=osd_jax.ProjectorOptions(peak_learning_rate=LR, update_proj_gap=10,
            dtype=jnp.float64))),
    "galore_adamw": (
        lambda p: off.GaLoreAdamW(p, SHAPES, LR, RANK, gap=5, scale=0.25, proj_type="std",
                                  weight_decay=WD),
        lambda **kw: osd_jax.galore_adamw(
            jax_schedule, RANK, update_proj_gap=5, weight_decay=WD, projector_dtype=jnp.float64,
            **kw)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_code_reproduces_the_official_update(name):
  make_official, make_tx = CASES[name]
  truth, params = _problem()
  want = _run_official(make_official(params), truth)
  assert all(np.linalg.norm(want[t]["a"]) > 0 for t in range(1, STEPS))
  got = _run_jax(make_tx(reference_code=True), params, truth)
  errors = _errors(got, want)
  assert errors.max() < 1e-9, f"relative error per step: {errors}"


@pytest.mark.parametrize("name", ["osd_adamw", "galore_adamw"])
def test_paper_mode_differs_from_the_official_update(name):
  """The comparison can fail: the paper-mode alias (optax eps placement, decay of the old
  weights, canonical/aligned signs) is measurably off the official trajectory."""
  make_official, make_tx = CASES[name]
  truth, params = _problem()
  want = _run_official(make_official(params), truth)
  got = _run_jax(make_tx(eps=1e-6, scale=0.25), params, truth)
  assert _errors(got, want).max() > 1e-6
