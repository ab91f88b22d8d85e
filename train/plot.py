"""Curves of one or more runs: ``python -m train.plot RUN_DIR... --out curves.png``.

Four panels: training loss per step (each log step's mean over the steps since the previous one,
faint, with an exponential moving average over log steps on top), eval perplexity, the learning
rate and the gradient norm, and one legend for all four below them. Each run is labelled by its
optimizer (and rank) from ``config.json`` plus every flag that changes what is trained
(:data:`RESULT_KEYS`: the model, the optimizer and its hyperparameters, the training shape and
seed, the data) whose value differs between the runs given (e.g. ``lr=0.003``; each differing
``--model-override`` as ``KEY=VALUE``), unless ``--labels`` are given. Flags that only change how a
run is watched or stored (``--eval-every``, ``--log-every``, ``--tokenizer`` paths, ``--progress``,
directories ...) never label it. ``--out`` is the file written; without a suffix ``.png`` is
added, and the path written is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from train.config import TrainConfig
from train.run.metrics import read_jsonl

SERIES = ("loss", "eval_perplexity", "lr", "grad_norm")
# Of the flags of the model, optimizer, training and data groups, those that do not change what
# is trained: how it is computed or stored (remat, layer layout, micro-batches), when a run stops
# on trouble, and where files are (the tokenizer's vocabulary is --vocab-size's, or the run's
# tokenizer.model, not its path).
_NOT_RESULT = {"remat", "scan_layers", "grad_accum", "max_consecutive_skips", "stop_on_divergence",
               "tokenizer", "tfds_data_dir", "cache_dir", "optimizer"}
#: The config keys that label runs when they differ: every flag that changes what is trained.
RESULT_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig)
                    if f.metadata.get("group") in ("model", "optimizer", "training", "data")
                    and f.name not in _NOT_RESULT)
_MAX_VALUE_CHARS = 32  # longer values (paths) keep their end


def load_config(run_dir: str) -> dict:
  path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def base_label(run_dir: str, cfg: dict) -> str:
  label = cfg.get("optimizer", os.path.basename(os.path.normpath(run_dir)))
  if cfg.get("rank") is not None and str(cfg.get("optimizer", "")).startswith(("osd", "galore")):
    label += f" (r={cfg['rank']})"
  return label


def _result_items(cfg: dict) -> dict:
  """The config's :data:`RESULT_KEYS`, each ``--model-override`` as its own key (prefixed with
  ``model.`` where it shares a flag's name)."""
  items = {k: cfg[k] for k in RESULT_KEYS if k in cfg and k != "model_overrides"}
  for k, v in (cfg.get("model_overrides") or {}).items():
    items[f"model.{k}" if k in items else k] = v
  return items


def _show(value) -> str:
  """A label's value: floats in their shortest form (0.003, 1e-05), long strings by their end."""
  text = f"{value:g}" if isinstance(value, float) else str(value)
  return text if len(text) <= _MAX_VALUE_CHARS else "…" + text[-(_MAX_VALUE_CHARS - 1):]


def labels_for(run_dirs: list[str]) -> list[str]:
  """One legend label per run: optimizer (rank), then the result-changing config keys
  (:data:`RESULT_KEYS`, each model override on its own) whose values differ between the runs."""
  cfgs = [load_config(d) for d in run_dirs]
  items = [_result_items(c) for c in cfgs]
  keys = sorted({k for i in items for k in i}, key=lambda k: (k not in RESULT_KEYS, k))
  differing = [k for k in keys if len({json.dumps(i.get(k), sort_keys=True) for i in items}) > 1]
  labels = []
  for d, c, i in zip(run_dirs, cfgs, items):
    shown = base_label(d, c)
    extra = [f"{k}={_show(i.get(k))}" for k in differing
             if not (k == "rank" and "(r=" in shown)]
    labels.append(" ".join([shown, *extra]))
  if len(set(labels)) < len(labels):  # identical configs: tell them apart by directory
    labels = [f"{lab} [{os.path.basename(os.path.normpath(d))}]"
              for lab, d in zip(labels, run_dirs)]
  return labels


