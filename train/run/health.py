"""Divergence detection from the logged metrics (host side, at log steps only).

:class:`DivergenceMonitor` reads each train record the trainer logs and names what looks wrong,
once per kind, with the knob to turn:

* ``loss``: the (mean) training loss has stayed at or above its first logged value for
  ``patience`` log steps in a row after warmup — the run is not learning, or is diverging;
* ``projector``: OSD's mean ``orthogonality_error`` ‖PᵀP − I‖_F is above √r = ‖I_r‖_F, i.e. PᵀP is
  further from the identity than the identity is from zero: P is no longer near-orthonormal and the
  projection scales the gradient arbitrarily (α·lr too large for this lr, or λ too small);
* ``collapse``: a finite loss with a gradient norm below ``1e-6`` — the model's output has
  collapsed (e.g. to a uniform distribution, loss = ln(vocab)) and nothing trains any more.

Healthy values of every metric are listed in train/README.md (section "Metrics").
"""

from __future__ import annotations

import math
from typing import Any

#: A gradient norm below this, with a finite loss, counts as collapsed.
COLLAPSED_GRAD_NORM = 1e-6


class DivergenceMonitor:
  """Feeds on logged train records; :meth:`check` returns new warnings (each kind at most once)."""

  def __init__(self, *, lr: float, warmup_steps: int, rank: int | None = None,
               projector_lr_ratio: float | None = None, osd: bool = False, patience: int = 5):
    self.lr, self.warmup, self.rank = lr, warmup_steps, rank
    self.ratio, self.osd, self.patience = projector_lr_ratio, osd, patience
    self.initial_loss: float | None = None
    self.streak = 0  # log steps in a row (after warmup) with the loss >= its initial value
    self.reported: set[str] = set()

  def _knobs(self) -> str:
    knobs = f"lower --lr (now {self.lr:g})"
    if self.osd and self.ratio is not None:
      knobs += (f", or OSD's projector step --projector-lr-ratio (alpha = {self.ratio:g}, "
                f"alpha*lr = {self.ratio * self.lr:.3g})")
    return knobs

  def check(self, step: int, record: dict[str, Any]) -> list[tuple[str, str]]:
    """``[(kind, message)]`` for the problems first seen in ``record`` (a train log record)."""
    found = []
    loss = record.get("loss")
    loss = float(loss) if isinstance(loss, (int, float)) else math.nan
    grad_norm = record.get("grad_norm")
    if math.isfinite(loss):
      if self.initial_loss is None:
        self.initial_loss = loss
      elif step > self.warmup and loss >= self.initial_loss:
        self.streak += 1
      else:
        self.streak = 0
      if self.streak >= self.patience:
        found.append(("loss", (f"the training loss {loss:.4g} has stayed at or above its first "
                               f"logged value {self.initial_loss:.4g} for {self.streak} log steps "
                               f"after warmup: the run is not learning or is diverging; "
                               f"{self._knobs()}")))
      if loss > 0 and isinstance(grad_norm, (int, float)) and grad_norm < COLLAPSED_GRAD_NORM:
        found.append(("collapse", (f"gradient norm {grad_norm:.3g} with loss {loss:.4g}: the "
                                   f"model's output has collapsed and nothing trains any more "
                                   f"(usually after a divergence); {self._knobs()}")))
    orth = record.get("orthogonality_error")
    if self.osd and self.rank and isinstance(orth, (int, float)) and math.isfinite(orth) \
        and orth > math.sqrt(self.rank):
      found.append(("projector", (f"projector orthogonality error ||P^T P - I||_F = {orth:.3g} > "
                                  f"sqrt(rank) = {math.sqrt(self.rank):.3g}: the projectors are "
                                  f"far from orthonormal; {self._knobs()}, or raise "
                                  f"--orthogonality-weight")))
    new = [(kind, msg) for kind, msg in found if kind not in self.reported]
    self.reported.update(kind for kind, _ in new)
    return new
