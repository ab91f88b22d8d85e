"""XLA's memory analysis of the trainer's real train step, compiled on abstract inputs.

The step is built exactly as ``python -m train`` builds it (``train.trainer.build``: mesh, model,
optimizer, shardings, the jitted and donated train step) and lowered on ``jax.ShapeDtypeStruct``
inputs that carry their shardings (params and optimizer state come from ``jax.eval_shape``), so
nothing is allocated: a 7B step compiles on a laptop CPU. Reported (bytes, per device):

* ``argument``: every input buffer (train state + batch);
* ``output``: every output buffer (new train state + metrics);
* ``alias``: outputs that reuse a donated input buffer (the whole train state when donation works);
* ``temp``: XLA's temporaries (gradients, activations kept for the backward pass, workspace);
* ``peak_estimate = argument + output - alias + temp``: what must fit in device memory at once
  (XLA's buffer assignment already overlaps temporaries whose live ranges do not intersect).
  Where the backend reports its own ``peak_memory_in_bytes`` it is recorded as well
  (``xla_peak_bytes``); the formula is used for every comparison so that backends agree.

Plus the compile time (lowering and XLA compilation, separately), the number of ``conditional``
ops in the compiled program and the host's peak RSS. On a CPU backend the figures describe the
CPU program, which differs from a GPU's: XLA:CPU computes 16-bit dots in float32, and its layouts
and fusions are its own. ``--target h100`` (or ``h200``) compiles the same step for that GPU
without one (:mod:`benchmarks.gpu_targets`: XLA:GPU's program and buffer assignment; needs the
CUDA PJRT plugin installed): the figure to read for a GPU (benchmarks/RESULTS.md §9). There the
fused step with remat full keeps its saved block inputs in host memory by default
(``--offload-residuals``; ``--config offload_residuals=false`` keeps them on the device), which
the peak does not count: its "fused" column then reads ``offloaded``.

With comma-separated ``--preset``, ``--rank`` and ``--shape`` (``BATCHxSEQ``) and
``--fused-update both`` it compiles every combination (adamw once per preset and shape: it has
no rank) and adds a breakdown: ``gradient_bytes``, the gradients that the step holds at once
by construction (the whole tree unfused; one block's plus the embedding's, final norm's and
head's fused), and ``activations_bytes`` = temporaries − gradients (activations, the loss, the
optimizer's workspace).

Example::

  python -m benchmarks.memory --preset 7b --optimizer osd_adamw --rank 512 --batch-size 2 \\
      --seq-len 1024 --out /tmp/memory-7b.json
  python -m benchmarks.memory --preset 7b,1b --rank 512,1024 --shape 2x1024,16x256 \\
      --optimizer adamw,osd_adamw,galore_adamw --remat full --fused-update both
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common

GiB = 2**30


def parse_args(argv):
  from train.config import OPTIMIZERS
  from train.model import PRESETS

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="7b",
                 help=f"Model preset, or several comma-separated ({', '.join(PRESETS)}).")
  p.add_argument("--optimizer", default="osd_adamw",
                 help=f"Comma-separated train --optimizer names ({', '.join(OPTIMIZERS)}).")
  p.add_argument("--rank", default=None,
                 help=f"Subspace rank r, or several comma-separated (default: per preset, "
                      f"{common.DEFAULT_RANK}).")
  p.add_argument("--batch-size", type=int, default=2, help="Global batch in sequences.")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--shape", default=None,
                 help="BATCHxSEQ, or several comma-separated (default: --batch-size x --seq-len).")
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--dtype", default="bfloat16", help="Compute dtype.")
  p.add_argument("--param-dtype", default="float32", help="Master-weight dtype.")
  p.add_argument("--state-dtype", default=None,
                 help="Optimizer-moment dtype (train --state-dtype: float32, bfloat16, int8, "
                      "float8; default: --param-dtype's).")
  p.add_argument("--loss-chunk", type=int, default=None,
                 help="train --loss-chunk (default: the trainer's, by preset).")
  p.add_argument("--remat", default=None,
                 help="Rematerialisation policy (train --remat; default: the trainer's).")
  p.add_argument("--no-scan-layers", action="store_true",
                 help="Unrolled layers (train --no-scan-layers).")
  p.add_argument("--fused-update", nargs="?", const="on", default="off",
                 choices=("off", "on", "both"),
                 help="Each block's update inside the backward pass (train --fused-update); "
                      "'both' compiles each cell with and without it.")
  p.add_argument("--cpu-bf16-as", default="float16", choices=("float16", "bfloat16"),
                 help="On a CPU backend, compile bfloat16 params and activations as this type. "
                      "float16 (same width, native in XLA:CPU) gives the figure a GPU's native "
                      "bfloat16 would: XLA:CPU widens bfloat16 slices, updates and dot operands "
                      "to float32 and hoists whole widened stacks out of the layer loop. "
                      "bfloat16: the CPU program's own figure.")
  p.add_argument("--target", default="local", choices=("local", "h100", "h200"),
                 help="Compile for this backend: 'local' (the default backend here) or a GPU "
                      "that need not be present (benchmarks/gpu_targets.py: XLA:GPU's program "
                      "and buffer assignment; needs jax-cuda12-plugin).")
  p.add_argument("--target-memory", type=float, default=None, metavar="GIB",
                 help="With a GPU --target: tell XLA the device has this much memory (GiB, "
                      "e.g. 22.35 for a 24 GB card); its scheduler keeps the program within "
                      "it (default: the card's own).")
  p.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1", help="train --mesh.")
  p.add_argument("--num-devices", type=int, default=1,
                 help="Devices in the mesh (default 1: the single-device figure).")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a model-config field, e.g. n_layers=2 (repeatable).")
  p.add_argument("--config", action="append", default=[], metavar="FIELD=VALUE",
                 help="Any other TrainConfig field, e.g. projector_init=randomized "
                      "(repeatable).")
  p.add_argument("--out", default=None, help="JSON output path.")
  p.add_argument("--quiet", action="store_true", help="Do not print the table.")
  args = p.parse_args(argv)
  args.optimizers = [o.strip() for o in args.optimizer.split(",") if o.strip()]
  bad = [o for o in args.optimizers if o not in OPTIMIZERS]
  if bad:
    p.error(f"--optimizer {','.join(bad)}: choose from {', '.join(OPTIMIZERS)}")
  args.presets = [x.strip() for x in args.preset.split(",") if x.strip()]
  bad = [x for x in args.presets if x not in PRESETS]
  if bad:
    p.error(f"--preset {','.join(bad)}: choose from {', '.join(PRESETS)}")
  args.ranks = [None] if args.rank is None else [int(x) for x in str(args.rank).split(",")]
  shapes = args.shape or f"{args.batch_size}x{args.seq_len}"
  try:
    args.shapes = [tuple(int(v) for v in x.lower().split("x")) for x in shapes.split(",")]
  except ValueError:
    p.error(f"--shape {shapes}: give BATCHxSEQ, e.g. 16x256")
  args.fused = {"off": [False], "on": [True], "both": [False, True]}[args.fused_update]
  if args.target_memory is not None and (args.target == "local" or args.target_memory <= 0):
    p.error("--target-memory: give a positive size in GiB, with a GPU --target (h100, h200)")
  return args


def train_config(args, optimizer: str):
  """The TrainConfig of ``python -m train`` with these flags."""
  from train.config import TrainConfig

  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  extra = {}
  if args.remat is not None:
    if "remat" not in fields:
      raise SystemExit("--remat: this version of the trainer has no remat option")
    extra["remat"] = args.remat
  if args.no_scan_layers:
    if "scan_layers" not in fields:
      raise SystemExit("--no-scan-layers: this version of the trainer always unrolls its layers")
    extra["scan_layers"] = False
  if getattr(args, "fused", False) is True:
    if "fused_update" not in fields:
      raise SystemExit("--fused-update: this version of the trainer has no fused update")
    extra["fused_update"] = True
  dtype, param_dtype, state_dtype = args.dtype, args.param_dtype, args.state_dtype
  if stand_in(args) != "bfloat16":  # the weights' and activations' bfloat16 (not the moments')
    dtype, param_dtype = (stand_in(args) if d == "bfloat16" else d for d in (dtype, param_dtype))
  for item in args.config:
    key, sep, value = item.partition("=")
    if not sep or key not in fields:
      raise SystemExit(f"--config {item}: give FIELD=VALUE with a TrainConfig field")
    extra[key] = common.parse_overrides([item])[key]
  return TrainConfig(
      preset=args.preset, optimizer=optimizer, rank=common.resolve_rank(args.preset, args.rank),
      steps=10_000, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
      dtype=dtype, param_dtype=param_dtype, state_dtype=state_dtype,
      loss_chunk=args.loss_chunk, mesh=args.mesh, progress=False,
      tensorboard=False, model_overrides=common.parse_overrides(args.model_override), **extra)


def stand_in(args) -> str:
  """The type bfloat16 params and activations compile as (``--cpu-bf16-as`` on a CPU backend).

  XLA:CPU has no native bfloat16 for dots, dynamic slices and dynamic updates: its
  float-normalization pass computes them in float32, so a scanned layer loop reads its bfloat16
  stacks through a float32 conversion of the whole stack (which loop-invariant code motion
  materialises) and writes a layer's new weights by rewriting a float32 copy of the stack. A GPU
  runs all three in bfloat16. float16 has bfloat16's width and XLA:CPU's native support, so
  its program allocates what the GPU's would (benchmarks/RESULTS.md §9)."""
  on_cpu = args.target == "local" and jax.default_backend() == "cpu"
  return args.cpu_bf16_as if on_cpu else "bfloat16"


