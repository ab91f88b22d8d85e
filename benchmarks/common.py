"""Shared benchmark utilities: model shapes, timing, statistics, tables and JSON output.

Timing discipline (the machines these run on are often shared):

* every case is compiled and run ``warmup`` times before it is timed;
* every timed call ends with ``jax.block_until_ready`` on its outputs;
* cases that are compared are timed in the same process, interleaved round by round with the order
  rotated each round, so that a slow spell of the machine hits all of them alike;
* results are reported as median / min / max over the rounds and as ratios of medians against a
  baseline measured in the same run.

Nothing here imports grain or tensorflow-datasets (the GPU machine has neither).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Presets the scripts accept (shapes from ``train.model.PRESETS``).
PRESET_NAMES = ("tiny", "60m", "130m", "350m", "1b")

#: Subspace rank per preset, as in the GaLore/OSD papers (tiny: a CPU demo value).
DEFAULT_RANK = {"tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- argparse


def base_parser(description: str, *, preset: str = "60m", repeats: int = 10,
                warmup: int = 2) -> argparse.ArgumentParser:
  """An ``argparse`` parser with the flags every script shares."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default=preset, choices=PRESET_NAMES,
                 help="LLaMA preset whose shapes are used (train.model.PRESETS).")
  p.add_argument("--rank", type=int, default=None,
                 help="Subspace rank r (default: the paper's rank for the preset, "
                      f"{DEFAULT_RANK}).")
  p.add_argument("--repeats", type=int, default=repeats, help="Timed rounds per case.")
  p.add_argument("--warmup", type=int, default=warmup,
                 help="Untimed calls per case after compilation.")
  p.add_argument("--out", default=None,
                 help="JSON output path (default: $OUT/<script>-<preset>.json if $OUT is set, "
                      "else benchmarks/out/<script>-<preset>.json).")
  p.add_argument("--quiet", action="store_true", help="Do not print the table.")
  return p


_WORDS = {"true": True, "false": False, "none": None}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """``["n_layers=2", "dim=64", "scan_layers=false"]`` -> ``{"n_layers": 2, "dim": 64,
  "scan_layers": False}`` (true/false and none in any case, ints, floats, else strings)."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"bad --model-override {item!r}; use KEY=VALUE, e.g. n_layers=2")
    if value.lower() in _WORDS:  # "false" must not reach a flag as a (truthy) string
      out[key] = _WORDS[value.lower()]
      continue
    for cast in (int, float):
      try:
        out[key] = cast(value)
        break
      except ValueError:
        continue
    else:
      out[key] = value
  return out


def resolve_rank(preset: str, rank: int | None) -> int:
  return DEFAULT_RANK[preset] if rank is None else int(rank)


def default_out_path(script: str, preset: str, suffix: str = ".json") -> str:
  """``$OUT/<script>-<preset>.json`` when ``$OUT`` is set, else under ``benchmarks/out/``."""
  root = os.environ.get("OUT") or os.path.join(REPO_ROOT, "benchmarks", "out")
  return os.path.join(root, f"{script}-{preset}{suffix}")


def cli_main(script: str, argv: Sequence[str] | None, parse_args: Callable[[list[str]], Any],
             run: Callable[[Any, list[str]], dict[str, Any]], *,
             heading: Callable[[Any, dict[str, Any], dict[str, Any]], str],
             notes: Callable[[dict[str, Any]], Sequence[str]] | None = None,
             out_preset: Callable[[Any], str] = lambda args: args.preset,
             path_note: str = "JSON: {path}") -> dict[str, Any]:
  """A benchmark script's ``main``: parses ``argv`` (default: the command line), runs
  ``run(args, argv)``, writes its result as JSON (``--out``, else :func:`default_out_path` of
  ``script`` and ``out_preset(args)``) and, unless ``--quiet``, prints ``heading(args, result,
  environment())``, ``result["table"]``, the lines of ``notes(result)`` and ``(path_note)``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  result = run(args, argv)
  path = args.out or default_out_path(script, out_preset(args))
  write_json(path, result)
  if not args.quiet:
    env = environment()
    print("\n" + heading(args, result, env))
    print(result["table"])
    for line in notes(result) if notes else ():
      print(line)
    print(f"({path_note.format(path=path)})")
  return result


# ----------------------------------------------------------------------------- model shapes


def model_config(preset: str, **overrides: Any):
  """The ``train.model.LlamaConfig`` of ``preset`` (float32 master weights)."""
  from train.model import get_config

  return get_config(preset, **overrides)


def abstract_params(preset: str, dtype: Any = jnp.float32, **overrides: Any) -> dict:
  """The preset's parameter tree as ``jax.ShapeDtypeStruct`` leaves (nothing is allocated)."""
  from flax import nnx

  from train.model import Llama

  # one leaf per layer and matrix (unrolled), the tree the update benchmarks have always measured;
  # scan_layers=True gives the trainer's default stacked tree
  overrides.setdefault("scan_layers", False)
  cfg = model_config(preset, param_dtype=jnp.dtype(dtype).name, **overrides)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)


def random_tree(abstract: Any, seed: int = 0, std: float = 0.02) -> Any:
  """Gaussian arrays (``std``) of the shapes and dtypes of ``abstract``, generated on device."""
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))

  @jax.jit
  def make(keys):
    return [std * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            for k, x in zip(keys, leaves)]

  return jax.tree.unflatten(treedef, make(keys))


