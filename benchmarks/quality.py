"""Quality: the same model trained on the embedded corpus with each optimizer, same tokens and seed.

Every run goes through the trainer's Python API (``train.trainer.train``) with one shared
``TrainConfig`` that differs only in the optimizer: adamw, galore_adamw, osd_adamw, osd_lion and
``osd_adamw (reference code)`` — the trainer's ``--reference-code``
(``osd_jax.osd_adamw(reference_code=True)``: the official PyTorch code's update).

More variants by name: ``osd_adamw (scale 1)`` (``osd_adamw_s1``; the trainer's OSD default is
scale 0.25 since the study in benchmarks/RESULTS.md §4c), ``galore_adamw (no sign
alignment)`` (``galore_noalign``) and ``adamw (scale 0.25)`` (``adamw_s025``: AdamW with GaLore's
scale on the attention/MLP matrices and no projection, the control for "is it the subspace or the
smaller step?"), ``adamw (scale 0.125)`` (``adamw_s0125``: also the √(r/s) = 1/2 by which a rank-32
back-projection shrinks the step's norm at tiny).

The fair-study design: ``--lrs`` trains every optimizer once per learning rate (first seed) and
keeps each one's best (lowest final eval loss); ``--repeats N`` then trains N seeds at that lr and
reports mean ± std; ``--ranks`` adds a rank sweep at the best lr for ``--rank-sweep-optimizers``.
Writes the tables, a JSON file and a PNG of training loss, eval loss and captured energy
(``osd_jax.captured_energy``, mean over projected matrices) of the best-lr runs. The default
(tiny preset, 500 steps of 16×128 tokens, 5 optimizers, one lr) takes about 17 minutes on 2 CPU
cores (10 for 300 steps).

Example::

  python -m benchmarks.quality
  python -m benchmarks.quality --lrs 1e-3,3e-3,1e-2 --repeats 3 --ranks 8,16,32,64
  python -m benchmarks.quality --preset 60m --steps 1000 --batch-size 64 --seq-len 256 --rank 128
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

#: name -> TrainConfig fields of that variant (the optimizer and what differs from its defaults)
VARIANTS = {
    "adamw": {"optimizer": "adamw"},
    "galore_adamw": {"optimizer": "galore_adamw"},
    "osd_adamw": {"optimizer": "osd_adamw"},
    "osd_lion": {"optimizer": "osd_lion"},
    "osd_adamw (reference code)": {"optimizer": "osd_adamw", "reference_code": True},
    "osd_adamw (scale 0.25)": {"optimizer": "osd_adamw", "scale": 0.25},  # the trainer's default
    "osd_adamw (scale 1)": {"optimizer": "osd_adamw", "scale": 1.0},  # the paper's equations
    # the control: GaLore's smaller step on the projected matrices, without any projection
    "adamw (scale 0.25)": {"optimizer": "adamw", "scale": 0.25},
    # ... and with the step norm of a rank-r back-projection too: ‖P N‖ = ‖N‖ ≈ √(r/s)·‖full-rank
    # Adam direction‖, so 0.25·√(32/128) = 0.125 for tiny at rank 32
    "adamw (scale 0.125)": {"optimizer": "adamw", "scale": 0.125},
    "galore_adamw (no sign alignment)": {"optimizer": "galore_adamw", "align_signs": False},
}
#: Compact precision (benchmarks/RESULTS.md §9): bf16 weights rounded to nearest (the control that
#: shows why stochastic rounding is needed), with stochastic rounding, then bf16 / 8-bit moments;
#: the 8-bit runs with the fused update (--fused-update: the configuration that fits 7B in 21 GiB).
#: Short names: osd_adamw_bf16rtn, osd_adamw_bf16, osd_adamw_bf16s, osd_adamw_int8,
#: osd_adamw_int8dyn, osd_adamw_float8 (= int8) (and galore_adamw_...); osd_adamw_fused,
#: galore_adamw_fused: float32, fused; osd_adamw_int8exact: int8, fused, clipped by this step's
#: norm (--fused-clip exact); osd_adamw_int8_pada, osd_adamw_int8_plion: int8 with P moved by
#: Adafactor or Lion.
COMPACT = {
    "bf16 weights, round to nearest": ("bf16rtn", {"param_dtype": "bfloat16",
                                                   "stochastic_rounding": False,
                                                   "state_dtype": "float32"}),
    "bf16 weights": ("bf16", {"param_dtype": "bfloat16", "state_dtype": "float32"}),
    "bf16 weights, bf16 state": ("bf16s", {"param_dtype": "bfloat16", "state_dtype": "bfloat16"}),
    "bf16 weights, int8 state, fused": ("int8", {"param_dtype": "bfloat16", "state_dtype": "int8",
                                                 "fused_update": True}),
    "bf16 weights, int8_dynamic state, fused": ("int8dyn", {"param_dtype": "bfloat16",
                                                            "state_dtype": "int8_dynamic",
                                                            "fused_update": True}),
    "bf16 weights, float8 state, fused": ("float8", {"param_dtype": "bfloat16",
                                                     "state_dtype": "float8",
                                                     "fused_update": True}),
    "bf16 weights, int8 state, fused, exact clipping": ("int8exact", {
        "param_dtype": "bfloat16", "state_dtype": "int8", "fused_update": True,
        "fused_clip": "exact"}),
    "fused": ("fused", {"fused_update": True}),
    # P moved by a lighter optimizer than Adam (--projector-optimizer; osd_adamw only)
    "bf16 weights, int8 state, fused, P by adafactor": (
        "int8_pada", {"param_dtype": "bfloat16", "state_dtype": "int8", "fused_update": True,
                      "projector_optimizer": "adafactor"}),
    "bf16 weights, int8 state, fused, P by lion": (
        "int8_plion", {"param_dtype": "bfloat16", "state_dtype": "int8", "fused_update": True,
                       "projector_optimizer": "lion"}),
}
for _optimizer in ("osd_adamw", "galore_adamw"):
  for _label, (_short, _fields) in COMPACT.items():
    if _optimizer == "osd_adamw" or "projector_optimizer" not in _fields:
      VARIANTS[f"{_optimizer} ({_label})"] = {"optimizer": _optimizer, **_fields}
DEFAULT_VARIANTS = ("adamw", "galore_adamw", "osd_adamw", "osd_lion", "osd_adamw (reference code)")
ALIASES = {"osd_adamw_ref": "osd_adamw (reference code)",
           "osd_adamw_s025": "osd_adamw (scale 0.25)",
           "osd_adamw_s1": "osd_adamw (scale 1)",
           "adamw_s025": "adamw (scale 0.25)",
           "adamw_s0125": "adamw (scale 0.125)",
           "galore_noalign": "galore_adamw (no sign alignment)",
           **{f"{o}_{short}": f"{o} ({label})" for o in ("osd_adamw", "galore_adamw")
              for label, (short, _) in COMPACT.items() if f"{o} ({label})" in VARIANTS}}


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], preset="tiny", repeats=1, warmup=0)
  p.set_defaults(rank=None)
  p.add_argument("--optimizers", default=",".join(DEFAULT_VARIANTS),
                 help=f"Comma-separated, from: {', '.join(VARIANTS)} (or the short names "
                      f"{', '.join(ALIASES)}).")
  p.add_argument("--lrs", default=None,
                 help="Learning-rate sweep, e.g. 1e-3,3e-3,1e-2: every optimizer trains once "
                      "(first seed) at each, then --repeats seeds at its best (lowest final eval "
                      "loss). Default: --lr only. osd_lion uses each value × --lion-lr-factor.")
  p.add_argument("--ranks", default=None,
                 help="Rank sweep at each optimizer's best lr (first seed), e.g. 8,16,32,64, for "
                      "--rank-sweep-optimizers.")
  p.add_argument("--rank-sweep-optimizers", default="galore_adamw,osd_adamw")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3, help="Peak lr (all Adam-based optimizers).")
  p.add_argument("--lion-lr-factor", type=float, default=1 / 3,
                 help="osd_lion's lr is --lr times this (Lion wants a smaller step).")
  p.add_argument("--projector-lr-ratio", type=float, default=2.0,
                 help="α for osd_adamw/osd_lion (projector step α·lr(t)); 2, the value of the "
                      "studies in benchmarks/RESULTS.md §4c/§4d (the trainer's default 5 was "
                      "better at lr 1e-2 there).")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--update-proj-gap", type=int, default=200)
  p.add_argument("--dtype", default="float32", help="Compute dtype.")
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--seed", type=int, default=0, help="First seed (repeats use seed, seed+1, ...).")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--num-devices", type=int, default=1, help="Devices in the mesh.")
  p.add_argument("--png", default=None, help="Curves PNG (default: next to the JSON).")
  p.add_argument("--keep-runs", default=None,
                 help="Keep the run directories under this folder (default: a temporary one).")
  p.add_argument("--cache-dir", default=None, help="Tokenizer cache (trainer default).")
  p.add_argument("--tokenizer", default=None,
                 help="SentencePiece .model file (default: the trainer's embedded-corpus one).")
  args = p.parse_args(argv)
  names = []
  for o in (o.strip() for o in args.optimizers.split(",")):
    if not o:
      continue
    o = ALIASES.get(o, o)
    if o not in VARIANTS:
      p.error(f"unknown optimizer {o!r}; choose from {', '.join(VARIANTS)}")
    names.append(o)
  args.optimizers = names
  args.lrs = _floats(args.lrs) if args.lrs else [args.lr]
  args.ranks = [int(r) for r in _floats(args.ranks)] if args.ranks else []
  args.rank_sweep_optimizers = [ALIASES.get(o.strip(), o.strip())
                                for o in args.rank_sweep_optimizers.split(",") if o.strip()]
  return args


def train_config(args, name: str, seed: int, run_dir: str, lr: float | None = None,
                 rank: int | None = None):
  """The variant's TrainConfig at the sweep value ``lr`` (osd_lion: × --lion-lr-factor)."""
  from train.config import TrainConfig

  fields = dict(VARIANTS[name])
  lr = args.lr if lr is None else lr
  lr *= args.lion_lr_factor if fields["optimizer"] == "osd_lion" else 1.0
  return TrainConfig(
      preset=args.preset,
      rank=common.resolve_rank(args.preset, args.rank if rank is None else rank),
      lr=lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      dtype=args.dtype, projector_lr_ratio=args.projector_lr_ratio,
      weight_decay=args.weight_decay, update_proj_gap=args.update_proj_gap, seed=seed,
      **fields,
      eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
      ckpt_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
      tensorboard=False, run_dir=run_dir, cache_dir=args.cache_dir, tokenizer=args.tokenizer,
      model_overrides=common.parse_overrides(args.model_override))


