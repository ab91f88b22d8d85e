"""The tables of RESULTS.md §4f, rebuilt from the 60M run log.

Every 60M quality run (``benchmarks/quality.py --preset 60m``, one process per run) is recorded in
``benchmarks/data/quality-60m-runs.json``. This script turns that log into §4f's three tables, so
the published numbers can be checked against the runs (``tests/test_benchmarks.py`` does):

* each variant at its best lr: the lrs tried at seed 0, then every seed at the best one, with
  mean ± sample std of the final eval loss;
* paired differences at equal seeds (same initial parameters and data order for every optimizer),
  mean ± standard error;
* the rank sweep, OSD against GaLore, paired where both have the seed.

In RESULTS.md each table sits between ``<!-- begin quality_tables: NAME -->`` and
``<!-- end quality_tables -->``; ``--write`` replaces what is between them.

Example::

  python -m benchmarks.quality_tables            # prints the markdown tables
  python -m benchmarks.quality_tables --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import table

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                            "quality-60m-runs.json")
PAPER_RANK = 128  # the paper's rank for the 60M preset: the best-lr and paired tables use it

Run = dict[str, Any]


def _is(optimizer: str, alpha: float | None = None, gap: int | None = None
        ) -> Callable[[Run], bool]:
  def match(run: Run) -> bool:
    return (run["optimizer"] == optimizer and run["projector_lr_ratio"] == alpha
            and run["update_proj_gap"] == gap)
  return match


# (short name, table label, which runs belong to the variant)
VARIANTS: list[tuple[str, str, Callable[[Run], bool]]] = [
    ("adamw", "adamw", _is("adamw")),
    ("step-matched AdamW", "adamw, scale 0.125 on attention/MLP (step-matched)",
     _is("adamw (scale 0.125)")),
    ("GaLore T 200", "galore_adamw, T = 200 (the official period)", _is("galore_adamw")),
    ("GaLore T 50", "galore_adamw, T = 50", _is("galore_adamw", gap=50)),
    ("OSD α 2", "osd_adamw, α 2", _is("osd_adamw", alpha=2.0)),
    ("OSD α 5", "osd_adamw, α 5 (the trainer's default)", _is("osd_adamw", alpha=5.0)),
    ("OSD reference code", "osd_adamw, reference code (official choices, scale 0.25)",
     _is("osd_adamw (reference code)", alpha=5.0)),
    ("osd_lion", "osd_lion, α 5 (Lion lr = value/3)", _is("osd_lion", alpha=5.0)),
]

# (a, b): the table reports loss(a) − loss(b) at each seed both have at their best lr.
PAIRS: list[tuple[str, str]] = [
    ("OSD α 5", "GaLore T 200"),
    ("OSD α 5", "step-matched AdamW"),
    ("OSD α 5", "adamw"),
    ("GaLore T 200", "step-matched AdamW"),
    ("GaLore T 50", "OSD α 5"),
    ("GaLore T 50", "GaLore T 200"),
    ("OSD reference code", "OSD α 5"),
    ("OSD reference code", "GaLore T 200"),
    ("osd_lion", "OSD α 5"),
    ("osd_lion", "adamw"),
]


def load_runs(path: str = DEFAULT_DATA) -> list[Run]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)["runs"]


def lr_text(lr: float) -> str:
  """1e-3 style, as the tables write learning rates."""
  mantissa, exponent = f"{lr:.0e}".split("e")
  return f"{mantissa}e-{int(exponent[1:])}" if exponent.startswith("-") else f"{lr:g}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n − 1); std is nan for one value."""
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else math.nan
  return mean, std


def best_lr_runs(runs: list[Run]) -> dict[str, dict[str, Any]]:
  """Per variant (short name): the seed-0 lr sweep, the best lr, and its runs by seed (r = 128)."""
  out = {}
  for short, label, match in VARIANTS:
    mine = [r for r in runs if match(r) and r["rank"] == PAPER_RANK]
    if not mine:
      continue
    sweep = {r["lr"]: r["final_eval_loss"] for r in mine if r["seed"] == 0}
    best = min(sweep, key=sweep.get)
    by_seed = {r["seed"]: r for r in mine if r["lr"] == best}
    out[short] = {"label": label, "sweep": dict(sorted(sweep.items())), "best": best,
                  "by_seed": dict(sorted(by_seed.items()))}
  return out


def _seeds(best: dict[str, dict[str, Any]]) -> list[int]:
  return sorted({s for v in best.values() for s in v["by_seed"]})


def best_lr_table(best: dict[str, dict[str, Any]]) -> str:
  """``best``: what best_lr_runs gives."""
  seeds = _seeds(best)
  head = ["optimizer (60M, r = 128)", "lrs tried (seed 0)", "best lr",
          *[f"seed {s}" for s in seeds], "mean ± std", "eval ppl (mean)", "captured energy"]
  rows = []
  for v in best.values():
    tried = ", ".join(f"{lr_text(lr)} {loss:.4f}" for lr, loss in v["sweep"].items())
    losses = [r["final_eval_loss"] for r in v["by_seed"].values()]
    cells = [f"{v['by_seed'][s]['final_eval_loss']:.4f}" if s in v["by_seed"] else ""
             for s in seeds]
    mean, std = mean_std(losses)
    spread = f"{mean:.4f} ± {std:.4f}" if len(losses) > 1 else ""
    ppl = statistics.fmean(r["final_eval_perplexity"] for r in v["by_seed"].values())
    energies = [r["mean_captured_energy"] for r in v["by_seed"].values()
                if r["mean_captured_energy"] is not None]
    energy = f"{statistics.fmean(energies):.2f}" if energies else "–"
    rows.append([v["label"], tried, lr_text(v["best"]), *cells, spread, f"{ppl:.1f}", energy])
  return table(rows, head, pad=False)


