"""Quality: the same model trained on the embedded corpus with each optimizer, same tokens and seed.

Every run goes through the trainer's Python API (``train.trainer.train``) with one shared
``TrainConfig`` that differs only in the optimizer: adamw, galore_adamw, osd_adamw, osd_lion and
``osd_adamw (reference code)`` — the trainer's ``--reference-code``
(``osd_jax.osd_adamw(reference_code=True)``: the official PyTorch code's update).

Writes a table of final eval loss / perplexity, a JSON file and a PNG of the training and eval loss
curves. The default (tiny preset, 500 steps of 16×128 tokens, 5 optimizers) takes about 17
minutes on 2 CPU cores (10 for 300 steps); larger settings by flag, e.g. ``--steps 2000
--batch-size 32``, and ``--repeats N`` trains N seeds per optimizer and reports mean ± std.

Example::

  python -m benchmarks.quality
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

#: name -> (trainer --optimizer, use the reference-code options)
VARIANTS = {
    "adamw": ("adamw", False),
    "galore_adamw": ("galore_adamw", False),
    "osd_adamw": ("osd_adamw", False),
    "osd_lion": ("osd_lion", False),
    "osd_adamw (reference code)": ("osd_adamw", True),
}
ALIASES = {"osd_adamw_ref": "osd_adamw (reference code)"}


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], preset="tiny", repeats=1, warmup=0)
  p.set_defaults(rank=None)
  p.add_argument("--optimizers", default=",".join(VARIANTS),
                 help=f"Comma-separated, from: {', '.join(VARIANTS)} (or osd_adamw_ref).")
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3, help="Peak lr (all Adam-based optimizers).")
  p.add_argument("--lion-lr-factor", type=float, default=1 / 3,
                 help="osd_lion's lr is --lr times this (Lion wants a smaller step).")
  p.add_argument("--projector-lr-ratio", type=float, default=2.0,
                 help="α for osd_adamw/osd_lion (projector step α·lr(t)).")
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
  return args


def train_config(args, name: str, seed: int, run_dir: str):
  from train.config import TrainConfig

  optimizer, reference_code = VARIANTS[name]
  lr = args.lr * (args.lion_lr_factor if optimizer == "osd_lion" else 1.0)
  return TrainConfig(
      preset=args.preset, optimizer=optimizer, rank=common.resolve_rank(args.preset, args.rank),
      lr=lr, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      dtype=args.dtype, projector_lr_ratio=args.projector_lr_ratio,
      weight_decay=args.weight_decay, update_proj_gap=args.update_proj_gap, seed=seed,
      reference_code=reference_code,
      eval_every=args.eval_every, eval_batches=args.eval_batches, log_every=args.log_every,
      ckpt_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
      tensorboard=False, run_dir=run_dir, cache_dir=args.cache_dir, tokenizer=args.tokenizer,
      model_overrides=common.parse_overrides(args.model_override))


def train_one(args, name: str, seed: int, run_dir: str, tokenizer) -> dict[str, Any]:
  import jax

  import osd_jax
  from train import trainer

  cfg = train_config(args, name, seed, run_dir)
  devices = jax.devices()[: args.num_devices] if args.num_devices else None
  t0 = time.perf_counter()
  result = trainer.train(cfg, devices=devices, tokenizer=tokenizer)
  wall = time.perf_counter() - t0
  train_curve = [(r["step"], r["loss"]) for r in result.history
                 if isinstance(r.get("loss"), (int, float))]
  eval_curve = [(r["step"], r["eval_loss"]) for r in result.history
                if isinstance(r.get("eval_loss"), (int, float))]
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
      "lr": cfg.lr,
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
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
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
  axes[0].set(title="training loss", xlabel="step", ylabel="loss")
  axes[1].set(title="eval loss", xlabel="step", ylabel="loss")
  for ax in axes:
    ax.grid(alpha=0.3)
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
  try:
    for r in range(args.repeats):
      for name in args.optimizers:
        seed = args.seed + r
        slug = name.replace(" ", "_").replace("(", "").replace(")", "")
        run_dir = os.path.join(root, f"{slug}-seed{seed}")
        if os.path.exists(run_dir):
          shutil.rmtree(run_dir)
        common.log(f"quality: training {name} (seed {seed}, {args.steps} steps)")
        res = train_one(args, name, seed, run_dir, tokenizer)
        common.log(f"quality: {name}: eval loss {res['final_eval_loss']:.4f}, perplexity "
                   f"{res['final_eval_perplexity']:.2f}, {res['wall_time_s']:.0f} s")
        results[name].append(res)
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
                     "eval_loss_minus_adamw": None if base is None else loss - base}
    pm = "" if len(runs) == 1 else f" ± {loss_sd:.4f}"
    pp = "" if len(runs) == 1 else f" ± {ppl_sd:.2f}"
    rows.append([name, f"{loss:.4f}{pm}", f"{ppl:.2f}{pp}",
                 "–" if base is None else f"{loss - base:+.4f}",
                 f"{train_loss:.4f}" if train_loss is not None else "–",
                 common.fmt_bytes(runs[0]["state_bytes"]), f"{wall:.0f} s"])
  header = ["optimizer", "final eval loss", "eval perplexity", "Δ vs adamw", "final train loss",
            "opt state", "wall time"]
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
  }


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  result = run(args)
  path = args.out or common.default_out_path("quality", args.preset)
  png = args.png or os.path.splitext(path)[0] + ".png"
  title = (f"{args.preset}: {result['steps']} steps × {args.batch_size}×{args.seq_len} tokens, "
           f"rank {result['rank']}, lr {args.lr:g}, "
           f"seeds {args.seed}..{args.seed + args.repeats - 1}")
  result["png"] = plot_curves(result["runs"], png, title)
  common.write_json(path, result)
  if not args.quiet:
    env = common.environment()
    print(f"\nQuality — {title}; {result['tokens']:,} tokens per run; "
          f"{common.describe_machine(env)}, jax {env['versions']['jax']}")
    print(result["table"])
    print(f"(JSON: {path}; curves: {result['png']})")
  return result


if __name__ == "__main__":
  main()
