"""A full train step (forward + backward + optimizer update) through the trainer's step function.

For each optimizer the trainer builds its mesh, model, optimizer and jitted, donated train step
(``train.trainer.build``) exactly as ``python -m train`` does; the step is fed a fixed batch of
random tokens (no data pipeline). Steps are timed interleaved across optimizers after the first
step (which holds OSD's projector initialisation and GaLore's first SVD; it is reported on its
own) and the warmup, and before GaLore's next refresh at step ``update_proj_gap``.

Reported per optimizer: median step time and its ratio to adamw, tokens/s, MFU (where the device's
peak is known; n/a on CPU), optimizer-state bytes, XLA's memory analysis of the compiled step
(arguments + outputs − aliased + temporaries, a compile-time peak estimate) and the runtime's peak
device memory where the backend reports it (process-wide; ``--isolate`` runs each optimizer in its
own process so that the figure is per optimizer). "kernel time" is the median system CPU time of a
step (on a CPU backend mostly page faults of the step's temporaries): a case slower by about its
excess kernel time is slowed by the process's memory, not by its program (benchmarks/RESULTS.md
§8); time such a case beside its baseline alone (e.g. ``--optimizers adamw,adamw+fused``).

Example::

  python -m benchmarks.step --preset tiny
  python -m benchmarks.step --preset 350m --batch-size 64 --seq-len 256 --isolate   # on a GPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from benchmarks import common

OPTIMIZERS = ("adamw", "osd_adamw", "galore_adamw")
BASELINE = "adamw"


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], preset="tiny", repeats=10, warmup=2)
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help="Comma-separated optimizers (train --optimizer names), each optionally "
                      "with variants: +fused (train --fused-update), +exactclip (fused, "
                      "--fused-clip exact), +bf16, +float8, +int8 (bf16 weights; 8-bit state), "
                      "+pada (--projector-optimizer adafactor), +rematfull (--remat full), e.g. "
                      "osd_adamw+int8+fused.")
  p.add_argument("--batch-size", type=int, default=16, help="Global batch in sequences.")
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--dtype", default=None,
                 help="Compute dtype (default: float32 on CPU, bfloat16 elsewhere).")
  p.add_argument("--num-devices", type=int, default=None,
                 help="Devices in the mesh (default: all).")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--update-proj-gap", type=int, default=200)
  p.add_argument("--projector-init", default="svd", choices=("svd", "randomized", "random"),
                 help="OSD's P0 (only the first, untimed step depends on it; 'randomized' keeps "
                      "the full SVD of every matrix out of a short GPU run).")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a model-config field, e.g. n_layers=2 (repeatable).")
  p.add_argument("--isolate", action="store_true",
                 help="Run each optimizer in its own process (per-optimizer runtime peak memory; "
                      "no interleaving).")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  if args.warmup + args.repeats + 1 >= args.update_proj_gap:
    p.error("--warmup + --repeats must stay below --update-proj-gap - 1 (so that no GaLore "
            "refresh is timed)")
  return args


#: ``--optimizers`` variants: the TrainConfig fields each ``+suffix`` sets.
VARIANTS = {"fused": {"fused_update": True},
            # --fused-update --fused-clip exact: clipped by this step's norm (a norm-only pass)
            "exactclip": {"fused_update": True, "fused_clip": "exact"},
            # P moved by Adafactor (train --projector-optimizer adafactor)
            "pada": {"projector_optimizer": "adafactor"},
            # compact precision (train --param-dtype bfloat16 --state-dtype ...)
            "bf16": {"param_dtype": "bfloat16"},
            "float8": {"param_dtype": "bfloat16", "state_dtype": "float8"},
            "int8": {"param_dtype": "bfloat16", "state_dtype": "int8"},
            # every block rematerialised (train --remat full; with +fused: a block by halves)
            "rematfull": {"remat": "full"}}


def _variant(name: str) -> tuple[str, dict]:
  """``"osd_adamw+fused"`` -> ``("osd_adamw", {"fused_update": True})``."""
  optimizer, *suffixes = name.split("+")
  fields = {}
  for suffix in suffixes:
    if suffix not in VARIANTS:
      raise SystemExit(f"--optimizers {name}: unknown variant +{suffix}; choose from "
                       f"{', '.join('+' + v for v in VARIANTS)}")
    fields.update(VARIANTS[suffix])
  return optimizer, fields


def train_config(args, name: str):
  from train.config import TrainConfig

  optimizer, fields = _variant(name)
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  return TrainConfig(
      **fields,
      preset=args.preset, optimizer=optimizer, rank=common.resolve_rank(args.preset, args.rank),
      lr=args.lr, steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, dtype=dtype,
      update_proj_gap=args.update_proj_gap, projector_init=args.projector_init, seed=args.seed,
      progress=False, tensorboard=False,
      model_overrides=common.parse_overrides(args.model_override))


class Case:
  """One optimizer's trainer setup, state and compiled step."""

  def __init__(self, args, optimizer: str, devices):
    import osd_jax
    from train import sharding as shd
    from train import trainer
    from train.config import validate
    from train.model import PRESETS

    self.name = optimizer
    cfg = train_config(args, optimizer)
    validate(cfg)
    vocab = int(dict(cfg.model_overrides).get("vocab_size", PRESETS[args.preset].vocab_size))
    self.setup = trainer.build(cfg, vocab, devices=devices)
    self.state = self.setup.init_state()
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, vocab, size=(args.batch_size, args.seq_len + 1), dtype=np.int32)
    sharding = shd.batch_sharding(self.setup.mesh)
    self.batch = {"inputs": jax.device_put(tokens[:, :-1], sharding),
                  "targets": jax.device_put(tokens[:, 1:], sharding)}
    t0 = time.perf_counter()
    self.compiled = self.setup.train_step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = common.memory_analysis(self.compiled)
    self.state_bytes = osd_jax.state_bytes(self.state.opt_state)
    self.param_bytes = osd_jax.state_bytes(self.state.params)
    self.tokens_per_step = args.batch_size * args.seq_len
    self.metrics = None
    t0 = time.perf_counter()
    self()  # step 0: projector init (OSD) / first SVD (GaLore)
    self.first_step_s = time.perf_counter() - t0

  def __call__(self) -> None:
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, self.metrics))


