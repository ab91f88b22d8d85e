"""What a sharded step compiles to: conditionals, thunks, decompositions and collectives.

Nothing is run or allocated: each case is compiled on abstract inputs and its optimized HLO is read
with :mod:`benchmarks.hlo`. Two programs per optimizer:

* ``update``: ``tx.update`` + ``optax.apply_updates`` alone, on the preset's parameter tree
  sharded as the trainer shards it (``train.sharding.param_specs``), gradients sharded like the
  params and the optimizer state by ``osd_jax.optimizer_state_sharding``;
* ``step``: the trainer's jitted train step (``train.trainer.build``), forward and backward
  included (``--no-step`` skips it; it takes minutes to compile at 60M on a small CPU).

For each program it reports the ``conditional`` ops, the thunks (non-trivial ops outside fusions)
and the collectives, both over the whole program and over its steady-state path (every
conditional branch holding an SVD/QR/eigh left out: the projector refresh, taken at t = 0 or every
T steps). Run it on fake CPU devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m benchmarks.collectives --preset 60m --mesh data=1,fsdp=8,tensor=1
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import osd_jax  # noqa: E402
from benchmarks import common, hlo  # noqa: E402
from benchmarks import update as update_bench  # noqa: E402

OPTIMIZERS = ("adamw", "osd_adamw", "osd_lion", "galore_adamw")
MiB = 2**20


def analyse(text: str) -> dict[str, Any]:
  """Counts of one compiled program (see the module docstring)."""
  module = hlo.parse(text)
  refresh = hlo.refresh_branches(module)
  steady = hlo.reachable(module, skip=refresh)
  return {
      "conditionals": len(hlo.conditionals(module)),
      "conditionals_steady": len(hlo.conditionals(module, steady)),
      "thunks": hlo.thunks(module),
      "thunks_steady": hlo.thunks(module, steady),
      "decompositions": len(hlo.decompositions(module)),
      "decompositions_steady": len(hlo.decompositions(module, steady)),
      "collectives": hlo.collective_summary(module),
      "collectives_steady": hlo.collective_summary(module, steady),
      "largest_all_gather_steady": max(
          (i.bytes for i in hlo.collectives(module, steady)["all-gather"]), default=0),
  }


def update_program(family: str, mesh, abstract: Any, param_specs: Any, rank: int) -> str:
  """Compiled text of ``tx.update`` + ``apply_updates`` on the sharded tree."""
  from jax.sharding import NamedSharding

  tx = update_bench.make_optimizer(family, abstract, rank)
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs,
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = jax.eval_shape(tx.init, abstract)
  state_sh = osd_jax.optimizer_state_sharding(shapes, param_sh)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(step, in_shardings=(param_sh, state_sh, param_sh),
                   out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
  return jitted.lower(abstract, shapes, abstract).compile().as_text()


def step_program(family: str, args, devices) -> str:
  """Compiled text of the trainer's train step (abstract state and batch)."""
  from jax.sharding import NamedSharding

  from train import sharding as shd
  from train import trainer
  from train.config import TrainConfig, validate
  from train.model import PRESETS

  overrides = common.parse_overrides(args.model_override)
  cfg = TrainConfig(preset=args.preset, optimizer=family, rank=args.rank, lr=1e-3, steps=1000,
                    batch_size=args.batch_size, seq_len=args.seq_len, dtype="float32",
                    mesh=args.mesh, progress=False, tensorboard=False, model_overrides=overrides)
  validate(cfg)
  vocab = int(overrides.get("vocab_size", PRESETS[args.preset].vocab_size))
  setup = trainer.build(cfg, vocab, devices=devices)
  batch_sh = shd.batch_sharding(setup.mesh)
  assert isinstance(batch_sh, NamedSharding)
  tokens = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32, sharding=batch_sh)
  batch = {"inputs": tokens, "targets": tokens}
  return setup.train_step.lower(setup.abstract_state, batch).compile().as_text()


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], preset="60m", repeats=0, warmup=0)
  p.add_argument("--mesh", default="data=1,fsdp=8,tensor=1",
                 help="The trainer's --mesh (AXIS=SIZE for data, fsdp, tensor).")
  p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                 help=f"Comma-separated, from: {', '.join(OPTIMIZERS)}.")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--no-step", action="store_true", help="Only the update, not the train step.")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a model-config field, e.g. n_layers=2 (repeatable).")
  p.add_argument("--dump", default=None, help="Directory to write each program's HLO text to.")
  args = p.parse_args(argv)
  args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
  for o in args.optimizers:
    if o not in OPTIMIZERS:
      p.error(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
  args.rank = common.resolve_rank(args.preset, args.rank)
  return args


def run(args) -> dict:
  from train import sharding as shd
  from train.model import Llama

  devices = jax.devices()
  mesh = shd.make_mesh(args.mesh, devices)
  from flax import nnx

  overrides = common.parse_overrides(args.model_override)
  # the update program's tree is unrolled, as common.abstract_params makes it
  cfg = common.model_config(args.preset, **{"scan_layers": False, **overrides})

  abstract_model = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  _, abs_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  param_specs = shd.param_specs(abs_params, mesh)
  abstract = common.abstract_params(args.preset, **overrides)
  results = []
  for family in args.optimizers:
    for program in ("update",) + (() if args.no_step else ("step",)):
      common.log(f"collectives: compiling the {program} of {family} ({args.preset}, "
                 f"mesh {args.mesh})")
      t0 = time.perf_counter()
      if program == "update":
        text = update_program(family, mesh, abstract, param_specs, args.rank)
      else:
        text = step_program(family, args, devices)
      row = {"optimizer": family, "program": program,
             "compile_s": round(time.perf_counter() - t0, 1), **analyse(text)}
      results.append(row)
      if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, f"{program}-{family}.hlo.txt"), "w") as f:
          f.write(text)
  return {"preset": args.preset, "mesh": args.mesh, "rank": args.rank,
          "devices": len(devices), "results": results}


