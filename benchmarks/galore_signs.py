"""GaLore's SVD signs at a refresh: aligned with the previous P, canonical, or raw LAPACK.

``galore_adamw`` carries Adam's state across a refresh of P, so a new column whose sign is
opposite to the old one's meets its old first moment negated. This script measures what that
costs on a low-rank least-squares problem: W (64×32) fitted to a rank-8 target from mini-batches
of 32 Gaussian inputs, rank 4, refresh every 10 steps, constant lr; held-out loss after
``--steps`` steps, mean ± std over ``--seeds`` seeds, one row per sign rule:

* aligned: each refreshed column takes the previous P's sign (``align_signs=True``, the default);
* canonical: every refresh's own canonical signs (``align_signs=False``);
* raw LAPACK: ``svd_method="official"``, the official code's choice.

Example::

  python -m benchmarks.galore_signs            # 1000 steps × 5 seeds, about 2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys

M, N, TRUE_RANK, BATCH = 64, 32, 8, 32

RULES = {
    "aligned (default)": dict(align_signs=True),
    "canonical per refresh": dict(align_signs=False),
    "raw LAPACK (official)": dict(svd_method="official"),
}


def held_out_loss(seed: int, steps: int, rank: int, gap: int, lr: float, **kw) -> float:
  import jax
  import jax.numpy as jnp

  import osd_jax

  k = jax.random.split(jax.random.key(seed), 4)
  w_true = jax.random.normal(k[0], (M, TRUE_RANK)) @ jax.random.normal(k[1], (TRUE_RANK, N)) / 3
  tx = osd_jax.galore_adamw(lr, rank, update_proj_gap=gap, scale=1.0, **kw)

  def loss(w, x):  # ½ E‖x(W − W*)‖²
    return 0.5 * jnp.mean(jnp.sum((x @ (w - w_true)) ** 2, axis=-1))

  def body(carry, t):
    w, state = carry
    x = jax.random.normal(jax.random.fold_in(k[2], t), (BATCH, M))
    u, state = tx.update({"w": jax.grad(loss)(w, x)}, state, {"w": w})
    return (w + u["w"], state), None

  w0 = jnp.zeros((M, N))
  (w, _), _ = jax.lax.scan(body, (w0, tx.init({"w": w0})), jnp.arange(steps))
  return float(loss(w, jax.random.normal(k[3], (4096, M))))


def main(argv=None) -> dict:
  import numpy as np

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=1000)
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--rank", type=int, default=4)
  p.add_argument("--update-proj-gap", type=int, default=10)
  p.add_argument("--lr", type=float, default=1e-2)
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  out = {}
  for name, kw in RULES.items():
    losses = np.array([held_out_loss(s, args.steps, args.rank, args.update_proj_gap, args.lr, **kw)
                       for s in range(args.seeds)])
    out[name] = losses.tolist()
    sd = losses.std(ddof=1) if len(losses) > 1 else 0.0
    print(f"{name:24s} held-out loss {losses.mean():9.3f} ± {sd:7.3f}   per seed: "
          + ", ".join(f"{x:.1f}" for x in losses))
  return out


if __name__ == "__main__":
  main()
