"""The projector's own cost per matrix: one online-PCA step vs one SVD vs the randomized init.

For each weight shape m×n (G' is s×L with s = min(m, n)) and rank r, three jitted functions are
timed side by side on the same random float32 gradient:

* ``online-PCA step``: ``osd_jax.projectors.online_pca(...).update`` at step t ≥ 1 (the count is
  a traced argument, so the t = 0 SVD branch is compiled but not taken). It includes the projection
  Ĝ = PᵀG' that the optimizer needs anyway, the closed-form ∇L and the projector's Adam step;
* ``SVD``: ``jnp.linalg.svd(G', full_matrices=False)`` — what GaLore computes every T steps (and
  OSD's default P₀);
* ``randomized init``: ``osd_jax.projectors.randomized_subspace`` (range finder with 2 power
  iterations, ``projector_init="randomized"``).

The paper (arXiv 2408.12857, A100, PyTorch) reports online PCA 20.7× / 57.9× / 72.9× / 142.4×
faster than ``torch.svd`` for 512×1376, 1024×2736, 2048×5461 and 4096×11008.

Example::

  python -m benchmarks.projector                       # the paper's shapes (the largest off on CPU)
  python -m benchmarks.projector --shapes 4096x11008:512
  python -m benchmarks.projector --preset 350m         # that preset's projected shapes
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common

#: The paper's four LLaMA MLP shapes, each with the rank used for its model size.
PAPER_SHAPES = ((512, 1376, 128), (1024, 2736, 256), (2048, 5461, 512), (4096, 11008, 512))
#: Online-PCA speedups over torch.svd that the paper reports (A100), by shape.
PAPER_SPEEDUP = {(512, 1376): 20.7, (1024, 2736): 57.9, (2048, 5461): 72.9, (4096, 11008): 142.4}

CASES = ("online-PCA step", "SVD", "randomized init")


def parse_shapes(text: str, default_rank: int | None) -> list[tuple[int, int, int]]:
  """``"512x1376:128,1024x2736"`` -> [(512, 1376, 128), (1024, 2736, default_rank)]."""
  out = []
  for item in text.split(","):
    item = item.strip().lower()
    if not item:
      continue
    dims, _, r = item.partition(":")
    m, _, n = dims.partition("x")
    rank = int(r) if r else default_rank
    if rank is None:
      raise ValueError(f"shape {item!r} needs a rank (e.g. {dims}:128) or --rank")
    out.append((int(m), int(n), int(rank)))
  if not out:
    raise ValueError("no shapes given")
  return out


def preset_shapes(preset: str, rank: int) -> list[tuple[int, int, int]]:
  """The distinct projected matrix shapes of a preset: attention d×d and MLP d×hidden."""
  cfg = common.model_config(preset)
  shapes = [(cfg.dim, cfg.n_heads * cfg.head_dim), (cfg.dim, cfg.hidden_dim)]
  if cfg.num_kv_heads != cfg.n_heads:
    shapes.append((cfg.dim, cfg.num_kv_heads * cfg.head_dim))
  return [(m, n, min(rank, m, n)) for m, n in dict.fromkeys(shapes)]


def make_cases(m: int, n: int, rank: int, seed: int = 0) -> dict[str, Any]:
  """Zero-argument callables (each blocking) for the three cases on one s×L matrix."""
  import osd_jax

  s, L = min(m, n), max(m, n)
  kg, kp, kr = jax.random.split(jax.random.key(seed), 3)
  g = jax.random.normal(kg, (s, L), jnp.float32)
  rule = osd_jax.projectors.online_pca(learning_rate=5e-3, orthogonality_weight=0.1)
  state = rule.init(s, L, rank, jnp.float32)
  # a P near the gradient's subspace, as after a few steps (the value does not change the cost)
  state = state._replace(p=osd_jax.projectors.random_subspace(s, rank, kp))
  count = jnp.asarray(1, jnp.int32)

  step = jax.jit(rule.update).lower(g, state, count, kr).compile()
  svd = jax.jit(lambda x: jnp.linalg.svd(x, full_matrices=False)).lower(g).compile()
  rand = jax.jit(lambda x, k: osd_jax.projectors.randomized_subspace(x, rank, k)).lower(
      g, kr).compile()

  holder = {"state": state}

  def run_step():
    _, _, holder["state"] = step(g, holder["state"], count, kr)
    jax.block_until_ready(holder["state"])

  return {
      "online-PCA step": run_step,
      "SVD": lambda: jax.block_until_ready(svd(g)),
      "randomized init": lambda: jax.block_until_ready(rand(g, kr)),
  }


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], repeats=10, warmup=2)
  p.set_defaults(preset=None)
  p.add_argument("--shapes", default=None,
                 help="Comma-separated MxN[:RANK] weight shapes (default: the paper's four shapes "
                      "with ranks 128/256/512/512; the 4096x11008 one is left out on CPU). Ignored "
                      "when --preset is given.")
  p.add_argument("--svd-repeats", type=int, default=None,
                 help="Timed rounds of the SVD case (default: --repeats; fewer saves time at the "
                      "largest shapes).")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def resolve_shapes(args) -> list[tuple[int, int, int]]:
  if args.preset is not None:
    return preset_shapes(args.preset, common.resolve_rank(args.preset, args.rank))
  if args.shapes is not None:
    return parse_shapes(args.shapes, args.rank)
  shapes = list(PAPER_SHAPES)
  if jax.default_backend() == "cpu":
    shapes = shapes[:3]
  if args.rank is not None:
    shapes = [(m, n, args.rank) for m, n, _ in shapes]
  return shapes


def run(args) -> dict:
  shapes = resolve_shapes(args)
  results = []
  rows = []
  for m, n, rank in shapes:
    s, L = min(m, n), max(m, n)
    if rank >= s:
      common.log(f"projector: skipping {m}x{n} at rank {rank} (rank >= {s}: not projected)")
      continue
    common.log(f"projector: {m}x{n}, rank {rank}")
    cases = make_cases(m, n, rank, args.seed)
    svd_repeats = args.svd_repeats or args.repeats
    stats = common.interleaved(cases, args.repeats, warmup=args.warmup,
                               repeats_for={"SVD": min(svd_repeats, args.repeats)})
    step, svd, rand = (stats[c]["median_s"] for c in CASES)
    entry = {
        "shape": [m, n], "s": s, "L": L, "rank": rank,
        "cases": stats,
        "svd_over_online_pca_step": common.ratio(svd, step),
        "svd_over_randomized_init": common.ratio(svd, rand),
        "randomized_init_over_online_pca_step": common.ratio(rand, step),
        "paper_speedup_torch_svd_over_online_pca": PAPER_SPEEDUP.get((m, n)),
        # one step's matmul work: Ĝ = PᵀG', B = G̃Aᵀ (2·s·L·r each) and the r×r/s×r products
        "online_pca_step_gflop": (4 * s * L * rank + 2 * rank * rank * L
                                  + 8 * s * rank * rank) / 1e9,
    }
    entry["online_pca_step_gflops"] = entry["online_pca_step_gflop"] / step
    results.append(entry)
    rows.append([f"{m}×{n}", rank, common.fmt_seconds(step), common.fmt_seconds(svd),
                 common.fmt_seconds(rand), common.fmt_ratio(entry["svd_over_online_pca_step"]),
                 common.fmt_ratio(entry["svd_over_randomized_init"]),
                 common.fmt_ratio(entry["paper_speedup_torch_svd_over_online_pca"])])
  header = ["shape", "rank", "online-PCA step", "SVD", "randomized init",
            "SVD / online-PCA step", "SVD / randomized", "paper (torch.svd / OSD, A100)"]
  return {
      "benchmark": "projector",
      "repeats": args.repeats,
      "warmup": args.warmup,
      "shapes": results,
      "table": common.table(rows, header),
  }


def main(argv=None) -> dict:
  return common.cli_main(
      "projector", argv, parse_args, lambda args, _: run(args),
      out_preset=lambda args: args.preset or "paper", heading=lambda args, result, env: (
          f"Projector cost per matrix (median of {args.repeats}) — "
          f"{common.describe_machine(env)}, jax {env['versions']['jax']}"))


if __name__ == "__main__":
  main()
