"""A few real train steps of one optimizer on one device under a memory cap: does the step fit?

The trainer's own step (``train.trainer.build``: model, optimizer, shardings, donated jitted step)
runs on synthetic tokens generated on the device (no data pipeline, no grain or
tensorflow-datasets); params and optimizer state are created directly on the device by the
trainer's jitted initialiser. Stages, each recorded in the JSON as soon as it ends: ``init``
(params + optimizer state), ``compile`` (with XLA's memory analysis), ``first_step`` (OSD's
projector initialisation), ``warmup`` and ``timed`` steps (tokens/s, MFU). Any failure is caught
and recorded with its stage (``"status": "oom"`` for an out-of-memory error, else ``"error"``)
and the script exits 0, so that a benchmark script can go on.

The memory cap is the runtime's: run with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` set (see
benchmarks/gpu.sh, which caps an H200 at an 80 GB GPU's memory); the JSON records the
allocator's ``bytes_limit`` and ``peak_bytes_in_use``.

Example (a GPU)::

  XLA_PYTHON_CLIENT_MEM_FRACTION=0.56 python -m benchmarks.train_step_gpu --preset 7b \\
      --optimizer osd_adamw --rank 512 --batch-size 2 --seq-len 1024 --out /tmp/7b-osd.json
  python -m benchmarks.train_step_gpu --preset tiny --rank 8 --batch-size 4 --seq-len 32  # CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common

ATTENTION = ("auto", "xla", "jax", "cudnn")


def parse_args(argv):
  from train.config import OPTIMIZERS, PROJECTOR_OPTIMIZERS
  from train.model import PRESETS

  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="7b", choices=list(PRESETS))
  p.add_argument("--optimizer", default="osd_adamw", choices=OPTIMIZERS)
  p.add_argument("--rank", type=int, default=None,
                 help=f"Subspace rank r (default: per preset, {common.DEFAULT_RANK}).")
  p.add_argument("--batch-size", type=int, default=2, help="Global batch in sequences.")
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--dtype", default="bfloat16", help="Compute dtype.")
  p.add_argument("--param-dtype", default="float32", help="Master-weight dtype.")
  p.add_argument("--state-dtype", default=None,
                 help="Optimizer-moment dtype (train --state-dtype: float32, bfloat16, int8, "
                      "float8; default: --param-dtype's).")
  p.add_argument("--loss-chunk", type=int, default=None,
                 help="train --loss-chunk (default: the trainer's, by preset).")
  p.add_argument("--remat", default=None, help="train --remat (default: the preset's).")
  p.add_argument("--attention-impl", default="auto", choices=ATTENTION,
                 help="auto: cudnn on a GPU, falling back to xla if cudnn fails; xla elsewhere.")
  p.add_argument("--projector-init", default="randomized", choices=("svd", "randomized", "random"),
                 help="OSD's P0 (only the untimed first step depends on it).")
  p.add_argument("--projector-optimizer", default="adam", choices=PROJECTOR_OPTIMIZERS,
                 help="train --projector-optimizer (osd_*).")
  p.add_argument("--fused-update", action="store_true",
                 help="Each block's update inside the backward pass (train --fused-update).")
  p.add_argument("--offload-residuals", action=argparse.BooleanOptionalAction, default=None,
                 help="train --offload-residuals (with --fused-update; default: the trainer's, "
                      "on with remat full on a GPU).")
  p.add_argument("--grad-clip", type=float, default=1.0, help="train --grad-clip.")
  p.add_argument("--warmup", type=int, default=1, help="Untimed steps after the first.")
  p.add_argument("--repeats", type=int, default=3, help="Timed steps.")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a model-config field, e.g. n_layers=2 (repeatable).")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON output path (written after every stage).")
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def is_oom(exc: BaseException) -> bool:
  """True for the runtime's out-of-memory errors (allocation or compile-time)."""
  text = f"{type(exc).__name__}: {exc}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                 "OOM", "Failed to allocate", "MemoryError"))


def device_memory() -> dict[str, int] | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - the CPU backend may not report
    return None
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def train_config(args, attention: str):
  from train.config import TrainConfig

  overrides = common.parse_overrides(args.model_override)
  overrides["attention_impl"] = attention
  extra = {} if args.remat is None else {"remat": args.remat}
  if args.fused_update:
    extra["fused_update"] = True
  if args.offload_residuals is not None:
    extra["offload_residuals"] = args.offload_residuals
  return TrainConfig(
      grad_clip=args.grad_clip,
      preset=args.preset, optimizer=args.optimizer,
      rank=common.resolve_rank(args.preset, args.rank), steps=10_000, batch_size=args.batch_size,
      seq_len=args.seq_len, dtype=args.dtype, param_dtype=args.param_dtype,
      state_dtype=args.state_dtype, loss_chunk=args.loss_chunk,
      projector_init=args.projector_init, projector_optimizer=args.projector_optimizer,
      seed=args.seed, progress=False, tensorboard=False,
      model_overrides=overrides, **extra)


