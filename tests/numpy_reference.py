"""An independent float64 NumPy transcription of docs/design.md §2 (OSD and GaLore).

Written from the equations, not from the library: the online-PCA gradient uses the direct
formula with the residual R materialised, Adam/Lion are spelled out, and every matrix is
handled one at a time.  Used by tests/test_reference_exactness.py.
"""

from __future__ import annotations

import numpy as np


def canonical_signs(u):
  idx = np.argmax(np.abs(u), axis=0)
  pivots = u[idx, np.arange(u.shape[1])]
  return u * np.where(pivots < 0, -1.0, 1.0)


def top_left_singular(g, r):
  u, _, _ = np.linalg.svd(g, full_matrices=False)
  return canonical_signs(u[:, :r])


class Adam:
  """Bias-corrected Adam direction, eps outside the square root (optax.scale_by_adam)."""

  def __init__(self, shape, b1=0.9, b2=0.999, eps=1e-8):
    self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0
    self.b1, self.b2, self.eps = b1, b2, eps

  def __call__(self, g):
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1**self.t)
    v_hat = self.v / (1 - self.b2**self.t)
    return m_hat / (np.sqrt(v_hat) + self.eps)


class Lion:
  """Lion direction; ``sign=False`` returns the interpolation c without the sign."""

  def __init__(self, shape, b1=0.9, b2=0.99, sign=True):
    self.m, self.b1, self.b2, self.sign = np.zeros(shape), b1, b2, sign

  def __call__(self, g):
    c = (1 - self.b1) * g + self.b1 * self.m
    self.m = self.b2 * self.m + (1 - self.b2) * g
    return np.sign(c) if self.sign else c


class FactoredRMS:
  """Adafactor's factored second moment, no momentum: u = g / √V̂, V̂ = R Cᵀ / mean(R), then
  its update clipping u / max(1, RMS(u)).

  R, C: running means of g² over each row and each column, decay β_t = 1 − t^-0.8 (t = 1, 2, ...),
  with ε = 1e-30 added to g² (optax.scale_by_factored_rms, optax.clip_by_block_rms(1)).
  """

  def __init__(self, shape):
    self.row, self.col, self.t = np.zeros(shape[0]), np.zeros(shape[1]), 0

  def __call__(self, g):
    self.t += 1
    beta = 1.0 - self.t**-0.8
    g2 = g * g + 1e-30
    self.row = beta * self.row + (1 - beta) * g2.mean(axis=1)
    self.col = beta * self.col + (1 - beta) * g2.mean(axis=0)
    u = g / np.sqrt(np.outer(self.row, self.col) / self.row.mean())
    return u / max(1.0, np.sqrt(np.mean(u * u)))


def online_pca_grad(p, g, lam):
  """∇ of ‖PPᵀG̃ − G̃‖² + λ‖PᵀP − I‖², G̃ = G/max(‖G‖, tiny), with R materialised."""
  gt = g / max(np.linalg.norm(g), np.finfo(np.float64).tiny)
  res = p @ p.T @ gt - gt
  e = p.T @ p - np.eye(p.shape[1])
  return 2 * (res @ gt.T @ p + gt @ res.T @ p) + 4 * lam * p @ e


class ProjectedMatrix:
  """One weight matrix W (m×n) under OSD (``rule="osd"``) or GaLore (``rule="galore"``)."""

  def __init__(self, shape, rank, inner, rule="osd", scale=1.0, lam=0.1, proj_lr=None,
               proj_wd=0.0, gap=200, sign_after=False, proj_opt=Adam):
    m, n = shape
    self.transpose = not m < n  # G' = Gᵀ when m ≥ n (ties project the columns)
    s, L = (n, m) if self.transpose else (m, n)
    self.rank, self.rule, self.scale, self.lam = rank, rule, scale, lam
    self.proj_lr, self.proj_wd, self.gap, self.sign_after = proj_lr, proj_wd, gap, sign_after
    self.inner = inner((rank, L))
    self.proj_opt = proj_opt((s, rank))
    self.p = None

  def direction(self, g, t):
    gp = g.T if self.transpose else g
    if self.rule == "galore":
      if t % self.gap == 0:
        p_new = top_left_singular(gp, self.rank)
        if self.p is not None:  # refreshes keep each column's sign: sign(diag(P_newᵀ P_old))
          p_new = p_new * np.where(np.sum(p_new * self.p, axis=0) < 0, -1.0, 1.0)
        self.p = p_new
    elif t == 0:
      self.p = top_left_singular(gp, self.rank)
    p_t = self.p
    n_dir = self.inner(p_t.T @ gp)  # N = inner(PᵀG')
    u = self.scale * p_t @ n_dir  # U' = scale · P N
    if self.sign_after:
      u = np.sign(u)
    if self.rule == "osd" and t >= 1:
      d = self.proj_opt(online_pca_grad(p_t, gp, self.lam))
      self.p = p_t - self.proj_lr(t) * (d + self.proj_wd * p_t)
    return u.T if self.transpose else u


def run(params, grads_per_step, lr, wd, make_matrix, make_vector, rank):
  """Applies the reference optimizer; returns the list of update dicts (−lr(t)(U + wd·W))."""
  states = {}
  for k, w in params.items():
    if w.ndim == 2 and rank < min(w.shape):
      states[k] = make_matrix(w.shape)
    else:
      states[k] = make_vector(w.shape)
  params = {k: np.array(v, np.float64) for k, v in params.items()}
  history = []
  for t, grads in enumerate(grads_per_step):
    updates = {}
    for k, g in grads.items():
      st = states[k]
      u = st.direction(g, t) if isinstance(st, ProjectedMatrix) else st(g)
      updates[k] = -lr(t) * (u + wd * params[k])
    for k in params:
      params[k] = params[k] + updates[k]
    history.append(updates)
  return history