def target_devices(args) -> list | None:
  """The mesh's devices: the local ones, or compile-only devices of ``--target``'s GPU."""
  if args.target != "local":
    from benchmarks import gpu_targets

    memory = int(args.target_memory * 2**30) if args.target_memory else None
    return gpu_targets.devices(args.target, args.num_devices or 1, memory)
  return jax.devices()[: args.num_devices] if args.num_devices else None


def abstract_batch(setup, batch_size: int, seq_len: int) -> dict:
  from train import sharding as shd

  sharding = shd.batch_sharding(setup.mesh)
  spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
  return {"inputs": spec, "targets": spec}


def count_ops(hlo_text: str, op: str) -> int:
  """Instructions ``op`` in an HLO module's text (``%x = type conditional(...)``)."""
  return len(re.findall(rf"\s{re.escape(op)}\(", hlo_text))


def measure(args, optimizer: str) -> dict[str, Any]:
  """Builds the trainer's step for ``optimizer`` and compiles it on abstract inputs."""
  import osd_jax
  from train import trainer
  from train.config import validate
  from train.model import PRESETS

  cfg = train_config(args, optimizer)
  validate(cfg)
  vocab = int(dict(cfg.model_overrides).get("vocab_size", PRESETS[args.preset].vocab_size))
  devices = target_devices(args)
  t0 = time.perf_counter()
  setup = trainer.build(cfg, vocab, devices=devices)
  build_s = time.perf_counter() - t0
  batch = abstract_batch(setup, args.batch_size, args.seq_len)
  t0 = time.perf_counter()
  lowered = setup.train_step.lower(setup.abstract_state, batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = common.memory_analysis(compiled)
  text = compiled.as_text() or ""
  state = setup.abstract_state
  n_dev = setup.mesh.size
  return {
      "optimizer": optimizer,
      "rank": cfg.rank,
      "config": {k: v for k, v in cfg.to_dict().items()
                 if k in ("preset", "dtype", "param_dtype", "state_dtype", "loss_chunk",
                          *(c.partition("=")[0] for c in args.config),
                          "batch_size", "seq_len", "grad_accum", "mesh", "remat", "scan_layers",
                          "model_overrides", "fused_update")},
      "devices": n_dev,
      "target": args.target,
      "target_memory_gib": args.target_memory,
      "device_kind": setup.mesh.devices.flat[0].device_kind,
      # host memory is not in the peak: say when the residuals are there (--offload-residuals)
      "offload_residuals": setup.offload_residuals,
      "bfloat16_compiled_as": stand_in(args),
      "param_bytes": osd_jax.state_bytes(state.params),
      "opt_state_bytes": osd_jax.state_bytes(state.opt_state),
      "n_params": common.tree_size(state.params),
      "memory": mem,
      "gradient_bytes": gradient_bytes(state.params, cfg.fused_update),
      "activations_bytes": (None if not mem else
                            mem["temp_size_in_bytes"]
                            - gradient_bytes(state.params, cfg.fused_update)),
      "build_s": build_s,
      "lower_s": lower_s,
      "compile_s": compile_s,
      "conditionals": count_ops(text, "conditional"),
      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def gradient_bytes(abstract_params, fused: bool) -> int:
  """Bytes of the gradients the step holds at once, by construction: every param's (in its
  dtype) unfused; one block's (a slice of the ``layers`` stack) plus the other params' fused."""
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    size = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    stacked = getattr(path[0], "key", None) == "layers"
    total += size // x.shape[0] if fused and stacked else size
  return total


def _gib(n: int | None) -> str:
  return "–" if n is None else f"{n / GiB:,.2f}"


def cells(args):
  """Every (preset, rank, batch, seq, fused, optimizer) to compile; adamw and lion once per
  preset and shape (they have no rank)."""
  for preset in args.presets:
    for batch, seq in args.shapes:
      for fused in args.fused:
        for name in args.optimizers:
          for rank in ([None] if name in ("adamw", "lion") else args.ranks):
            yield argparse.Namespace(**{**vars(args), "preset": preset, "rank": rank,
                                        "batch_size": batch, "seq_len": seq, "fused": fused}), name


def run(args) -> dict:
  results = []
  for cell, name in cells(args):
    common.log(f"memory: compiling the {cell.preset} {name} train step (batch "
               f"{cell.batch_size}×{cell.seq_len}{', fused' if cell.fused else ''}) on abstract "
               f"inputs")
    r = measure(cell, name)
    r.update(preset=cell.preset, batch_size=cell.batch_size, seq_len=cell.seq_len,
             fused_update=cell.fused)
    results.append(r)
  rows = []
  for r in results:
    m = r["memory"] or {}
    rows.append([r["preset"], f"{r['batch_size']}×{r['seq_len']}", r["optimizer"],
                 r["rank"] if r["optimizer"] not in ("adamw", "lion") else "–",
                 ("offloaded" if r["offload_residuals"] else "yes") if r["fused_update"]
                 else "no",
                 _gib(r["param_bytes"]), _gib(r["opt_state_bytes"]),
                 _gib(r["gradient_bytes"]), _gib(r["activations_bytes"]),
                 _gib(m.get("temp_size_in_bytes")), _gib(m.get("peak_estimate_bytes")),
                 f"{r['compile_s']:.1f}", r["conditionals"]])
  header = ["preset", "batch", "optimizer", "r", "fused", "params GiB", "opt state GiB",
            "gradients", "activations etc.", "temps", "peak est.", "compile s", "conditionals"]
  by_name = {r["optimizer"]: r for r in results}
  return {
      "benchmark": "memory",
      # one cell per optimizer (a single preset, shape, rank and mode): keyed by its name too
      "optimizers": by_name if len(by_name) == len(results) else None,
      "presets": args.presets,
      "shapes": args.shapes,
      "peak_formula": "argument + output - alias + temp (bytes per device)",
      "gradient_formula": "the whole gradient tree unfused; one block's + the rest's fused "
                          "(closed form); activations = temp - gradients",
      "cells": results,
      "table": common.table(rows, header),
  }


def main(argv=None) -> dict:
  return common.cli_main(
      "memory", argv, parse_args, lambda args, _: run(args),
      path_note="GiB = 2^30 bytes; JSON: {path}",
      heading=lambda args, result, env: (
          f"Train-step memory (XLA, compiled on abstract inputs) — {args.dtype} compute, "
          f"{args.param_dtype} master, {env['platform']} backend, jax {env['versions']['jax']}"))


if __name__ == "__main__":
  main()
