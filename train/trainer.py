"""The training loop: ``train(TrainConfig(...)) -> TrainResult``.

Example (a notebook)::

  from train import trainer
  result = trainer.train(trainer.TrainConfig(preset="tiny", optimizer="osd_adamw", steps=50))
  result.history[-1]["loss"], result.final_eval["eval_perplexity"], result.run_dir

A run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and
``tokenizer.model`` (a copy of the SentencePiece model used). Only process 0 writes metrics and
files; every process takes part in checkpoint saves (each writes its own shards).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

import osd_jax
from train import checkpoint as ckpt_lib
from train import health, optimizers, preflight, xla_cpu
from train import metrics as metrics_lib
from train import rundir as rundir_lib
from train import sharding as shd
from train import train_step as step_lib
from train.config import ConfigError, TrainConfig, validate

log = logging.getLogger("train")

__all__ = ["ConfigError", "Setup", "TrainConfig", "TrainResult", "build", "train"]

_LAUNCHER_ENV = (  # a multi-process launcher sets one of these (with a size > 1)
    "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_NUM_PROCESSES",
)


def default_cache_dir() -> str:
  return os.environ.get("OSD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                      "osd_jax"))


# ----------------------------------------------------------------------------- distributed


def _launcher_world_size() -> int:
  for name in _LAUNCHER_ENV:
    try:
      if int(os.environ.get(name, "1")) > 1:
        return int(os.environ[name])
    except ValueError:
      pass
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len(hosts.split(",")) if hosts else 1


def maybe_initialize_distributed(cfg: TrainConfig) -> None:
  """Calls ``jax.distributed.initialize`` when asked to or when a multi-process launcher is seen."""
  explicit = cfg.distributed or cfg.coordinator_address is not None or cfg.num_processes
  if not explicit and _launcher_world_size() <= 1:
    return
  if jax.distributed.is_initialized():
    return
  # CPU collectives across processes (only used when the devices are CPUs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cfg.coordinator_address is not None:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes is not None:
    kwargs.update(num_processes=cfg.num_processes, process_id=cfg.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f"jax.distributed.initialize failed (check --coordinator-address, "
                      f"--num-processes, --process-id or the launcher's environment): {e}"
                      ) from None


# ----------------------------------------------------------------------------- setup


def _dtype_name(name: str) -> str:
  return jnp.dtype(name).name


def model_config(cfg: TrainConfig, vocab_size: int):
  """The LlamaConfig for ``cfg`` with the tokenizer's vocabulary (unless overridden)."""
  from train import model as model_lib

  if cfg.preset.lower() not in model_lib.PRESETS:
    raise ConfigError(f"unknown --preset {cfg.preset!r}; choose one of "
                      f"{', '.join(model_lib.PRESETS)}")
  overrides = dict(cfg.model_overrides)
  if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
    raise ConfigError(f"--model-override vocab_size={overrides['vocab_size']} is smaller than the "
                      f"tokenizer's vocabulary ({vocab_size}); drop the override or use a "
                      f"matching --tokenizer")
  overrides.setdefault("vocab_size", vocab_size)
  overrides.setdefault("max_seq_len", cfg.seq_len)
  overrides.setdefault("dtype", _dtype_name(cfg.dtype))
  overrides.setdefault("param_dtype", _dtype_name(cfg.param_dtype))
  for key in ("scan_layers", "remat"):  # flags of their own (the checkpoint records the layout)
    if key in overrides:
      raise ConfigError(f"--model-override {key}=...: use --{key.replace('_', '-')} instead")
  overrides["scan_layers"] = bool(cfg.scan_layers)
  if cfg.remat != "auto":
    overrides["remat"] = cfg.remat
  try:
    mcfg = model_lib.get_config(cfg.preset, **overrides)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"--preset/--model-override: {e}") from None
  if mcfg.max_seq_len < cfg.seq_len:
    raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_seq_len "
                      f"{mcfg.max_seq_len}")
  return mcfg