def train_one(args, name: str, seed: int, run_dir: str, tokenizer, lr: float | None = None,
              rank: int | None = None) -> dict[str, Any]:
  import jax

  import osd_jax
  from train import trainer

  cfg = train_config(args, name, seed, run_dir, lr, rank)
  devices = jax.devices()[: args.num_devices] if args.num_devices else None
  t0 = time.perf_counter()
  result = trainer.train(cfg, devices=devices, tokenizer=tokenizer)
  wall = time.perf_counter() - t0
  train_curve = [(r["step"], r["loss"]) for r in result.history
                 if isinstance(r.get("loss"), (int, float))]
  eval_curve = [(r["step"], r["eval_loss"]) for r in result.history
                if isinstance(r.get("eval_loss"), (int, float))]
  energy_curve = [(r["step"], r["captured_energy_mean"], r["captured_energy_min"])
                  for r in result.history
                  if isinstance(r.get("captured_energy_mean"), (int, float))
                  and math.isfinite(r["captured_energy_mean"])]
  return {
      "seed": seed,
      "final_eval_loss": result.final_eval["eval_loss"],
      "final_eval_perplexity": result.final_eval["eval_perplexity"],
      "initial_eval_loss": result.initial_eval.get("eval_loss"),
      "final_train_loss": train_curve[-1][1] if train_curve else None,
      "skipped_steps": int(result.state.skipped),
      "state_bytes": osd_jax.state_bytes(result.state.opt_state),
      "wall_time_s": wall,
      "train_curve": train_curve,
      "eval_curve": eval_curve,
      "energy_curve": energy_curve,
      "lr": cfg.lr,
      "sweep_lr": args.lr if lr is None else lr,
      "rank": cfg.rank,
  }