def tree_size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- timing


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def stats(times: Sequence[float]) -> dict[str, Any]:
  """Median / min / max / mean / stdev (seconds) of a list of timings, plus the raw list."""
  ts = [float(t) for t in times]
  return {
      "median_s": statistics.median(ts),
      "min_s": min(ts),
      "max_s": max(ts),
      "mean_s": statistics.fmean(ts),
      "stdev_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
      "n": len(ts),
      "times_s": ts,
  }


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                repeats_for: dict[str, int] | None = None,
                progress: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
  """Times every case round by round: each round calls every case once, in a rotated order.

  ``cases`` maps a name to a zero-argument callable that does one unit of work and blocks on it.
  ``repeats_for`` caps the number of rounds of slow cases (e.g. an SVD step). Returns ``stats`` per
  name.
  """
  names = list(cases)
  repeats_for = repeats_for or {}
  for name in names:
    if progress:
      progress(f"warming up {name}")
    for _ in range(warmup):
      cases[name]()
  times: dict[str, list[float]] = {n: [] for n in names}
  kernel: dict[str, list[tuple[float, int]]] = {n: [] for n in names}
  for i in range(repeats):
    order = names[i % len(names):] + names[:i % len(names)]
    for name in order:
      if len(times[name]) >= repeats_for.get(name, repeats):
        continue
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      t0 = time.perf_counter()
      cases[name]()
      times[name].append(time.perf_counter() - t0)
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      kernel[name].append((r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
  return {n: {**stats(t), **kernel_stats(kernel[n])} for n, t in times.items()}


def kernel_stats(samples: Sequence[tuple[float, int]]) -> dict[str, Any]:
  """Medians of the process's kernel (system) CPU seconds and minor page faults per call.

  On a CPU backend a step page-faults its temporaries in on every call (≈ their size in 4 KiB
  pages). The same program's same faults can cost 3× the kernel time in one process as in
  another (benchmarks/RESULTS.md §8): where two cases' step times differ by about their kernel
  times, the process's memory explains it, not the programs.
  """
  if not samples:
    return {}
  return {"system_s_median": statistics.median(s for s, _ in samples),
          "minor_faults_median": statistics.median(f for _, f in samples)}


def ratio(a: float | None, b: float | None) -> float | None:
  if a is None or b is None or b == 0:
    return None
  return a / b


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
  try:
    from importlib import metadata

    return metadata.version(module)
  except Exception:  # noqa: BLE001 - not installed
    return None


def git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True, timeout=5)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "osd_jax", "train",
                            "benchmarks"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=5, check=False).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")
  except Exception:  # noqa: BLE001 - not a git checkout
    return None


def environment() -> dict[str, Any]:
  """Device, host, versions and date, recorded with every result."""
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "platform": dev.platform,
      "device_kind": getattr(dev, "device_kind", str(dev)),
      "device_count": jax.device_count(),
      "cpu_model": cpu_model(),
      "cpu_count": os.cpu_count(),
      "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "python": platform.python_version(),
      "versions": {m: _version(m) for m in ("jax", "jaxlib", "optax", "flax", "numpy",
                                            "osd_jax")},
      "git_commit": git_commit(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
      "argv": sys.argv,
  }


def describe_machine(env: dict[str, Any]) -> str:
  if env["platform"] == "cpu":
    return f"{env['cpu_count']}-core CPU ({env['cpu_model']})"
  return f"{env['device_count']}x {env['device_kind']}"


def write_json(path: str, payload: dict[str, Any]) -> str:
  """Writes ``payload`` plus ``environment()`` to ``path`` (directories created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  data = {"environment": environment(), **payload}
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, default=_json_default)
    f.write("\n")
  return path


def _json_default(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


# ----------------------------------------------------------------------------- tables


def fmt_seconds(s: float | None) -> str:
  if s is None or (isinstance(s, float) and math.isnan(s)):
    return "–"
  if s >= 1.0:
    return f"{s:,.3f} s"
  if s >= 1e-3:
    return f"{s * 1e3:,.2f} ms"
  return f"{s * 1e6:,.1f} µs"


def fmt_ratio(r: float | None) -> str:
  if r is None:
    return "–"
  if r >= 100:
    return f"{r:,.0f}×"
  return f"{r:.2f}×"


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "–"
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:,.1f} {unit}"
  return f"{n} B"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], *, pad: bool = True) -> str:
  """A Markdown table; ``pad`` aligns the columns for plain text, ``pad=False`` keeps each cell
  as short as it is (for tables kept in a markdown file)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) if pad else 0 for i in range(len(header))]

  def line(r):
    return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

  sep = "|" + "|".join("-" * (max(w, 1) + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def memory_analysis(compiled) -> dict[str, int] | None:
  """XLA's sizes (bytes) and ``peak_estimate_bytes = argument + output - alias + temp``."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes",
            "host_temp_size_in_bytes")  # host memory (offloaded buffers): not in the peak
  out = {f: int(getattr(m, f, 0) or 0) for f in fields}
  out["peak_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  peak = getattr(m, "peak_memory_in_bytes", None)
  out["xla_peak_bytes"] = int(peak) if peak else None
  return out