@dataclasses.dataclass
class Setup:
  """Everything derived from the config and the mesh, before any array is allocated."""

  cfg: TrainConfig
  mesh: jax.sharding.Mesh
  model_config: Any
  graphdef: Any
  tx: Any
  schedule: Any
  param_shardings: Any
  state_shardings: step_lib.TrainState
  abstract_state: step_lib.TrainState  # ShapeDtypeStructs with shardings
  train_step: Any
  eval_step: Any
  flops_per_token: float

  def init_state(self, params: Any = None) -> step_lib.TrainState:
    """Fresh params (seeded by ``cfg.seed``) and optimizer state, created directly sharded; with
    ``params`` (host arrays shaped like ``abstract_state.params``) the optimizer starts there."""
    from train import model as model_lib

    mcfg, tx, seed = self.model_config, self.tx, self.cfg.seed
    if params is not None:
      params = jax.device_put(params, self.param_shardings)
      return jax.jit(lambda p: step_lib.init_state(p, tx.init(p)),
                     out_shardings=self.state_shardings)(params)

    def init():
      model = model_lib.Llama(mcfg, rngs=nnx.Rngs(seed))
      params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      return step_lib.init_state(params, tx.init(params))

    return jax.jit(init, out_shardings=self.state_shardings)()

  def model(self, params: Any) -> nnx.Module:
    """The Llama module holding ``params``."""
    return nnx.merge(self.graphdef, params)


def build(cfg: TrainConfig, vocab_size: int, *, mesh: jax.sharding.Mesh | None = None,
          devices: Any = None) -> Setup:
  """Builds mesh, model definition, optimizer, shardings and the jitted steps for ``cfg``."""
  from train import model as model_lib

  mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh, devices)
  xla_cpu.warn_if_missing(mesh.devices.flat[0].platform)
  dp = shd.data_parallel_size(mesh)
  if cfg.batch_size % (dp * cfg.grad_accum):
    raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by data x fsdp = {dp} "
                      f"devices times --grad-accum {cfg.grad_accum}")
  if cfg.batch_size % jax.process_count():
    raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the "
                      f"{jax.process_count()} processes")
  mcfg = model_config(cfg, vocab_size)
  preflight.check_step_memory(cfg, mcfg, mesh)  # e.g. a huge --seq-len: one line, not an OOM
  abstract_model = nnx.eval_shape(lambda: model_lib.Llama(mcfg, rngs=nnx.Rngs(0)))
  graphdef, abs_params, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ConfigError("the model has non-parameter state, which this trainer does not handle")
  param_specs = shd.param_specs(abs_params, mesh)
  param_shardings = shd.named(mesh, param_specs)
  abs_params = nnx.to_pure_dict(abs_params)
  abs_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abs_params)

  tx, schedule = optimizers.make_optimizer(cfg, abs_params)
  opt_shapes = jax.eval_shape(tx.init, abs_params)
  opt_shardings = optimizers.state_shardings(opt_shapes, param_shardings, mesh)
  state_shardings = step_lib.state_shardings(param_shardings, opt_shardings, mesh)
  abstract = jax.eval_shape(step_lib.init_state, abs_params, opt_shapes)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
  train_step = step_lib.make_train_step(
      graphdef, tx, schedule, mesh, state_shardings, grad_accum=cfg.grad_accum,
      loss_spike_factor=cfg.loss_spike_factor,
      subspace_metrics=optimizers.is_subspace(cfg), metrics_every=cfg.log_every,
      last_step=cfg.steps, energy_metrics=cfg.resolved_energy_metric)
  eval_step = step_lib.make_eval_step(graphdef, mesh, param_shardings, grad_accum=cfg.grad_accum)
  return Setup(cfg, mesh, mcfg, graphdef, tx, schedule, param_shardings, state_shardings,
               abstract, train_step, eval_step,
               float(model_lib.flops_per_token(mcfg, cfg.seq_len)))