def paired_difference(a: dict[int, Run], b: dict[int, Run]) -> tuple[dict[int, float], str]:
  """loss(a) − loss(b) per seed both have, and "mean ± standard error" (n − 1 std / √n)."""
  diffs = {s: a[s]["final_eval_loss"] - b[s]["final_eval_loss"] for s in sorted(a) if s in b}
  values = list(diffs.values())
  if len(values) > 1:
    mean, std = mean_std(values)
    return diffs, f"{mean:+.4f} ± {std / math.sqrt(len(values)):.4f}"
  return diffs, (f"{values[0]:+.4f} (one seed)" if values else "")


def paired_table(best: dict[str, dict[str, Any]]) -> str:
  """``best``: what best_lr_runs gives."""
  seeds = _seeds(best)
  head = ["comparison", *[f"seed {s}" for s in seeds], "mean ± s.e."]
  rows = []
  for a, b in PAIRS:
    if a not in best or b not in best:
      continue
    diffs, summary = paired_difference(best[a]["by_seed"], best[b]["by_seed"])
    cells = [f"{diffs[s]:+.4f}".replace("-", "−") if s in diffs else "" for s in seeds]
    rows.append([f"{a} − {b}", *cells, summary.replace("-", "−")])
  return table(rows, head, pad=False)


def _loss_text(side: dict[int, Run]) -> str:
  mean, std = mean_std([r["final_eval_loss"] for r in side.values()])
  return f"{mean:.4f}" + (f" ± {std:.4f}" if len(side) > 1 else "")


def _energy(side: dict[int, Run]) -> float:
  return statistics.fmean(r["mean_captured_energy"] for r in side.values())


def rank_table(runs: list[Run]) -> str:
  """OSD α 5 against GaLore T 200 at lr 3e-3 at each rank; paired over the seeds both ran."""
  matchers = {short: match for short, _, match in VARIANTS}
  osd, galore = matchers["OSD α 5"], matchers["GaLore T 200"]

  def at(match, rank):
    return {r["seed"]: r for r in runs if match(r) and r["rank"] == rank and r["lr"] == 3e-3}

  ranks = sorted({r["rank"] for r in runs if osd(r) or galore(r)})
  head = ["r", "seeds", "osd_adamw α 5", "galore_adamw T 200", "OSD − GaLore (mean ± s.e.)",
          "captured energy OSD / GaLore"]
  rows = []
  for rank in ranks:
    o, g = at(osd, rank), at(galore, rank)
    common = sorted(set(o) & set(g))
    if not common:
      continue
    o, g = {s: o[s] for s in common}, {s: g[s] for s in common}
    _, diff = paired_difference(o, g)
    rows.append([str(rank), ", ".join(map(str, common)), _loss_text(o), _loss_text(g),
                 diff.replace("-", "−"), f"{_energy(o):.2f} / {_energy(g):.2f}"])
  return table(rows, head, pad=False)


TABLE_NAMES = ("best lr", "paired", "rank sweep")


def tables(runs: list[Run]) -> dict[str, str]:
  """The three tables, by the names their markers in RESULTS.md use."""
  best = best_lr_runs(runs)
  return dict(zip(TABLE_NAMES, (best_lr_table(best), paired_table(best), rank_table(runs))))


def _marked(name: str) -> re.Pattern[str]:
  return re.compile(rf"(<!-- begin quality_tables: {re.escape(name)} -->\n)(.*?)(\n<!-- end "
                    r"quality_tables -->)", re.S)


def marked_tables(text: str) -> dict[str, str]:
  """The tables between the markers in a markdown text, by name."""
  return {name: m.group(2) for name in TABLE_NAMES if (m := _marked(name).search(text))}


def write_tables(path: str, new: dict[str, str]) -> None:
  """Replace every marked table in the markdown file at ``path`` with ``new`` (from tables())."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for name, body in new.items():
    text, found = _marked(name).subn(lambda m, t=body: m.group(1) + t + m.group(3), text)
    if found != 1:
      raise ValueError(f"{path} must hold the markers of the {name!r} table exactly once "
                       f"(found {found}): <!-- begin quality_tables: {name} --> ... "
                       "<!-- end quality_tables -->")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", default=DEFAULT_DATA, help="The run log (JSON with 'runs').")
  parser.add_argument("--write", metavar="MARKDOWN",
                      help="Replace the marked tables in this file (e.g. benchmarks/RESULTS.md).")
  args = parser.parse_args(argv)
  out = tables(load_runs(args.data))
  if args.write:
    write_tables(args.write, out)
  for name, body in out.items():
    print(f"### {name}\n\n{body}\n")
  return out


if __name__ == "__main__":
  main()