def table(report: dict) -> str:
  header = ("| program | optimizer | conditionals (steady) | thunks (steady) | "
            "SVD/QR/eigh (steady) | all-gather n / MiB (steady) | all-reduce n / MiB (steady) | "
            "other n (steady) | total MiB: all / steady | largest steady all-gather |")
  rows = [header, "|---|---|---|---|---|---|---|---|---|---|"]
  for r in report["results"]:
    c, s = r["collectives"], r["collectives_steady"]
    other = sum(c[k]["count"] for k in hlo.COLLECTIVES if k not in ("all-gather", "all-reduce"))
    other_s = sum(s[k]["count"] for k in hlo.COLLECTIVES
                  if k not in ("all-gather", "all-reduce"))
    rows.append(
        f"| {r['program']} | {r['optimizer']} | {r['conditionals']} ({r['conditionals_steady']}) "
        f"| {r['thunks']} ({r['thunks_steady']}) "
        f"| {r['decompositions']} ({r['decompositions_steady']}) "
        f"| {c['all-gather']['count']} / {c['all-gather']['bytes'] / MiB:.1f} "
        f"({s['all-gather']['count']} / {s['all-gather']['bytes'] / MiB:.1f}) "
        f"| {c['all-reduce']['count']} / {c['all-reduce']['bytes'] / MiB:.1f} "
        f"({s['all-reduce']['count']} / {s['all-reduce']['bytes'] / MiB:.1f}) "
        f"| {other} ({other_s}) "
        f"| {c['total']['bytes'] / MiB:.1f} / {s['total']['bytes'] / MiB:.1f} "
        f"| {r['largest_all_gather_steady'] / MiB:.2f} MiB |")
  return "\n".join(rows)


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  report = run(args)
  if not args.quiet:
    print(f"{args.preset}, rank {args.rank}, mesh {args.mesh} on {report['devices']} "
          f"{jax.default_backend()} devices")
    print(table(report))
  common.write_json(args.out or common.default_out_path("collectives", args.preset), report)
  return report


if __name__ == "__main__":
  main()