# ----------------------------------------------------------------------------- data


def load_tokenizer(cfg: TrainConfig):
  """The tokenizer given by ``--tokenizer``, else the cached one of the embedded corpus."""
  from train import tokenizer as tok_lib

  if cfg.tokenizer is not None:
    try:
      return tok_lib.load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
      raise ConfigError(f"--tokenizer: {e}") from None
  vocab = tok_lib.DEFAULT_VOCAB_SIZE if cfg.vocab_size is None else cfg.vocab_size
  cache = cfg.cache_dir or default_cache_dir()
  try:
    if jax.process_count() > 1:  # process 0 trains (or finds) it, the others wait and load it
      from jax.experimental import multihost_utils

      if jax.process_index() == 0:
        tok_lib.default_tokenizer(cache, vocab)
      multihost_utils.sync_global_devices("osd_jax:tokenizer")
    return tok_lib.default_tokenizer(cache, vocab)
  except OSError as e:
    raise ConfigError(f"--cache-dir {cache}: cannot write or read the default tokenizer there "
                      f"({e})") from None
  except ValueError as e:
    raise ConfigError(f"default tokenizer (--vocab-size {vocab}, --cache-dir {cache}): {e}"
                      ) from None


def make_datasets(cfg: TrainConfig, tokenizer,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[Any, Any]:
  """(train dataset, eval dataset) for this process.

  With a ``mesh`` this process reads the rows of every global batch that its devices hold
  (:func:`train.sharding.process_batch_rows`): for ``embedded``/``text:`` data, rows
  ``[start, stop)`` of the global batch that a single process would read, so any number of
  processes trains on exactly the same batches. Without one, process i reads rows
  ``[i * B / P, (i + 1) * B / P)``.
  """
  from train import data as data_lib

  if mesh is None:
    rows = cfg.batch_size // jax.process_count()
    start = jax.process_index() * rows
  else:
    try:
      start, stop = shd.process_batch_rows(mesh, cfg.batch_size)
    except ValueError as e:
      raise ConfigError(f"--mesh {cfg.mesh}: {e}") from None
    rows = stop - start
  common = {"seq_len": cfg.seq_len, "batch_size": rows, "seed": cfg.seed,
            "process_index": start // rows, "process_count": cfg.batch_size // rows,
            "tfds_data_dir": cfg.tfds_data_dir, "text_field": cfg.text_field}
  try:
    train_ds = data_lib.make_dataset(cfg.data, tokenizer, split="train", **common)
    eval_ds = data_lib.make_dataset(cfg.data, tokenizer, split="eval", **common)
  except (ValueError, OSError, RuntimeError, ImportError) as e:
    message = str(e) if "--data" in str(e) else f"--data {cfg.data}: {e}"
    raise ConfigError(message) from None
  return train_ds, eval_ds


def _global_batch(batch: dict, sharding, batch_size: int) -> dict:
  """The global ``[batch_size, T]`` arrays from this process's rows of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (batch_size,) + np.shape(v)[1:])
          for k, v in batch.items() if k in ("inputs", "targets")}


# ----------------------------------------------------------------------------- preemption


class _Preemption:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the loop reads after every step (a Python
  attribute: no device sync). A second SIGINT interrupts at once (KeyboardInterrupt, no save)."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signal_name: str | None = None  # the first signal received
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = self.signal_name or signal.Signals(signum).name

  def agreed(self, sync: bool = True) -> bool:
    """True when any process has been asked to stop. Multi-process, only ``sync`` calls (a
    collective that every process must make at the same step) can return True."""
    if jax.process_count() == 1:
      return self.requested
    if not sync:
      return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.max(flags))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns."""

  run_dir: str
  setup: Setup
  state: step_lib.TrainState  # final params, optimizer state, step, skip counters
  history: list[dict]  # every logged record (train and eval), as written to metrics.jsonl
  final_eval: dict  # {"eval_loss", "eval_perplexity"} of the last evaluation
  initial_eval: dict  # the same at the first evaluation of this call (step 0 for a fresh run)
  preempted: bool  # stopped early by SIGTERM/SIGINT (or ``stop_at``); a checkpoint was saved
  wall_time_s: float
  stop_signal: str | None = None  # "SIGTERM" or "SIGINT" when a signal stopped the run

  @property
  def params(self) -> Any:
    return self.state.params

  @property
  def model(self) -> nnx.Module:
    return self.setup.model(self.state.params)


def _default_run_dir(cfg: TrainConfig) -> str:
  if jax.process_count() > 1:
    raise ConfigError("multi-process runs need an explicit --run-dir (shared by all processes)")
  return rundir_lib.default_run_dir(cfg)


def _truncate_metrics(path: str, last_step: int) -> None:
  """Drops records past ``last_step`` (written before a crash) so a resumed run appends cleanly
  (``last_step=-1``: all of them)."""
  if not os.path.isfile(path):
    return
  keep = [r for r in metrics_lib.read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(metrics_lib.json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)


def evaluate(setup: Setup, params: Any, eval_ds: Any, num_batches: int) -> dict:
  """Mean token loss and perplexity over the first ``num_batches`` batches of ``eval_ds``."""
  sharding = shd.batch_sharding(setup.mesh)
  loss_sum, count = 0.0, 0.0
  it = iter(eval_ds)
  for _ in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    s, n = setup.eval_step(params, _global_batch(batch, sharding, setup.cfg.batch_size))
    loss_sum += float(s)
    count += float(n)
  if count == 0:
    raise ConfigError("the eval split yielded no batch; use a smaller --batch-size or more data")
  loss = loss_sum / count
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


def _save_run_files(run_dir: str, cfg: TrainConfig, tokenizer) -> None:
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    # the run's flags, to repeat it (`--config`); whether this start resumed is not one of them
    f.write(cfg.replace(resume=False).to_json() + "\n")
  dst = os.path.join(run_dir, "tokenizer.model")
  if not os.path.exists(dst):
    with open(dst, "wb") as f:
      f.write(tokenizer.serialized_model())


def train(cfg: TrainConfig, *, devices: Any = None, stop_at: int | None = None,
          tokenizer: Any = None) -> TrainResult:
  """Trains according to ``cfg`` and returns the final state, metrics and run directory.

  Args:
    cfg: the run's configuration (``--resume`` continues from ``cfg.run_dir``).
    devices: devices for the mesh (default: all).
    stop_at: stop after this step as if preempted (a checkpoint is saved); for tests.
    tokenizer: a ready :class:`train.tokenizer.Tokenizer` (default: from ``cfg``).

  Raises:
    ConfigError / CheckpointError: bad flags, data, tokenizer or a mismatched checkpoint.
  """
  # Installed first, so that SIGTERM while starting up (tokenizer, compile, the first eval) stops
  # the run cleanly before its first step instead of killing it.
  preemption = _Preemption()
  lock = None
  try:
    with warnings.catch_warnings():
      # the trainer names the matrices --rank leaves unprojected itself (optimizers.check_rank)
      warnings.simplefilter("ignore", osd_jax.FullRankWarning)
      cfg, lock = _lock_run_dir(cfg)
      return _train(cfg, preemption, devices=devices, stop_at=stop_at, tokenizer=tokenizer)
  finally:
    if lock is not None:
      lock.release(clean=True)  # removes a run dir that this start created and left empty
    preemption.restore()


def _lock_run_dir(cfg: TrainConfig) -> tuple[TrainConfig, Any]:
  """Validates ``cfg``, resolves its run directory (absolute) and locks it on process 0."""
  validate(cfg)
  maybe_initialize_distributed(cfg)
  run_dir = os.path.abspath(cfg.run_dir or _default_run_dir(cfg))
  cfg = cfg.replace(run_dir=run_dir)
  return cfg, rundir_lib.RunDirLock(run_dir) if jax.process_index() == 0 else None


def _train(cfg: TrainConfig, preemption: _Preemption, *, devices: Any, stop_at: int | None,
           tokenizer: Any) -> TrainResult:
  from train.hf import resolve_init_from

  validate(cfg)
  cfg = resolve_init_from(cfg)  # the HF directory's architecture and tokenizer
  cfg = cfg.replace(rank=cfg.resolved_rank)  # config.json and checkpoints hold the rank used
  t_start = time.time()
  maybe_initialize_distributed(cfg)
  primary = jax.process_index() == 0
  run_dir = cfg.run_dir or _default_run_dir(cfg)
  cfg = cfg.replace(run_dir=run_dir)
  ckpt_dir = epath.Path(cfg.ckpt_dir or os.path.join(run_dir, "checkpoints"))
  cfg, setup, state, start, train_it, eval_ds, tokenizer, checkpointer = _start(
      cfg, str(ckpt_dir), tokenizer, devices)
  if primary:
    _save_run_files(run_dir, cfg, tokenizer)
    # a resumed run keeps the records up to its checkpoint; a fresh start (also the restart of a
    # run stopped before its first checkpoint) begins the file again
    _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), start if cfg.resume else -1)
  writer = metrics_lib.MetricsWriter(run_dir, enabled=primary, tensorboard=cfg.tensorboard,
                                     purge_step=start + 1 if cfg.resume else 0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
  if primary:
    log.info("%s: %.2fM params, optimizer %s, mesh %s, %d devices, run dir %s", cfg.preset,
             n_params / 1e6, cfg.optimizer, dict(setup.mesh.shape), setup.mesh.size, run_dir)

  from tqdm.auto import tqdm

  bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and primary),
             unit="step", dynamic_ncols=True)
  say = bar.write if cfg.progress and primary else (lambda m: log.info(m) if primary else None)

  def run_eval(step: int) -> dict:
    result = evaluate(setup, state.params, eval_ds, cfg.eval_batches)
    writer.write(step, result)
    say(f"step {step}: eval loss {result['eval_loss']:.4f}, perplexity "
        f"{result['eval_perplexity']:.2f}")
    return result

  saved_steps = set(checkpointer.all_steps())

  def save(step: int, wait: bool = False) -> None:
    if step not in saved_steps:
      checkpointer.save(step, state, data_state=_iter_state(train_it), config=cfg.to_dict())
      saved_steps.add(step)
    if wait:
      checkpointer.wait()

  batch_sharding = shd.batch_sharding(setup.mesh)
  tokens_per_step = cfg.batch_size * cfg.seq_len
  # a resumed run does not re-evaluate at its first step (the original run logged that)
  initial_eval = final_eval = {} if cfg.resume else run_eval(start)
  last_metrics, last_skipped = None, int(state.skipped)
  streaks = []  # every step's bad_streak since the last log step (device scalars: no sync per step)
  in_flight = None  # the previous step's loss: waiting for it keeps at most one step queued
  monitor = health.DivergenceMonitor(
      lr=cfg.lr, warmup_steps=cfg.resolved_warmup, rank=cfg.rank,
      projector_lr_ratio=cfg.projector_lr_ratio, osd=cfg.optimizer.startswith("osd"))
  windows = getattr(train_it, "windows_per_epoch", None)  # embedded/text: windows in one epoch
  if windows and primary and cfg.steps * cfg.batch_size > windows:
    log.warning("warning: --steps %d x --batch-size %d sequences are %.2f epochs of the training "
                "data (%d windows of %d tokens); later epochs repeat it", cfg.steps,
                cfg.batch_size, cfg.steps * cfg.batch_size / windows, windows, cfg.seq_len)
  t_log, steps_since_log, paused = None, 0, 0.0  # paused: eval/save time, not step time
  # stopped while starting up: the state is the checkpoint at `start` (or step 0 of a fresh run,
  # which the same command rebuilds exactly), so there is nothing new to save
  preempted = start < cfg.steps and preemption.agreed(sync=True)
  if preempted:
    say(f"step {start}: stopped before the first step; nothing new to save")
  step = start
  try:
    while step < cfg.steps and not preempted:
      batch = _global_batch(next(train_it), batch_sharding, cfg.batch_size)
      state, last_metrics = setup.train_step(state, batch)
      streaks.append(last_metrics["bad_streak"])
      if in_flight is not None:  # the host runs at most one step ahead of the device, so that a
        jax.block_until_ready(in_flight)  # signal stops the run within a step of its arrival
      in_flight = last_metrics["loss"]
      step += 1
      steps_since_log += 1
      bar.update(1)
      if t_log is None:  # the first step compiles: time from its end
        jax.block_until_ready(last_metrics)
        t_log, steps_since_log = time.time(), 0
      if step % cfg.log_every == 0 or step == cfg.steps:
        record = {k: float(v) for k, v in jax.device_get(last_metrics).items()}
        # the mean loss of the (finite) steps since the last log step, not one batch's
        record["loss"] = record.pop("loss_mean")
        record["tokens_seen"] = step * tokens_per_step
        if windows:
          record["epochs"] = step * cfg.batch_size / windows
        now = time.time()
        if steps_since_log:
          dt = (now - t_log - paused) / steps_since_log
          record.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
          mfu = metrics_lib.mfu(setup.flops_per_token, tokens_per_step / dt, setup.mesh.size)
          record["mfu"] = mfu if mfu is not None else "n/a"
        record.update(metrics_lib.memory_stats())
        if step - 1 == 0:
          record.pop("subspace_drift", None)  # P_0 is set at step 0: no drift to report
        t_log, steps_since_log, paused = now, 0, 0.0
        writer.write(step, record)
        for _, message in monitor.check(step, record):
          if cfg.stop_on_divergence:
            save(step, wait=True)
            raise FloatingPointError(f"step {step}: {message}; stopped (checkpoint saved, "
                                     f"--stop-on-divergence)")
          if primary:
            log.warning("step %d: warning: %s", step, message)
        bar.set_postfix(loss=f"{record['loss']:.3f}",
                        tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
        if int(record["skipped_total"]) > last_skipped:
          say(f"step {step}: skipped {int(record['skipped_total']) - last_skipped} step(s) with "
              f"non-finite or spiking loss/gradients ({int(record['skipped_total'])} in total)")
          last_skipped = int(record["skipped_total"])
        # the longest streak of skipped steps since the last log step, also one that has ended
        worst, streaks = int(np.max(jax.device_get(streaks))), []
        if worst >= cfg.max_consecutive_skips:
          save(step, wait=True)
          raise FloatingPointError(
              f"{worst} steps in a row had non-finite or spiking loss; "
              f"stopped at step {step} (checkpoint saved). Lower --lr or check the data.")
      t_pause = time.time()
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        final_eval = run_eval(step)
      if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
        save(step)
      paused += time.time() - t_pause
      # multi-process runs agree on stopping at log steps (a collective); one process: every step
      stop = preemption.agreed(sync=step % cfg.log_every == 0)
      if step < cfg.steps and (stop or (stop_at is not None and step >= stop_at)):
        save(step, wait=True)
        say(f"step {step}: stopped early, checkpoint saved; continue with --resume")
        preempted = True
        break
    if not preempted:
      final_eval = run_eval(step)
    checkpointer.wait()
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
  return TrainResult(run_dir=run_dir, setup=setup, state=state, history=writer.history,
                     final_eval=final_eval, initial_eval=initial_eval, preempted=preempted,
                     wall_time_s=time.time() - t_start,
                     stop_signal=preemption.signal_name if preempted else None)


def _start(cfg: TrainConfig, ckpt_dir: str, tokenizer: Any, devices: Any):
  """Builds the model, optimizer and data and restores the latest checkpoint when resuming.

  Bad flags or data raise before anything is written (a missing checkpoint directory is only
  created once the run starts). Returns ``(cfg, setup, state, start_step, train_iterator,
  eval_dataset, tokenizer, checkpointer)``.
  """
  def open_checkpointer():
    return ckpt_lib.Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints,
                                 async_save=cfg.async_checkpoint)

  checkpointer = open_checkpointer() if epath.Path(ckpt_dir).exists() else None
  try:
    # committed steps only: a save cut short (orbax's temporary directory, an uncommitted GCS
    # step) is not a checkpoint to resume from
    has_checkpoints = checkpointer is not None and bool(checkpointer.all_steps())
    if cfg.auto_resume:
      cfg = cfg.replace(resume=has_checkpoints)
    if cfg.resume and not has_checkpoints:
      raise ConfigError(f"--resume: no checkpoints in {ckpt_dir}")
    if not cfg.resume and has_checkpoints:
      raise ConfigError(f"{ckpt_dir} already holds checkpoints; add --resume (or --auto-resume) "
                        f"to continue that run or choose a new --run-dir")

    tokenizer = tokenizer or load_tokenizer(cfg)
    try:
      setup = build(cfg, tokenizer.vocab_size, devices=devices)
    except ValueError as e:  # e.g. the optimizer rejecting a flag value
      raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None
    train_ds, eval_ds = make_datasets(cfg, tokenizer, setup.mesh)
    train_it: Iterator = iter(train_ds)
    if hasattr(train_ds, "windows_per_epoch"):  # embedded/text: for the epochs metric
      train_it.windows_per_epoch = train_ds.windows_per_epoch
    checkpointer = checkpointer or open_checkpointer()
    if not cfg.resume:
      params = _init_from(cfg, setup) if cfg.init_from else None
      return cfg, setup, setup.init_state(params), 0, train_it, eval_ds, tokenizer, checkpointer
    state, data_state, saved = checkpointer.restore(setup.abstract_state, config=cfg.to_dict())
    start = int(state.step)
    if data_state is not None:
      train_it.set_state(data_state)
    else:  # this process reads other rows of each global batch than the saver (another mesh or
      # process count; params and optimizer state came back resharded): go to global batch `start`
      from train import data as data_lib

      try:
        data_lib.seek(train_it, start, cfg.data)
      except ValueError as e:
        raise ckpt_lib.CheckpointError(str(e)) from None
    _log_resume(checkpointer.metadata(start), setup.mesh, start, data_state is None)
  except BaseException:
    if checkpointer is not None:
      checkpointer.close()
    raise
  changed = ckpt_lib.config_diff(saved, cfg.to_dict(), ckpt_lib.SCHEDULE_KEYS)
  if changed and jax.process_index() == 0:
    log.warning("resuming with changed settings (the run continues under the new ones): %s",
                "; ".join(changed))
  return cfg, setup, state, start, train_it, eval_ds, tokenizer, checkpointer


def _init_from(cfg: TrainConfig, setup: Setup) -> Any:
  """The params of ``--init-from`` (host arrays in this run's param layout and dtype)."""
  from train import hf

  try:
    return hf.load_params(cfg.init_from, setup.abstract_state.params)
  except (hf.HFError, OSError) as e:
    raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None


def _iter_state(it: Any) -> Any:
  return it.get_state() if hasattr(it, "get_state") else None


def _log_resume(saved: dict, mesh: jax.sharding.Mesh, step: int, repositioned: bool) -> None:
  """Names the layout that saved the checkpoint and the one that continues it."""
  if jax.process_index() != 0:
    return
  now = ckpt_lib.describe_topology(ckpt_lib.checkpoint_metadata(mesh))
  was = ckpt_lib.describe_topology(saved)
  if was == now:
    log.info("resuming at step %d on %s, the layout that saved it", step, now)
    return
  log.info("resuming at step %d on %s (saved on %s): params and optimizer state resharded%s",
           step, now, was, f"; data moved to global batch {step}" if repositioned else "")