def _mean_std(xs):
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def plot_curves(results: dict[str, list[dict]], path: str, title: str) -> str | None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    common.log("quality: matplotlib is not installed; no PNG written")
    return None
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  for name, runs in results.items():
    for i, run in enumerate(runs):
      label = name if i == 0 else None
      color = f"C{list(results).index(name)}"
      if run["train_curve"]:
        s, v = zip(*run["train_curve"])
        axes[0].plot(s, v, color=color, alpha=0.85, lw=1.2, label=label)
      if run["eval_curve"]:
        s, v = zip(*run["eval_curve"])
        axes[1].plot(s, v, "o-", color=color, ms=3, lw=1.2, label=label)
      if run.get("energy_curve"):
        s, v, _ = zip(*run["energy_curve"])
        axes[2].plot(s, v, color=color, alpha=0.85, lw=1.2, label=label)
  axes[0].set(title="training loss", xlabel="step", ylabel="loss")
  axes[1].set(title="eval loss", xlabel="step", ylabel="loss")
  axes[2].set(title="captured energy ‖QᵀG‖²/‖G‖² (mean over matrices)", xlabel="step",
              ylabel="fraction")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run(args) -> dict:
  from train import trainer

  tok_cfg = train_config(args, args.optimizers[0], args.seed, run_dir="unused")
  tokenizer = trainer.load_tokenizer(tok_cfg)
  root = args.keep_runs or tempfile.mkdtemp(prefix="osd-quality-")
  results: dict[str, list[dict]] = {name: [] for name in args.optimizers}
  sweep: dict[str, dict[str, float]] = {name: {} for name in args.optimizers}
  ranks: dict[str, dict[str, float]] = {}

  def one(name, seed, lr, rank=None):
    slug = name.replace(" ", "_").replace("(", "").replace(")", "")
    run_dir = os.path.join(root, f"{slug}-lr{lr:g}-r{rank}-seed{seed}")
    if os.path.exists(run_dir):
      shutil.rmtree(run_dir)
    common.log(f"quality: training {name} (lr {lr:g}, rank {rank or 'default'}, seed {seed}, "
               f"{args.steps} steps)")
    res = train_one(args, name, seed, run_dir, tokenizer, lr, rank)
    common.log(f"quality: {name}: eval loss {res['final_eval_loss']:.4f}, perplexity "
               f"{res['final_eval_perplexity']:.2f}, {res['wall_time_s']:.0f} s")
    return res

  def loss_of(res):
    x = res["final_eval_loss"]
    return x if x is not None and math.isfinite(x) else math.inf

  best_lr = {}
  try:
    for name in args.optimizers:  # 1. lr sweep, first seed
      runs = {lr: one(name, args.seed, lr) for lr in args.lrs}
      sweep[name] = {f"{lr:g}": runs[lr]["final_eval_loss"] for lr in args.lrs}
      best_lr[name] = min(args.lrs, key=lambda lr: loss_of(runs[lr]))
      results[name].append(runs[best_lr[name]])
    for r in range(1, args.repeats):  # 2. more seeds at the best lr
      for name in args.optimizers:
        results[name].append(one(name, args.seed + r, best_lr[name]))
    for name in args.rank_sweep_optimizers if args.ranks else []:  # 3. ranks at the best lr
      if name in best_lr:
        ranks[name] = {str(k): one(name, args.seed, best_lr[name], k)["final_eval_loss"]
                       for k in args.ranks}
  finally:
    if args.keep_runs is None:
      shutil.rmtree(root, ignore_errors=True)
  base, _ = _mean_std([r["final_eval_loss"] for r in results.get("adamw", [])])
  rows, summary = [], {}
  for name, runs in results.items():
    loss, loss_sd = _mean_std([r["final_eval_loss"] for r in runs])
    ppl, ppl_sd = _mean_std([r["final_eval_perplexity"] for r in runs])
    train_loss, _ = _mean_std([r["final_train_loss"] for r in runs])
    wall, _ = _mean_std([r["wall_time_s"] for r in runs])
    summary[name] = {"final_eval_loss": loss, "final_eval_loss_std": loss_sd,
                     "final_eval_perplexity": ppl, "final_eval_perplexity_std": ppl_sd,
                     "final_train_loss": train_loss, "wall_time_s": wall,
                     "state_bytes": runs[0]["state_bytes"], "lr": runs[0]["lr"],
                     "energy_mean": _mean_std([e[1] for r in runs for e in r["energy_curve"]])[0],
                     "eval_loss_minus_adamw": None if base is None else loss - base}
    pm = "" if len(runs) == 1 else f" ± {loss_sd:.4f}"
    pp = "" if len(runs) == 1 else f" ± {ppl_sd:.2f}"
    rows.append([name, f"{runs[0]['lr']:g}", f"{loss:.4f}{pm}", f"{ppl:.2f}{pp}",
                 "–" if base is None else f"{loss - base:+.4f}",
                 f"{train_loss:.4f}" if train_loss is not None else "–",
                 "–" if summary[name]["energy_mean"] is None
                 else f"{summary[name]['energy_mean']:.3f}",
                 common.fmt_bytes(runs[0]["state_bytes"]), f"{wall:.0f} s"])
  header = ["optimizer", "best lr", "final eval loss", "eval perplexity", "Δ vs adamw",
            "final train loss", "captured energy", "opt state", "wall time"]
  sweep_rows = [[name] + [f"{sweep[name].get(f'{lr:g}', math.nan):.4f}" for lr in args.lrs]
                for name in args.optimizers]
  sweep_table = common.table(sweep_rows, ["final eval loss at sweep lr"] +
                             [f"{lr:g}" for lr in args.lrs])
  rank_table = None
  if ranks:
    rank_table = common.table(
        [[name] + [f"{ranks[name][str(k)]:.4f}" for k in args.ranks] for name in ranks],
        ["final eval loss at rank"] + [str(k) for k in args.ranks])
  tokens = args.steps * args.batch_size * args.seq_len
  return {
      "benchmark": "quality",
      "preset": args.preset,
      "rank": common.resolve_rank(args.preset, args.rank),
      "steps": args.steps,
      "batch_size": args.batch_size,
      "seq_len": args.seq_len,
      "tokens": tokens,
      "lr": args.lr,
      "projector_lr_ratio": args.projector_lr_ratio,
      "repeats": args.repeats,
      "summary": summary,
      "runs": results,
      "table": common.table(rows, header),
      "lr_sweep": sweep,
      "lrs": args.lrs,
      "sweep_table": sweep_table,
      "rank_sweep": ranks,
      "rank_table": rank_table,
  }


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  result = run(args)
  path = args.out or common.default_out_path("quality", args.preset)
  png = args.png or os.path.splitext(path)[0] + ".png"
  lrs = f"lr {args.lr:g}" if len(args.lrs) == 1 else "best lr of " + ",".join(
      f"{lr:g}" for lr in args.lrs)
  title = (f"{args.preset}: {result['steps']} steps × {args.batch_size}×{args.seq_len} tokens, "
           f"rank {result['rank']}, {lrs}, "
           f"seeds {args.seed}..{args.seed + args.repeats - 1}")
  result["png"] = plot_curves(result["runs"], png, title)
  common.write_json(path, result)
  if not args.quiet:
    env = common.environment()
    print(f"\nQuality — {title}; {result['tokens']:,} tokens per run; "
          f"{common.describe_machine(env)}, jax {env['versions']['jax']}")
    print(result["table"])
    if len(args.lrs) > 1:
      print("\nlearning-rate sweep (first seed; osd_lion's lr is the value × "
            f"{args.lion_lr_factor:g}):")
      print(result["sweep_table"])
    if result["rank_table"]:
      print("\nrank sweep at the best lr (first seed):")
      print(result["rank_table"])
    print(f"(JSON: {path}; curves: {result['png']})")
  return result


if __name__ == "__main__":
  main()
