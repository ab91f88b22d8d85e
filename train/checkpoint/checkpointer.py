"""Saving and restoring the train state during training: :class:`Checkpointer` (orbax: async,
atomic, keep-last-K; restored into the current shardings), and the checks that refuse a checkpoint
of another run, layer layout or data stream in one line."""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train import sharding as shd
from train.checkpoint.format import (
    ADDED_FIELDS,
    CheckpointError,
    check_format_version,
    checkpoint_metadata,
    describe_diff,
    quiet_orbax,
    signature,
    unreadable_error,
)

# Config fields that must match for a checkpoint to be restorable into the current run.
STRUCTURAL_KEYS = ("preset", "model_overrides", "param_dtype", "state_dtype", "optimizer", "rank",
                   "project", "projector_optimizer")
# Structural fields newer than some checkpoints: what a checkpoint without them was written with.
_EARLIER_DEFAULTS = {"projector_optimizer": "adam"}
# Structural fields that shape the state of some optimizers only.
_ONLY_FOR = {"projector_optimizer": ("osd_adamw", "osd_lion")}
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


def config_diff(saved: dict, current: dict, keys: tuple[str, ...] = STRUCTURAL_KEYS) -> list[str]:
  """The ``keys`` of two configs that differ, as ``"name: saved in the checkpoint, current
  now"``."""
  def saved_value(k):
    return saved.get(k, _EARLIER_DEFAULTS.get(k))

  return [f"{k}: {saved_value(k)!r} in the checkpoint, {current.get(k)!r} now"
          for k in keys if saved_value(k) != current.get(k)
          and (k not in _ONLY_FOR or current.get("optimizer") in _ONLY_FOR[k])]


def _gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able ``obj``, in process order (a collective when multi-process)."""
  if jax.process_count() == 1:
    return [obj]
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


def _as_saved_fields(abstract_state: Any, version: int):
  """``(target, complete)``: the abstract state without the fields added after ``version``
  (:data:`ADDED_FIELDS`), and a function that adds them, at their initial values, to what is
  restored into it. A state that is not a NamedTuple with such fields is restored as it is."""
  missing = {name: value for v, fields in ADDED_FIELDS.items() if v > version
             for name, value in fields.items()
             if name in getattr(abstract_state, "_fields", ())}
  if not missing:
    return abstract_state, lambda state: state
  names = [f for f in abstract_state._fields if f not in missing]
  saved_type = collections.namedtuple(type(abstract_state).__name__, names)
  target = saved_type(*(getattr(abstract_state, f) for f in names))

  def complete(state):
    values = dict(zip(names, state))
    for name, value in missing.items():
      like = getattr(abstract_state, name)
      values[name] = jax.device_put(np.asarray(value, like.dtype), like.sharding)
    return type(abstract_state)(**values)

  return target, complete


def _mesh_of(tree: Any) -> jax.sharding.Mesh | None:
  """The mesh of the first NamedSharding-sharded array of ``tree``."""
  for x in jax.tree.leaves(tree):
    mesh = getattr(getattr(x, "sharding", None), "mesh", None)
    if isinstance(mesh, jax.sharding.Mesh):
      return mesh
  return None


def _batch_rows(tree: Any, config: dict | None) -> tuple[int, int] | None:
  """The rows of each global batch that this process's devices hold under the mesh of ``tree``
  (:func:`train.sharding.process_batch_rows`), or None when that is not known."""
  mesh = _mesh_of(tree)
  if mesh is None or not (config or {}).get("batch_size"):
    return None
  try:
    return shd.process_batch_rows(mesh, int(config["batch_size"]))
  except ValueError:
    return None


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
           wait: bool = False, data_rows: tuple[int, int] | None = None) -> bool:
    """Starts saving ``state`` at ``step`` (all processes must call it). Returns False if that
    step already exists.

    ``data_rows``: the rows ``[start, stop)`` of every global batch that this process's data
    iterator reads (default: those its devices hold, from the state's mesh and ``config``'s
    ``batch_size``); a resume whose processes read other rows repositions the data by step.
    """
    if step in self.manager.all_steps():
      return False
    data_rows = data_rows if data_rows is not None else _batch_rows(state, config)
    data_states = _gather_json(encode_data_state(data_state))
    data = {"process_count": jax.process_count(), "states": data_states}
    if data_rows is not None:
      data["rows"] = _gather_json([int(r) for r in data_rows])
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config or {}),
        signature=ocp.args.JsonSave(signature(state)),
    )
    saved = self.manager.save(step, args=args, force=True,
                              custom_metadata=checkpoint_metadata(_mesh_of(state)))
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

  def metadata(self, step: int) -> dict:
    """The step's custom metadata (:func:`checkpoint_metadata`; ``{}`` for format version 1)."""
    try:
      # orbax notes, once per item, that reading step metadata restores no item: not news
      with quiet_orbax():
        return dict(self.manager.metadata(step).custom_metadata or {})
    except Exception as e:
      raise unreadable_error(os.path.join(self.directory, str(step)), e) from e

  # long on purpose: the checks, in order, each raise one error line before any array is read
  def restore(self, abstract_state: Any, *, config: dict | None = None,
              step: int | None = None,
              data_rows: tuple[int, int] | None = None) -> tuple[Any, Any, dict]:
    """Restores ``(state, data_state, saved_config)`` at ``step`` (default: latest).

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings: arrays come back
    in exactly those shardings, whatever mesh, device or process count wrote them (orbax reads
    each target shard from the saved ones). Raises CheckpointError when the checkpoint's format
    is newer than this code, or it does not match ``abstract_state``, or the structural or
    data-stream fields of ``config``; nothing is restored then.

    ``data_state`` is this process's saved iterator state, or None when it cannot be used: the
    checkpoint was written by another number of processes, or this process now reads other rows
    ``data_rows`` of each global batch than it did (default: those its devices hold, from
    ``abstract_state``'s mesh and ``config``'s ``batch_size``); the caller then repositions the
    data by step.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {self.directory}")
    where = os.path.join(self.directory, str(step))
    version = check_format_version(self.metadata(step), where)
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), signature=ocp.args.JsonRestore()))
    except Exception as e:
      raise unreadable_error(where, e) from e
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
    target, complete = _as_saved_fields(abstract_state, version)
    current = signature(target)
    if meta["signature"] != current:
      raise CheckpointError(f"checkpoint {where} does not match this model/optimizer: "
                            + describe_diff(meta["signature"], current))
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:
      raise unreadable_error(where, e) from e
    out = {**out, "state": complete(out["state"])}
    data = out["data"] or {}
    states = data.get("states") or [None]
    rows = data.get("rows")  # absent before format version 2: the rows follow from the count
    data_rows = data_rows if data_rows is not None else _batch_rows(abstract_state, config)
    if data.get("process_count", 1) != jax.process_count() or not (
        data_rows is None or rows is None
        or list(rows[jax.process_index()]) == [int(r) for r in data_rows]):
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