def random_batch(setup, vocab: int, batch_size: int, seq_len: int, seed: int) -> dict:
  """Uniform random tokens made on the device, already in the trainer's batch sharding."""
  from train import sharding as shd

  sharding = shd.batch_sharding(setup.mesh)

  @jax.jit
  def make(key):
    tokens = jax.random.randint(key, (batch_size, seq_len + 1), 0, vocab, jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  return jax.jit(make, out_shardings={"inputs": sharding, "targets": sharding})(
      jax.random.key(seed))


class Recorder:
  """The result dict, written to ``path`` after every stage."""

  def __init__(self, path: str, payload: dict):
    self.path, self.data = path, payload

  def stage(self, name: str, **values: Any) -> None:
    self.data["stages"].append(name)
    self.data.update(values)
    self.data["device_memory"] = device_memory()
    common.write_json(self.path, self.data)
    common.log(f"train_step_gpu: {name} done")


def run(args, rec: Recorder, attention: str) -> None:
  from train import trainer
  from train.config import validate
  from train.model import PRESETS
  from train.run import metrics as metrics_lib

  cfg = train_config(args, attention)
  validate(cfg)
  vocab = int(dict(cfg.model_overrides).get("vocab_size", PRESETS[args.preset].vocab_size))
  rec.data["stage"] = "build"
  setup = trainer.build(cfg, vocab, devices=jax.devices()[:1])
  rec.data.update(remat=setup.model_config.remat, scan_layers=setup.model_config.scan_layers,
                  attention_impl=attention, rank=cfg.rank,
                  offload_residuals=setup.offload_residuals,
                  flops_per_token=setup.flops_per_token)
  rec.data["stage"] = "init"
  t0 = time.perf_counter()
  state = jax.block_until_ready(setup.init_state())
  batch = jax.block_until_ready(random_batch(setup, vocab, args.batch_size, args.seq_len,
                                             args.seed))
  import osd_jax

  rec.stage("init", init_s=time.perf_counter() - t0,
            param_bytes=osd_jax.state_bytes(state.params),
            opt_state_bytes=osd_jax.state_bytes(state.opt_state))
  rec.data["stage"] = "compile"
  t0 = time.perf_counter()
  compiled = setup.train_step.lower(state, batch).compile()
  rec.stage("compile", compile_s=time.perf_counter() - t0,
            memory_analysis=common.memory_analysis(compiled))

  def step():
    nonlocal state
    state, metrics = compiled(state, batch)
    return jax.block_until_ready(metrics)

  rec.data["stage"] = "first_step"
  t0 = time.perf_counter()
  metrics = step()
  rec.stage("first_step", first_step_s=time.perf_counter() - t0,
            first_loss=float(metrics["loss"]))
  rec.data["stage"] = "warmup"
  for _ in range(args.warmup):
    step()
  rec.data["stage"] = "timed"
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    metrics = step()
    times.append(time.perf_counter() - t0)
  timing = common.stats(times)
  tokens = args.batch_size * args.seq_len
  tps = tokens / timing["median_s"]
  mfu = metrics_lib.mfu(setup.flops_per_token, tps, 1)
  rec.stage("timed", status="ok", **timing, tokens_per_step=tokens, tokens_per_s=tps, mfu=mfu,
            final_loss=float(metrics["loss"]), skipped_total=int(metrics["skipped_total"]))


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  path = args.out or common.default_out_path(f"train_step_gpu-{args.optimizer}", args.preset)
  on_gpu = jax.default_backend() == "gpu"
  attention = args.attention_impl
  if attention == "auto":
    attention = "cudnn" if on_gpu else "xla"
  rec = Recorder(path, {
      "benchmark": "train_step_gpu", "preset": args.preset, "optimizer": args.optimizer,
      "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
      "param_dtype": args.param_dtype, "status": "running", "stages": [],
      "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      "attention_fallback": None})
  while True:
    try:
      run(args, rec, attention)
      break
    except Exception as e:  # noqa: BLE001 - recorded; the caller goes on
      oom = is_oom(e)
      if (not oom and args.attention_impl == "auto" and attention == "cudnn"
          and rec.data.get("stage") in ("build", "compile", "first_step")):
        common.log(f"train_step_gpu: cudnn attention failed ({type(e).__name__}: "
                   f"{str(e)[:300]}); retrying with xla")
        rec.data["attention_fallback"] = f"{type(e).__name__}: {str(e)[:1000]}"
        attention = "xla"
        rec.data["stages"] = []
        del e
        gc.collect()  # the failed attempt's state must be freed before the retry allocates
        continue
      rec.data.update(status="oom" if oom else "error", failed_stage=rec.data.get("stage"),
                      error=f"{type(e).__name__}: {str(e)[:3000]}",
                      traceback=traceback.format_exc()[-3000:],
                      device_memory=device_memory())
      common.write_json(path, rec.data)
      common.log(f"train_step_gpu: {rec.data['status']} at stage {rec.data['failed_stage']}: "
                 f"{type(e).__name__}: {str(e)[:500]}")
      break
  if not args.quiet:
    d = rec.data
    mem = d.get("device_memory") or {}
    peak = mem.get("peak_bytes_in_use")
    limit = mem.get("bytes_limit")
    est = (d.get("memory_analysis") or {}).get("peak_estimate_bytes")
    mfu = "n/a" if d.get("mfu") is None else f"{100 * d['mfu']:.1f}%"
    line = (f"{d['preset']} {d['optimizer']}: {d['status']}"
            + (f" at {d.get('failed_stage')}" if d["status"] != "ok" else
               f", {d['tokens_per_s']:,.0f} tokens/s, step {common.fmt_seconds(d['median_s'])}, "
               f"MFU {mfu}")
            + f"; peak in use {common.fmt_bytes(peak)} of limit {common.fmt_bytes(limit)}"
            + f"; XLA estimate {common.fmt_bytes(est)}")
    print(line)
    print(f"(JSON: {path})")
  return rec.data


if __name__ == "__main__":
  main()
