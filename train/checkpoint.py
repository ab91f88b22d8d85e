"""Checkpoints with orbax: async, atomic, keep-last-K; restore into the current shardings.

A checkpoint ``RUN_DIR/checkpoints/<step>/`` holds four items:

- ``state``: the :class:`train.train_step.TrainState` (params, full optimizer state including
  projectors and their optimizer state, step, skip counters), written by every process for its
  shards;
- ``data``: every process's data-iterator state (grain ``get_state()``), as JSON;
- ``config``: the run's :class:`train.config.TrainConfig`, as JSON;
- ``signature``: ``{leaf path: "shape dtype"}`` of the state, to explain mismatches before
  restoring.

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact and the partial one is never listed (and is removed
at the next start).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Config fields that must match for a checkpoint to be restorable into the current run.
STRUCTURAL_KEYS = ("preset", "model_overrides", "param_dtype", "optimizer", "rank", "project")
# Fields that define the data stream: the checkpoint's data position is a position in that stream.
STREAM_KEYS = ("data", "seq_len", "batch_size", "seed")
# Fields that may change on resume (e.g. more --steps) but change the run: resuming says so.
SCHEDULE_KEYS = ("steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "eps", "grad_clip",
                 "scale", "orthogonality_weight", "projector_lr_ratio", "projector_weight_decay",
                 "update_proj_gap")


def layer_layout(config: dict) -> str:
  """``"scanned"`` or ``"unrolled"``: how a run's block params are laid out (``--scan-layers``).
  A config without the field predates scanned layers, whose checkpoints are all unrolled."""
  return "scanned" if config.get("scan_layers", False) else "unrolled"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message says what differs."""


def signature(tree: Any) -> dict[str, str]:
  """``{path: "shape dtype"}`` for every array leaf of ``tree``."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): f"{tuple(x.shape)} {np.dtype(x.dtype).name}" for p, x in flat}


def _describe_diff(saved: dict[str, str], current: dict[str, str], limit: int = 3) -> str:
  lines = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if a != b:
      lines.append(f"{k}: checkpoint {a or 'missing'} vs this run {b or 'missing'}")
  more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def config_diff(saved: dict, current: dict, keys: tuple[str, ...] = STRUCTURAL_KEYS) -> list[str]:
  """The ``keys`` of two configs that differ, as ``"name: saved in the checkpoint, current now"``."""
  return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
          for k in keys if saved.get(k) != current.get(k)]


def _gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (a collective when multi-process)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[: raw.size] = raw
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[: int(n)]).decode())
          for row, n in zip(gathered, np.asarray(sizes).reshape(-1))]


def encode_data_state(state: Any) -> Any:
  """Makes a data-iterator state JSON-able (grain returns bytes or a dict)."""
  if isinstance(state, bytes):
    return {"__bytes__": state.decode("utf-8", errors="surrogateescape")}
  return state


def decode_data_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return state["__bytes__"].encode("utf-8", errors="surrogateescape")
  return state


def _unreadable(where: str, e: Exception) -> CheckpointError:
  first = (str(e).splitlines() or [""])[0]
  first = first if len(first) <= 200 else first[:200] + "..."
  return CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first}); "
                         f"delete it to resume from an earlier one")


class Checkpointer:
  """Saves and restores training checkpoints under ``directory``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=("state", "data", "config", "signature"))
    # Orbax removes what interrupted saves left behind in a background thread, which close()
    # does not wait for. Finish it here, so that two checkpointers opened one after the other
    # (a failed start, then a restart) never delete the same directory at once.
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()

  # ------------------------------------------------------------------ save
  def save(self, step: int, state: Any, *, data_state: Any = None, config: dict | None = None,
           wait: bool = False) -> bool:
    """Starts saving ``state`` at ``step`` (all processes must call it). Returns False if that
    step already exists."""
    if step in self.manager.all_steps():
      return False
    data_states = _gather_json(encode_data_state(data_state))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"process_count": jax.process_count(), "states": data_states}),
        config=ocp.args.JsonSave(config or {}),
        signature=ocp.args.JsonSave(signature(state)),
    )
    saved = self.manager.save(step, args=args, force=True)
    if wait:
      self.wait()
    return saved

  def wait(self) -> None:
    """Blocks until background saves are committed."""
    self.manager.wait_until_finished()

  # ------------------------------------------------------------------ restore
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, abstract_state: Any, *, config: dict | None = None,
              step: int | None = None) -> tuple[Any, Any, dict]:
    """Restores ``(state, data_state, saved_config)`` at ``step`` (default: latest).

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings: arrays come back
    in exactly those shardings. Raises CheckpointError when the checkpoint does not match
    ``abstract_state``, or the structural or data-stream fields of ``config``; nothing is
    restored then.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    where = os.path.join(self.directory, str(step))
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), signature=ocp.args.JsonRestore()))
    except Exception as e:
      raise _unreadable(where, e) from e
    saved_config = dict(meta["config"] or {})
    if config is not None and layer_layout(saved_config) != layer_layout(config):
      saved_layout = layer_layout(saved_config)
      flag = "--scan-layers" if saved_layout == "scanned" else "--no-scan-layers"
      raise CheckpointError(
          f"checkpoint {where} holds {saved_layout} layers, this run uses "
          f"{layer_layout(config)} layers (--scan-layers); resume with {flag}, the layout the "
          f"checkpoint was saved with")
    if config is not None:
      diffs = config_diff(saved_config, config)
      if diffs:
        raise CheckpointError(f"checkpoint {where} was made by a different run: "
                              + "; ".join(diffs))
      diffs = config_diff(saved_config, config, STREAM_KEYS)
      if diffs:
        raise CheckpointError(
            f"checkpoint {where} holds a position in another data stream: " + "; ".join(diffs)
            + ". Resume with the run's own flags: --config RUN_DIR/config.json --resume")
    current = signature(abstract_state)
    if meta["signature"] != current:
      raise CheckpointError(f"checkpoint {where} does not match this model/optimizer: "
                            + _describe_diff(meta["signature"], current))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise _unreadable(where, e) from e
    data = out["data"] or {}
    states = data.get("states") or [None]
    if data.get("process_count", 1) != jax.process_count():
      log.warning("checkpoint was written by %s processes, now %s: the data iterator "
                  "restarts from its position by step count", data.get("process_count"),
                  jax.process_count())
      data_state = None
    else:
      data_state = decode_data_state(states[jax.process_index()])
    return out["state"], data_state, saved_config

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
