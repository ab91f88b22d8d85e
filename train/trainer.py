"""The training loop: ``train(TrainConfig(...)) -> TrainResult``.

Example (a notebook)::

  from train import trainer
  result = trainer.train(trainer.TrainConfig(preset="tiny", optimizer="osd_adamw", steps=50))
  result.history[-1]["loss"], result.final_eval["eval_perplexity"], result.run_dir

A run directory holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and
``tokenizer.model`` (a copy of the SentencePiece model used). Only process 0 writes metrics and
files; every process takes part in checkpoint saves (each writes its own shards).

The pieces a run is made of live in their own modules: building it is :mod:`train.run.build`
(``build`` and ``Setup`` are re-exported here, as are ``model_config`` of :mod:`train.config`
and ``load_tokenizer`` of :mod:`train.data.inputs`), starting or resuming
:mod:`train.run.startup`, signals :mod:`train.run.preemption`; the data are :mod:`train.data`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

import osd_jax
from train import sharding as shd
from train import train_step as step_lib
from train.config import ConfigError, TrainConfig, model_config, validate
from train.data.inputs import global_batch, load_tokenizer
from train.run import health, startup
from train.run import metrics as metrics_lib
from train.run.build import Setup, build
from train.run.preemption import Preemption

log = logging.getLogger("train")

#: On CPU, a run whose remaining steps are estimated (from its first timed steps) to take longer
#: than this says so once, with the flags that shorten it: a bare ``python -m train`` is 1000
#: steps of 64 x 256 tokens in bfloat16, over an hour on 2 CPU cores.
LONG_CPU_RUN_S = 600.0
#: The CPU demo's flags (``make demo``: about 3 minutes on 2 CPU cores).
CPU_DEMO_FLAGS = "--steps 300 --batch-size 16 --seq-len 128 --dtype float32"

__all__ = ["ConfigError", "Setup", "TrainConfig", "TrainHooks", "TrainResult", "build", "evaluate",
           "load_tokenizer", "model_config", "train", "validate"]


@dataclasses.dataclass
class TrainHooks:
  """Optional callbacks into :func:`train`, to watch a run (tests record its batches with them)."""

  # once the model, data and checkpointer are ready, before the first eval and step
  on_start: Callable[[], None] | None = None
  # (split "train" or "eval", step, this process's rows of the batch as host arrays) before each
  # train step (the step it produces) and each eval batch (the step evaluated)
  on_batch: Callable[[str, int, dict], None] | None = None


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
  start_step: int = 0  # the step this call started from (the checkpoint's when resuming)

  @property
  def params(self) -> Any:
    return self.state.params

  @property
  def model(self) -> nnx.Module:
    return self.setup.model(self.state.params)


def train(cfg: TrainConfig, *, devices: Any = None, stop_at: int | None = None,
          tokenizer: Any = None, hooks: TrainHooks | None = None,
          announce_stop: bool = True) -> TrainResult:
  """Trains according to ``cfg`` and returns the final state, metrics and run directory.

  Args:
    cfg: the run's configuration (``--resume`` continues from ``cfg.run_dir``).
    devices: devices for the mesh (default: all).
    stop_at: stop after this step as if preempted (a checkpoint is saved); for tests.
    tokenizer: a ready :class:`train.data.tokenizer.Tokenizer` (default: from ``cfg``).
    hooks: callbacks that watch the run (:class:`TrainHooks`).
    announce_stop: say (log) when a signal or ``stop_at`` stops the run early; the command line
      passes False and prints its own line from the result instead.

  Raises:
    ConfigError / CheckpointError: bad flags, data, tokenizer or a mismatched checkpoint.
  """
  # Installed first, so that SIGTERM while starting up (tokenizer, compile, the first eval) stops
  # the run cleanly before its first step instead of killing it.
  preemption = Preemption()
  lock = None
  try:
    with warnings.catch_warnings():
      # the trainer names the matrices --rank leaves unprojected itself (optimizers.check_rank)
      warnings.simplefilter("ignore", osd_jax.FullRankWarning)
      cfg, lock = startup.resolve(cfg)
      return _train(cfg, preemption, devices=devices, stop_at=stop_at, tokenizer=tokenizer,
                    hooks=hooks or TrainHooks(), announce_stop=announce_stop)
  finally:
    if lock is not None:
      lock.release(clean=True)  # removes a run dir that this start created and left empty
    preemption.restore()


def _train(cfg: TrainConfig, preemption: Preemption, *, devices: Any, stop_at: int | None,
           tokenizer: Any, hooks: TrainHooks, announce_stop: bool) -> TrainResult:
  t_start = time.time()
  started = startup.start(cfg, tokenizer, devices)
  if hooks.on_start:
    hooks.on_start()
  setup, state, step = started.setup, started.state, started.step
  start_step = step
  run = _Run(cfg, started, hooks)
  try:
    # a resumed run does not re-evaluate at its first step (the original run logged that)
    initial_eval = final_eval = {} if cfg.resume else run.evaluate(step, state.params)
    # stopped while starting up: the state is the checkpoint at `step` (or step 0 of a fresh
    # run, which the same command rebuilds exactly), so there is nothing new to save
    preempted = step < cfg.steps and preemption.agreed(sync=True)
    if preempted and announce_stop:
      run.say(f"step {step}: stopped before the first step; nothing new to save")
    while step < cfg.steps and not preempted:
      state, metrics = setup.train_step(state, run.next_batch(step))
      step += 1
      run.stepped(step, metrics)
      if step % cfg.log_every == 0 or step == cfg.steps:
        run.log(step, state, metrics)
      t_pause = time.time()
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
        final_eval = run.evaluate(step, state.params)
      if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.steps:
        run.save(step, state)
      run.paused += time.time() - t_pause  # eval/save time is not step time
      # multi-process runs agree on stopping at log steps (a collective); one process: every step
      stop = preemption.agreed(sync=step % cfg.log_every == 0)
      if step < cfg.steps and (stop or (stop_at is not None and step >= stop_at)):
        run.save(step, state, wait=True)
        if announce_stop:
          run.say(f"step {step}: stopped early, checkpoint saved; continue with --resume")
        preempted = True
    if not preempted:
      final_eval = run.evaluate(step, state.params)
    run.report_malformed_lines()
    started.checkpointer.wait()
  finally:
    run.close()
  return TrainResult(run_dir=cfg.run_dir, setup=setup, state=state, history=run.writer.history,
                     final_eval=final_eval, initial_eval=initial_eval, preempted=preempted,
                     wall_time_s=time.time() - t_start,
                     stop_signal=preemption.signal_name if preempted else None,
                     start_step=start_step)


class _Run:
  """What the loop writes to and keeps between steps: run files, metrics writer, progress bar,
  checkpointer, divergence monitor and step timing. The train state is passed in by every call."""

  def __init__(self, cfg: TrainConfig, started: startup.Started, hooks: TrainHooks):
    setup, run_dir = started.setup, cfg.run_dir
    self.cfg, self.setup, self.hooks = cfg, setup, hooks
    self.train_it, self.eval_ds, self.checkpointer = (started.train_it, started.eval_ds,
                                                      started.checkpointer)
    self.primary = primary = jax.process_index() == 0
    if primary:
      startup.save_run_files(run_dir, cfg, started.tokenizer)
      # a resumed run keeps the records up to its checkpoint; a fresh start (also the restart of
      # a run stopped before its first checkpoint) begins the file again
      startup.truncate_metrics(os.path.join(run_dir, "metrics.jsonl"),
                               started.step if cfg.resume else -1)
    self.writer = metrics_lib.MetricsWriter(run_dir, enabled=primary, tensorboard=cfg.tensorboard,
                                            purge_step=started.step + 1 if cfg.resume else 0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    if primary:
      log.info("%s: %.2fM params, optimizer %s, mesh %s, %d devices, run dir %s", cfg.preset,
               n_params / 1e6, cfg.optimizer, dict(setup.mesh.shape), setup.mesh.size, run_dir)
      if setup.offload_residuals:
        log.info("--fused-update: the blocks' saved inputs are kept in host memory "
                 "(--offload-residuals; --no-offload-residuals keeps them on the device)")
    from tqdm.auto import tqdm  # here, when a run starts: tqdm.auto looks for a notebook front end

    self.bar = tqdm(total=cfg.steps, initial=started.step,
                    disable=not (cfg.progress and primary), unit="step", dynamic_ncols=True)
    self.saved_steps = set(started.checkpointer.all_steps())
    self.batch_sharding = shd.batch_sharding(setup.mesh)
    self.tokens_per_step = cfg.batch_size * cfg.seq_len
    self.monitor = health.DivergenceMonitor(
        lr=cfg.lr, warmup_steps=cfg.resolved_warmup, rank=cfg.rank,
        projector_lr_ratio=cfg.projector_lr_ratio, osd=cfg.optimizer.startswith("osd"))
    self.last_skipped = int(started.state.skipped)
    self.streaks = []  # every step's bad_streak since the last log step (device scalars)
    self.in_flight = None  # the previous step's loss: waiting for it keeps one step queued
    self.t_log, self.steps_since_log, self.paused = None, 0, 0.0  # paused: eval/save time
    # whether the run's length on CPU is still to be estimated (_estimate_length)
    self.to_estimate = primary and setup.mesh.devices.flat[0].platform == "cpu"
    self.windows = getattr(self.train_it, "windows_per_epoch", None)  # embedded/text data
    if self.windows and primary and cfg.steps * cfg.batch_size > self.windows:
      log.warning("warning: --steps %d x --batch-size %d sequences are %.2f epochs of the "
                  "training data (%d windows of %d tokens); later epochs repeat it", cfg.steps,
                  cfg.batch_size, cfg.steps * cfg.batch_size / self.windows, self.windows,
                  cfg.seq_len)

  def say(self, message: str) -> None:
    if self.cfg.progress and self.primary:
      self.bar.write(message)
    elif self.primary:
      log.info(message)

  def next_batch(self, step: int) -> dict:
    """The global batch of train step ``step + 1``."""
    batch = next(self.train_it)
    if self.hooks.on_batch:
      self.hooks.on_batch("train", step + 1, batch)
    return global_batch(batch, self.batch_sharding, self.cfg.batch_size)

  def evaluate(self, step: int, params: Any) -> dict:
    on_batch = self.hooks.on_batch
    result = evaluate(self.setup, params, self.eval_ds, self.cfg.eval_batches,
                      on_batch=on_batch and (lambda batch: on_batch("eval", step, batch)))
    self.writer.write(step, result)
    self.say(f"step {step}: eval loss {result['eval_loss']:.4f}, perplexity "
             f"{result['eval_perplexity']:.2f}")
    return result

  def save(self, step: int, state: step_lib.TrainState, wait: bool = False) -> None:
    if step not in self.saved_steps:
      self.checkpointer.save(step, state, data_state=startup.iter_state(self.train_it),
                             config=self.cfg.to_dict())
      self.saved_steps.add(step)
    if wait:
      self.checkpointer.wait()

  def stepped(self, step: int, metrics: dict) -> None:
    """Bookkeeping after train step ``step`` (no device sync but one step's loss)."""
    self.streaks.append(metrics["bad_streak"])
    if self.in_flight is not None:  # the host runs at most one step ahead of the device, so
      jax.block_until_ready(self.in_flight)  # that a signal stops the run within a step of it
    self.in_flight = metrics["loss"]
    self.steps_since_log += 1
    self.bar.update(1)
    if self.t_log is None:  # the first step compiles: time from its end
      jax.block_until_ready(metrics)
      self.t_log, self.steps_since_log = time.time(), 0
    elif self.to_estimate and self.steps_since_log > 3:
      # the steps up to the previous one are done (the wait above): three timed steps
      done = self.steps_since_log - 1
      self._estimate_length(step, (time.time() - self.t_log - self.paused) / done)

  def _estimate_length(self, step: int, step_time: float) -> None:
    """Once, from the first timed steps on CPU: when the steps left take longer than
    :data:`LONG_CPU_RUN_S`, says how long and which flags shorten the run."""
    self.to_estimate = False
    left = (self.cfg.steps - step) * step_time
    if left > LONG_CPU_RUN_S:
      self.say(f"note: on CPU at {step_time:.2g} s/step, the {self.cfg.steps - step} steps left "
               f"take about {_duration(left)}; for a run of minutes use fewer or smaller steps, "
               f"e.g. the CPU demo's {CPU_DEMO_FLAGS} (make demo, about 3 min)")

  def log(self, step: int, state: step_lib.TrainState, metrics: dict) -> None:
    """Writes the log step's record, warns of divergence and stops (saving) on too many skips."""
    record = self._record(step, metrics)
    if self.to_estimate and "step_time_s" in record:
      self._estimate_length(step, record["step_time_s"])
    self.writer.write(step, record)
    for _, message in self.monitor.check(step, record):
      if self.cfg.stop_on_divergence:
        self.save(step, state, wait=True)
        raise FloatingPointError(f"step {step}: {message}; stopped (checkpoint saved, "
                                 f"--stop-on-divergence)")
      if self.primary:
        log.warning("step %d: warning: %s", step, message)
    self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                         tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
    skipped = int(record["skipped_total"])
    if skipped > self.last_skipped:
      self.say(f"step {step}: skipped {skipped - self.last_skipped} step(s) with non-finite or "
               f"spiking loss/gradients ({skipped} in total)")
      self.last_skipped = skipped
    # the longest streak of skipped steps since the last log step, also one that has ended
    worst, self.streaks = int(np.max(jax.device_get(self.streaks))), []
    if worst >= self.cfg.max_consecutive_skips:
      self.save(step, state, wait=True)
      raise FloatingPointError(
          f"{worst} steps in a row had non-finite or spiking loss; "
          f"stopped at step {step} (checkpoint saved). Lower --lr or check the data.")

  def _record(self, step: int, metrics: dict) -> dict:
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    # the mean loss of the (finite) steps since the last log step, not one batch's
    record["loss"] = record.pop("loss_mean")
    record["tokens_seen"] = step * self.tokens_per_step
    if self.windows:
      record["epochs"] = step * self.cfg.batch_size / self.windows
    now = time.time()
    if self.steps_since_log:
      dt = (now - self.t_log - self.paused) / self.steps_since_log
      record.update(step_time_s=dt, tokens_per_s=self.tokens_per_step / dt)
      mfu = metrics_lib.mfu(self.setup.flops_per_token, self.tokens_per_step / dt,
                            self.setup.mesh.size)
      record["mfu"] = mfu if mfu is not None else "n/a"
    record.update(metrics_lib.memory_stats())
    if step - 1 == 0:
      record.pop("subspace_drift", None)  # P_0 is set at step 0: no drift to report
    self.t_log, self.steps_since_log, self.paused = now, 0, 0.0
    return record

  def report_malformed_lines(self) -> None:
    """How many malformed lines the ``jsonl:`` training stream skipped (since the run began, over
    its resumes); its first one was warned about when it was read."""
    n = getattr(self.train_it, "malformed_lines", 0)
    if n:
      self.say(f"warning: --data {self.cfg.data}: {n} malformed line{'s' if n != 1 else ''} "
               f"skipped in the training data read so far")

  def close(self) -> None:
    self.bar.close()
    self.checkpointer.close()
    self.writer.close()


def _duration(seconds: float) -> str:
  """``"1 h 15 min"``, ``"25 min"``: a duration to the minute."""
  minutes = max(1, round(seconds / 60))
  return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def evaluate(setup: Setup, params: Any, eval_ds: Any, num_batches: int, *,
             on_batch: Callable[[dict], None] | None = None) -> dict:
  """Mean token loss and perplexity over the first ``num_batches`` batches of ``eval_ds``
  (``on_batch``: called with this process's rows of each batch)."""
  sharding = shd.batch_sharding(setup.mesh)
  loss_sum, count = 0.0, 0.0
  it = iter(eval_ds)
  for _ in range(num_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    if on_batch:
      on_batch(batch)
    s, n = setup.eval_step(params, global_batch(batch, sharding, setup.cfg.batch_size))
    loss_sum += float(s)
    count += float(n)
  if count == 0:
    raise ConfigError("the eval split yielded no batch; use a smaller --batch-size or more data")
  loss = loss_sum / count
  return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
