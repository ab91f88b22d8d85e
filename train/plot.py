"""Loss curves of one or more runs: ``python -m train.plot RUN_DIR... --out curves.png``.

Left panel: training loss per step; right panel: eval perplexity per step. Each run is labelled by
its optimizer (from ``config.json``) unless ``--labels`` are given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train.metrics import read_jsonl


def load_run(run_dir: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
  """(label, {"loss": [(step, value)], "eval_perplexity": [...]}) of a run directory."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
  label = os.path.basename(os.path.normpath(run_dir))
  cfg_path = os.path.join(run_dir, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path, encoding="utf-8") as f:
      cfg = json.load(f)
    label = cfg.get("optimizer", label)
    if "rank" in cfg and str(cfg.get("optimizer", "")).startswith(("osd", "galore")):
      label += f" (r={cfg['rank']})"
  series: dict[str, dict[int, float]] = {"loss": {}, "eval_perplexity": {}}
  for record in read_jsonl(path):  # a resumed run may repeat steps: the last record wins
    for key, values in series.items():
      if isinstance(record.get(key), (int, float)):
        values[int(record["step"])] = float(record[key])
  return label, {k: sorted(v.items()) for k, v in series.items()}


def plot(run_dirs: list[str], out: str, labels: list[str] | None = None,
         title: str | None = None) -> str:
  """Writes the comparison figure to ``out`` and returns its path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
  for i, run_dir in enumerate(run_dirs):
    label, series = load_run(run_dir)
    if labels:
      label = labels[i]
    if series["loss"]:
      ax_loss.plot(*zip(*series["loss"]), label=label, linewidth=1.2)
    if series["eval_perplexity"]:
      ax_ppl.plot(*zip(*series["eval_perplexity"]), marker="o", markersize=3, label=label)
  ax_loss.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
  ax_ppl.set(xlabel="step", ylabel="eval perplexity", title="eval perplexity", yscale="log")
  for ax in (ax_loss, ax_ppl):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.plot",
                                   description="Plot loss and eval perplexity of training runs.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
  parser.add_argument("--out", default="curves.png", help="output PNG (default: curves.png)")
  parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
  parser.add_argument("--title", default=None, help="figure title")
  args = parser.parse_args(argv)
  if args.labels and len(args.labels) != len(args.run_dirs):
    print(f"error: --labels has {len(args.labels)} entries for {len(args.run_dirs)} runs",
          file=sys.stderr)
    return 2
  try:
    path = plot(args.run_dirs, args.out, args.labels, args.title)
  except (FileNotFoundError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