def _runtime_memory() -> dict[str, int] | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def measure(args) -> dict[str, Any]:
  """Builds every case in this process and times them interleaved."""
  devices = jax.devices()[: args.num_devices] if args.num_devices else None
  cases = {}
  for name in args.optimizers:
    common.log(f"step: building and compiling {name} ({args.preset})")
    cases[name] = Case(args, name, devices)
  for name, case in cases.items():
    common.log(f"step: warming up {name}")
    for _ in range(args.warmup):
      case()
  timings = common.interleaved(cases, args.repeats, warmup=0)
  out = {}
  for name, case in cases.items():
    from train.run import metrics as metrics_lib

    med = timings[name]["median_s"]
    tps = case.tokens_per_step / med
    mfu = metrics_lib.mfu(case.setup.flops_per_token, tps, case.setup.mesh.size)
    out[name] = {
        **timings[name],
        "first_step_s": case.first_step_s,
        "compile_s": case.compile_s,
        "tokens_per_step": case.tokens_per_step,
        "tokens_per_s": tps,
        "mfu": mfu,
        "flops_per_token": case.setup.flops_per_token,
        "state_bytes": case.state_bytes,
        "param_bytes": case.param_bytes,
        "memory_analysis": case.memory,
        "final_loss": float(case.metrics["loss"]),
        "devices": case.setup.mesh.size,
    }
  runtime = _runtime_memory()
  for entry in out.values():
    entry["runtime_memory_process"] = runtime
  return out


def measure_isolated(args, argv) -> dict[str, Any]:
  """Runs each optimizer in a subprocess (``--optimizers X``) and merges the results."""
  out = {}
  for name in args.optimizers:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "step.json")
      child = _strip_flags(argv, ("--optimizers", "--out", "--isolate"))
      cmd = [sys.executable, "-m", "benchmarks.step", *child, "--optimizers", name, "--out", path,
             "--quiet"]
      common.log(f"step: {' '.join(cmd[1:])}")
      subprocess.run(cmd, check=True, cwd=common.REPO_ROOT)
      with open(path, encoding="utf-8") as f:
        res = json.load(f)["optimizers"][name]
    res["runtime_memory_per_optimizer"] = res.pop("runtime_memory_process", None)
    out[name] = res
  return out


def _strip_flags(argv, flags) -> list[str]:
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
      continue
    if a in flags:
      skip = a != "--isolate"
      continue
    if any(a.startswith(f + "=") for f in flags):
      continue
    out.append(a)
  return out


def run(args, argv) -> dict:
  res = measure_isolated(args, argv) if args.isolate else measure(args)
  base = res.get(BASELINE, {})
  rows = []
  for name, r in res.items():
    r["vs_adamw"] = common.ratio(r["median_s"], base.get("median_s"))
    plain = res.get(name.split("+")[0]) if "+" in name else None  # the same without variants
    r["vs_plain"] = None if plain is None else common.ratio(r["median_s"], plain["median_s"])
    r["state_bytes_vs_adamw"] = common.ratio(r["state_bytes"], base.get("state_bytes"))
    mem = r.get("memory_analysis") or {}
    base_mem = (base.get("memory_analysis") or {}).get("peak_estimate_bytes")
    r["peak_estimate_minus_adamw_bytes"] = (None if base_mem is None or not mem else
                                            mem["peak_estimate_bytes"] - base_mem)
    r["state_minus_adamw_bytes"] = (None if not base else r["state_bytes"] - base["state_bytes"])
    rt = r.get("runtime_memory_per_optimizer") or {}
    rows.append([
        name, common.fmt_seconds(r["median_s"]), common.fmt_seconds(r["min_s"]),
        common.fmt_ratio(r["vs_adamw"]), common.fmt_ratio(r["vs_plain"]),
        f"{r['tokens_per_s']:,.0f}",
        "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        common.fmt_seconds(r.get("system_s_median")),
        common.fmt_seconds(r["first_step_s"]), common.fmt_bytes(r["state_bytes"]),
        common.fmt_bytes(mem.get("peak_estimate_bytes")),
        common.fmt_bytes(rt.get("peak_bytes_in_use")) if rt else "–",
    ])
  header = ["optimizer", "median step", "min", "vs adamw", "vs no variant", "tokens/s", "MFU",
            "kernel time", "first step", "opt state", "XLA peak est.", "runtime peak"]
  return {
      "benchmark": "step",
      "preset": args.preset,
      "rank": common.resolve_rank(args.preset, args.rank),
      "batch_size": args.batch_size,
      "seq_len": args.seq_len,
      "dtype": train_config(args, BASELINE).dtype,
      "repeats": args.repeats,
      "warmup": args.warmup,
      "isolate": args.isolate,
      "optimizers": res,
      "table": common.table(rows, header),
  }


def main(argv=None) -> dict:
  return common.cli_main(
      "step", argv, parse_args, run, heading=lambda args, result, env: (
          f"Full train step — preset {args.preset}, rank {result['rank']}, batch "
          f"{args.batch_size}×{args.seq_len}, {result['dtype']}, {common.describe_machine(env)}, "
          f"jax {env['versions']['jax']}"))


if __name__ == "__main__":
  main()