def load_run(run_dir: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
  """(label, {series: [(step, value)]}) of a run directory, for every name in :data:`SERIES`."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
  label = base_label(run_dir, load_config(run_dir))
  series: dict[str, dict[int, float]] = {k: {} for k in SERIES}
  for record in read_jsonl(path):  # a resumed run may repeat steps: the last record wins
    for key, values in series.items():
      if isinstance(record.get(key), (int, float)):
        values[int(record["step"])] = float(record[key])
  return label, {k: sorted(v.items()) for k, v in series.items()}


def ema(values: list[float], weight: float = 0.8) -> list[float]:
  """Exponential moving average ``s_i = w s_{i-1} + (1 - w) x_i`` with bias correction."""
  out, s = [], 0.0
  for i, x in enumerate(values, 1):
    s = weight * s + (1 - weight) * x
    out.append(s / (1 - weight**i))
  return out


def output_path(out: str) -> str:
  """``out`` with ``.png`` added when it has no suffix (the file :func:`plot` writes)."""
  return out if os.path.splitext(out)[1] else out + ".png"


def figure(run_dirs: list[str], labels: list[str] | None = None, title: str | None = None,
           smoothing: float = 0.8):
  """The comparison figure (a matplotlib Figure; the caller closes it): four panels and one legend
  for them all below (a run's colour is the same in every panel), laid out by matplotlib's
  constrained layout, which makes room for the legend whatever the labels' length."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  labels = labels or labels_for(run_dirs)
  longest = max(len(label) for label in labels)
  ncol = max(1, min(len(labels), 3 if longest <= 30 else 2 if longest <= 50 else 1))
  rows = -(-len(labels) // ncol)
  fig, axes = plt.subplots(2, 2, figsize=(12, 8 + 0.25 * rows), layout="constrained")
  ax_loss, ax_ppl, ax_lr, ax_gn = axes.flat
  for i, run_dir in enumerate(run_dirs):
    _, series = load_run(run_dir)
    color = f"C{i}"
    if series["loss"]:
      steps, values = zip(*series["loss"])
      ax_loss.plot(steps, values, color=color, alpha=0.3, linewidth=0.8)
      ax_loss.plot(steps, ema(list(values), smoothing), color=color, linewidth=1.5)
    if series["eval_perplexity"]:
      ax_ppl.plot(*zip(*series["eval_perplexity"]), color=color, marker="o", markersize=3)
    for ax, key in ((ax_lr, "lr"), (ax_gn, "grad_norm")):
      if series[key]:
        ax.plot(*zip(*series[key]), color=color, linewidth=1.2)
  ax_loss.set(xlabel="step", ylabel="training loss (nats/token)",
              title=f"training loss (faint: per log step; solid: EMA {smoothing:g})")
  ax_ppl.set(xlabel="step", ylabel="eval perplexity", title="eval perplexity", yscale="log")
  ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
  ax_gn.set(xlabel="step", ylabel="gradient norm (before clipping)", title="gradient norm",
            yscale="log")
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  handles = [Line2D([], [], color=f"C{i}", linewidth=1.5, label=label)
             for i, label in enumerate(labels)]
  fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
  if title:
    fig.suptitle(title)
  return fig


def plot(run_dirs: list[str], out: str, labels: list[str] | None = None,
         title: str | None = None, smoothing: float = 0.8) -> str:
  """Writes the comparison figure and returns the path written (:func:`output_path` of ``out``)."""
  import matplotlib.pyplot as plt

  fig = figure(run_dirs, labels, title, smoothing)
  try:
    path = output_path(out)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
  finally:
    plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m train.plot",
      description="Plot training loss, eval perplexity, learning rate and gradient norm of runs.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
  parser.add_argument("--out", default="curves.png",
                      help="output image (default: curves.png; .png is added when OUT has no "
                           "suffix, another suffix such as .pdf or .svg picks that format)")
  parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
  parser.add_argument("--title", default=None, help="figure title")
  parser.add_argument("--smoothing", type=float, default=0.8,
                      help="EMA weight of the smoothed training loss, in [0, 1) (default: 0.8)")
  args = parser.parse_args(argv)
  if args.labels and len(args.labels) != len(args.run_dirs):
    print(f"error: --labels has {len(args.labels)} entries for {len(args.run_dirs)} runs",
          file=sys.stderr)
    return 2
  if not 0 <= args.smoothing < 1:
    print(f"error: --smoothing must be in [0, 1), got {args.smoothing}", file=sys.stderr)
    return 2
  try:
    path = plot(args.run_dirs, args.out, args.labels, args.title, args.smoothing)
  except (FileNotFoundError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # e.g. an image format matplotlib does not know
    print(f"error: --out {args.out}: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
