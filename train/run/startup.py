"""Starting a run: the resolved config, its run directory and files, and ``start`` (model,
optimizer, data and checkpointer, restored from the latest checkpoint when resuming)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
from etils import epath

from train import checkpoint as ckpt_lib
from train import train_step as step_lib
from train.config import ConfigError, TrainConfig, validate
from train.data import inputs
from train.interop import hf
from train.run import build as build_lib
from train.run import metrics as metrics_lib
from train.run import rundir as rundir_lib
from train.run.launch import maybe_initialize_distributed

log = logging.getLogger("train")


class Started(NamedTuple):
  """What :func:`start` returns: everything the training loop begins from."""

  setup: build_lib.Setup
  state: step_lib.TrainState  # fresh, or restored from the checkpoint at ``step``
  step: int  # the step the loop continues from (0 for a fresh run)
  train_it: Iterator  # this process's training batches, positioned at ``step``
  eval_ds: Any
  tokenizer: Any
  checkpointer: ckpt_lib.Checkpointer


# ----------------------------------------------------------------------------- run directory


def default_run_dir(cfg: TrainConfig) -> str:
  if jax.process_count() > 1:
    raise ConfigError("multi-process runs need an explicit --run-dir (shared by all processes)")
  return rundir_lib.default_run_dir(cfg)


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, rundir_lib.RunDirLock | None]:
  """The run's configuration, resolved once, and the lock on its run directory.

  In order: validates the flags; starts ``jax.distributed`` when the environment asks for it;
  makes the run and checkpoint directories absolute (so that ``config.json`` continues the run
  from any working directory) and locks the run directory on process 0; fills in
  ``--init-from``'s architecture and tokenizer and the rank used (``config.json`` and the
  checkpoints hold it); decides ``--auto-resume`` from the committed checkpoints and refuses
  ``--resume`` without one, or a fresh start over one. Returns the config, which nothing changes
  afterwards (a frozen dataclass), and the lock (``None`` on other processes), released again
  when resolving fails.
  """
  validate(cfg)
  maybe_initialize_distributed(cfg)
  run_dir = os.path.abspath(cfg.run_dir or default_run_dir(cfg))
  ckpt_dir = cfg.ckpt_dir
  if ckpt_dir is not None and "://" not in ckpt_dir:
    ckpt_dir = os.path.abspath(ckpt_dir)
  cfg = cfg.replace(run_dir=run_dir, ckpt_dir=ckpt_dir)
  lock = rundir_lib.RunDirLock(run_dir) if jax.process_index() == 0 else None
  try:
    cfg = hf.resolve_init_from(cfg)  # the HF directory's architecture and tokenizer
    cfg = cfg.replace(rank=cfg.resolved_rank)
    return _decide_resume(cfg, committed_steps(cfg.checkpoint_dir)), lock
  except BaseException:
    if lock is not None:
      lock.release(clean=True)
    raise


def committed_steps(ckpt_dir: str) -> list[int]:
  """The steps of the committed checkpoints in ``ckpt_dir`` (none when it does not exist): a save
  cut short (orbax's temporary directory, an uncommitted GCS step) is not one."""
  if not epath.Path(ckpt_dir).exists():
    return []
  with ckpt_lib.Checkpointer(ckpt_dir) as checkpointer:
    return checkpointer.all_steps()


def truncate_metrics(path: str, last_step: int) -> None:
  """Drops records past ``last_step`` (written before a crash) so a resumed run appends cleanly
  (``last_step=-1``: all of them)."""
  if not os.path.isfile(path):
    return
  keep = [r for r in metrics_lib.read_jsonl(path) if r.get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(metrics_lib.json.dumps(r) + "\n" for r in keep)
  os.replace(tmp, path)


def save_run_files(run_dir: str, cfg: TrainConfig, tokenizer) -> None:
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    # the run's flags, to repeat it (`--config`); whether this start resumed is not one of them
    f.write(cfg.replace(resume=False).to_json() + "\n")
  dst = os.path.join(run_dir, "tokenizer.model")
  if not os.path.exists(dst):
    with open(dst, "wb") as f:
      f.write(tokenizer.serialized_model())


# ----------------------------------------------------------------------------- start or resume


def start(cfg: TrainConfig, tokenizer: Any, devices: Any) -> Started:
  """Builds the model, optimizer and data and restores the latest checkpoint when resuming.

  ``cfg`` is :func:`resolve`'s. Bad flags or data raise before anything is written (a missing
  checkpoint directory is only created once the run starts).
  """
  checkpointer = None
  try:
    tokenizer = tokenizer or inputs.load_tokenizer(cfg)
    try:
      setup = build_lib.build(cfg, tokenizer.vocab_size, devices=devices)
    except ValueError as e:  # e.g. the optimizer rejecting a flag value
      raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from None
    train_ds, eval_ds = inputs.make_datasets(cfg, tokenizer, setup.mesh)
    train_it: Iterator = iter(train_ds)
    if hasattr(train_ds, "windows_per_epoch"):  # embedded/text: for the epochs metric
      train_it.windows_per_epoch = train_ds.windows_per_epoch
    checkpointer = ckpt_lib.Checkpointer(cfg.checkpoint_dir, keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpoint)
    if not cfg.resume:
      params = init_from(cfg, setup) if cfg.init_from else None
      return Started(setup, setup.init_state(params), 0, train_it, eval_ds, tokenizer,
                     checkpointer)
    state, saved = _restore(cfg, setup, checkpointer, train_it)
  except BaseException:
    if checkpointer is not None:
      checkpointer.close()
    raise
  changed = ckpt_lib.config_diff(saved, cfg.to_dict(), ckpt_lib.SCHEDULE_KEYS)
  if changed and jax.process_index() == 0:
    log.warning("resuming with changed settings (the run continues under the new ones): %s",
                "; ".join(changed))
  return Started(setup, state, int(state.step), train_it, eval_ds, tokenizer, checkpointer)


def _decide_resume(cfg: TrainConfig, steps: list[int]) -> TrainConfig:
  """``cfg`` with ``resume`` decided (``--auto-resume``) from the committed ``steps``; a mismatch
  raises."""
  if cfg.auto_resume:
    cfg = cfg.replace(resume=bool(steps))
  if cfg.resume and not steps:
    raise ConfigError(f"--resume: no checkpoints in {cfg.checkpoint_dir}")
  if not cfg.resume and steps:
    raise ConfigError(f"{cfg.checkpoint_dir} already holds checkpoints; add --resume (or "
                      f"--auto-resume) to continue that run or choose a new --run-dir")
  return cfg


def _restore(cfg: TrainConfig, setup: build_lib.Setup, checkpointer: Any,
             train_it: Any) -> tuple[step_lib.TrainState, dict]:
  """The latest checkpoint's state (and the config it saved); ``train_it`` moved to its step."""
  state, data_state, saved = checkpointer.restore(setup.abstract_state, config=cfg.to_dict())
  step = int(state.step)
  if data_state is not None:
    train_it.set_state(data_state)
  else:  # this process reads other rows of each global batch than the saver (another mesh or
    # process count; params and optimizer state came back resharded): go to global batch `step`
    from train.data import pipeline  # grain: not installed on every Python (pyproject.toml)

    try:
      pipeline.seek(train_it, step, cfg.data)
    except ValueError as e:
      raise ckpt_lib.CheckpointError(str(e)) from None
  log_resume(checkpointer.metadata(step), setup.mesh, step, data_state is None)
  return state, saved


def init_from(cfg: TrainConfig, setup: build_lib.Setup) -> Any:
  """The params of ``--init-from`` (host arrays in this run's param layout and dtype)."""
  try:
    return hf.load_params(cfg.init_from, setup.abstract_state.params)
  except (hf.HFError, OSError) as e:
    raise ConfigError(f"--init-from {cfg.init_from}: {e}") from None


def iter_state(it: Any) -> Any:
  """The iterator's resumable position (``None`` for one without)."""
  return it.get_state() if hasattr(it, "get_state") else None


def log_resume(saved: dict, mesh: jax.sharding.Mesh, step: int, repositioned: bool) -> None:
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
