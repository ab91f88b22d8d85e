"""A float64 NumPy transcription of the official PyTorch OSD / GaLore optimizers.

Written from reading the official code (kyleliang919/Online-Subspace-Descent:
``galore_torch/adamw.py``, ``galore_torch/galore_lion.py``, ``galore_torch/galore_projector.py``,
``peft_pretraining/training_utils.py``), not from this library: one weight at a time, in
``nn.Linear`` layout (out, in), the projector's autograd gradient written out with the residual
materialised, torch's AdamW for P spelled out.  Used by tests/test_official_parity.py.

One deliberate difference from the official code, also documented in ``osd_jax.osd_adamw``: the
SVD runs in float64 here (the official code casts non-float32 gradients to float32 for it).
"""

from __future__ import annotations

import math

import numpy as np


def official_lr_lambda(t, warmup, total, min_ratio=0.1):
  """The official cosine schedule's factor at update step t (one cycle): warmup from 0."""
  if t < warmup:
    return t / max(1, warmup)
  progress = (t - warmup) / max(1, total - warmup)
  return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TorchAdamW:
  """torch.optim.AdamW (defaults betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) on one tensor."""

  def __init__(self, shape, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01):
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.m, self.v, self.k = np.zeros(shape), np.zeros(shape), 0

  def step(self, p, grad):
    self.k += 1
    p = p * (1.0 - self.lr * self.wd)  # decay of the old P first
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
    bc1, bc2 = 1 - self.b1**self.k, 1 - self.b2**self.k
    denom = np.sqrt(self.v) / math.sqrt(bc2) + self.eps
    return p - (self.lr / bc1) * self.m / denom


class Projector:
  """GaLoreProjector for ``proj_type`` "std" (GaLore) or "continuous" (OSD with AdamW on P)."""

  def __init__(self, rank, gap, scale, proj_type):
    self.rank, self.gap, self.scale, self.proj_type = rank, gap, scale, proj_type
    self.p = None  # "right": r×n (P rows span the input side); "left": m×r
    self.opt = None
    self.pending = None  # ∇L(Pₜ), applied after the back-projection

  def _svd_factor(self, g, side):
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    return vh[: self.rank] if side == "right" else u[:, : self.rank]

  def project(self, g, it, ratio):
    m, n = g.shape
    self.side = "right" if m >= n else "left"
    if self.proj_type == "std":
      if self.p is None or it % self.gap == 0:
        self.p = self._svd_factor(g, self.side)
    elif self.proj_type == "continuous":
      if self.p is None:
        self.p = self._svd_factor(g, self.side)
        self.opt = TorchAdamW(self.p.shape, lr=1.0 / self.gap)
      else:
        gn = g / np.linalg.norm(g)
        p = self.p
        if self.side == "right":  # L = ‖Gn PᵀP − Gn‖², P r×n
          res = gn @ p.T @ p - gn
          self.pending = 2.0 * (p @ res.T @ gn + p @ gn.T @ res)
        else:  # L = ‖P PᵀGn − Gn‖², P m×r
          res = p @ p.T @ gn - gn
          self.pending = 2.0 * (res @ gn.T @ p + gn @ res.T @ p)
        self.opt.lr = ratio / self.gap
    else:
      raise ValueError(self.proj_type)
    return g @ self.p.T if self.side == "right" else self.p.T @ g

  def project_back(self, low):
    full = low @ self.p if self.side == "right" else self.p @ low
    if self.proj_type == "continuous" and self.pending is not None:
      self.p = self.opt.step(self.p, self.pending)
      self.pending = None
    return full * self.scale


class GaLoreAdamW:
  """The official AdamW (transformers-style) with GaLore/OSD projection of the named weights."""

  def __init__(self, params, projected, lr, rank, gap, scale, proj_type, b1=0.9, b2=0.999,
               eps=1e-6, weight_decay=0.0):
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.init_lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, weight_decay
    self.proj = {k: Projector(rank, gap, scale, proj_type) for k in projected}
    self.state = {k: {"step": 0} for k in params}

  def step(self, grads, lr):
    for k, g in grads.items():
      st, p = self.state[k], self.params[k]
      if k in self.proj:
        g = self.proj[k].project(g, st["step"], lr / self.init_lr)
      if "m" not in st:
        st["m"], st["v"] = np.zeros_like(g), np.zeros_like(g)
      st["step"] += 1
      st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
      st["v"] = self.b2 * st["v"] + (1 - self.b2) * g * g
      denom = np.sqrt(st["v"]) + self.eps
      step_size = lr * math.sqrt(1 - self.b2 ** st["step"]) / (1 - self.b1 ** st["step"])
      direction = st["m"] / denom
      if k in self.proj:
        direction = self.proj[k].project_back(direction)
      p = p - step_size * direction
      if self.wd > 0:
        p = p - lr * self.wd * p  # decay of the updated weights
      self.params[k] = p


class GaLoreLion:
  """The official GaLoreLion: sign taken after the back-projection, decay after the update."""

  def __init__(self, params, projected, lr, rank, gap, scale, proj_type, b1=0.9, b2=0.99,
               weight_decay=0.0):
    self.params = {k: np.array(v, np.float64) for k, v in params.items()}
    self.init_lr, self.b1, self.b2, self.wd = lr, b1, b2, weight_decay
    self.proj = {k: Projector(rank, gap, scale, proj_type) for k in projected}
    self.state = {k: {"step": 0} for k in params}

  def step(self, grads, lr):
    for k, g in grads.items():
      st, p = self.state[k], self.params[k]
      if k in self.proj:
        g = self.proj[k].project(g, st["step"], lr / self.init_lr)
      if "m" not in st:
        st["m"] = np.zeros_like(g)
      c = self.b1 * st["m"] + (1 - self.b1) * g
      if k in self.proj:
        c = self.proj[k].project_back(c)
      p = p - lr * np.sign(c)
      st["step"] += 1
      st["m"] = self.b2 * st["m"] + (1 - self.b2) * g
      self.params[k] = p * (1 - lr * self.wd)
