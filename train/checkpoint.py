"""Checkpoints with orbax: async, atomic, keep-last-K; restore into the current shardings.

A checkpoint ``RUN_DIR/checkpoints/<step>/`` holds four items:

- ``state``: the :class:`train.train_step.TrainState` (params, full optimizer state including
  projectors and their optimizer state, step, skip counters), written by every process for its
  shards;
- ``data``: every process's data-iterator state (grain ``get_state()``), as JSON;
- ``config``: the run's :class:`train.config.TrainConfig`, as JSON;
- ``signature``: ``{leaf path: "shape dtype"}`` of the state, to explain mismatches before
  restoring.

The step's orbax metadata (``_CHECKPOINT_METADATA``, ``custom_metadata``) holds
:func:`checkpoint_metadata`: the format version (:data:`FORMAT_VERSION`; a checkpoint without one
is version 1) and the topology that wrote it (mesh shape, device and process count).
:func:`load_params` reads the params alone (no optimizer state, no optimizer) onto any mesh, in
either parameter layout (one entry per layer, or the layers stacked on a leading axis).

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact and the partial one is never listed (and is removed
at the next start).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import re
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from train import model as model_lib
from train import sharding as shd
from train.config import TrainConfig
from train.run import build as build_lib

log = logging.getLogger(__name__)

# Config fields that must match for a checkpoint to be restorable into the current run.
STRUCTURAL_KEYS = ("preset", "model_overrides", "param_dtype", "state_dtype", "optimizer", "rank",
                   "project")
# Fields that define the data stream: the checkpoint's data position is a position in that stream.
STREAM_KEYS = ("data", "seq_len", "batch_size", "seed")
# Fields that may change on resume (e.g. more --steps) but change the run: resuming says so.
SCHEDULE_KEYS = ("steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "eps", "grad_clip",
                 "scale", "orthogonality_weight", "projector_lr_ratio", "projector_weight_decay",
                 "update_proj_gap")


#: Version of the checkpoint format this code writes. 1: no version field (up to the first
#: release); 2: ``format_version`` and the writing topology in the step's custom metadata;
#: 3: ``TrainState.grad_norm`` (the fused update clips with the previous step's norm).
FORMAT_VERSION = 3
#: Train-state fields each format version added, and the value an older checkpoint restores them
#: to (grad_norm 0: no clipping at the first fused step after the resume).
ADDED_FIELDS: dict[int, dict[str, float]] = {3: {"grad_norm": 0.0}}
#: The oldest format this code reads.
MIN_FORMAT_VERSION = 1


def layer_layout(config: dict) -> str:
  """``"scanned"`` or ``"unrolled"``: how a run's block params are laid out (``--scan-layers``).
  A config without the field predates scanned layers, whose checkpoints are all unrolled."""
  return "scanned" if config.get("scan_layers", False) else "unrolled"


@contextlib.contextmanager
def _quiet_orbax():
  """Keeps orbax's (absl) warnings below ERROR out of the log while inside."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_log.setLevel(level)


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into this run; the message says what differs."""


def checkpoint_metadata(mesh: jax.sharding.Mesh | None = None) -> dict:
  """The step metadata written with every checkpoint: format version and topology."""
  meta: dict[str, Any] = {"format_version": FORMAT_VERSION,
                          "process_count": jax.process_count()}
  if mesh is not None:
    meta.update(mesh={k: int(v) for k, v in mesh.shape.items()}, device_count=int(mesh.size))
  return meta


def check_format_version(meta: dict | None, where: str) -> int:
  """The format version in a step's metadata (1 when absent); raises CheckpointError for a
  format this code cannot read."""
  version = (meta or {}).get("format_version", 1)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(
        f"checkpoint {where} has format version {version!r}, newer than this code reads "
        f"(versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}); update osd_jax to restore it")
  if version < MIN_FORMAT_VERSION:
    raise CheckpointError(f"checkpoint {where} has format version {version}, older than this "
                          f"code reads (versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION})")
  return version


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
  """The ``keys`` of two configs that differ, as ``"name: saved in the checkpoint, current
  now"``."""
  return [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
          for k in keys if saved.get(k) != current.get(k)]


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


#: tensorstore's status codes (a ValueError's message prefix) for files that are missing,
#: truncated or damaged.
_DATA_STATUS = re.compile(r"^(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND)\b")
#: OSError numbers of a file that is missing or cannot be read back (not: no permission, too
#: many open files, ...); None: an OSError without a number, such as a truncated file's.
_DATA_ERRNOS = (None, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EIO)


def _is_damaged_data(e: BaseException) -> bool:
  """Whether ``e`` (or an exception it was raised from) says the checkpoint's own files are
  missing, truncated or not parseable, as opposed to an error in how they were asked for."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (EOFError, json.JSONDecodeError, UnicodeDecodeError)):
      return True
    if isinstance(e, OSError) and e.errno in _DATA_ERRNOS:
      return True
    if isinstance(e, ValueError) and _DATA_STATUS.match(str(e)):
      return True
    e = e.__cause__ or e.__context__
  return False


def unreadable_error(where: str, e: Exception) -> CheckpointError:
  """The one-line error for a checkpoint that could not be read. Deleting it is suggested only
  when its files are damaged (:func:`_is_damaged_data`): never for an error of ours."""
  first = (str(e).splitlines() or [""])[0]
  first = first if len(first) <= 200 else first[:200] + "..."
  if _is_damaged_data(e):
    return CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first}); "
                           f"its files are damaged: delete it to resume from an earlier one")
  return CheckpointError(f"checkpoint {where} could not be read ({type(e).__name__}: {first}); "
                         f"nothing shows that its files are damaged, so keep it")


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


def describe_topology(meta: dict) -> str:
  """``"mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices, 1 process)"`` from
  :func:`checkpoint_metadata` (a version-1 checkpoint did not record it)."""
  if "mesh" not in meta:
    return "an unrecorded mesh (format version 1)"
  n = meta.get("process_count", 1)
  return (f"mesh {meta['mesh']} ({meta.get('device_count')} devices, {n} "
          f"process{'es' if n != 1 else ''})")


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
      with _quiet_orbax():
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
                            + _describe_diff(meta["signature"], current))
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


# ----------------------------------------------------------------------------- params only

_ITEM_HANDLERS = ("state", "data", "config", "signature")


def load_run_config(run_dir: str):
  """The :class:`train.config.TrainConfig` of the run in ``run_dir`` (its ``config.json``)."""
  path = os.path.join(run_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      return TrainConfig.from_dict(json.load(f))
  except OSError as e:
    raise CheckpointError(f"{path}: cannot read the run's config ({e}); is {run_dir} a run "
                          f"directory of python -m train?") from None
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: not a config of this version of train ({e})") from None


def _open_read_only(run_dir: str):
  """``(config, checkpoint dir, read-only CheckpointManager)`` of a run: nothing is created,
  cleaned up or deleted, so a live run's saves are safe."""
  cfg = load_run_config(run_dir)
  # orbax takes absolute paths only; a relative --ckpt-dir (config.json before it was stored
  # absolute) is relative to the working directory, as the trainer read it
  ckpt_dir = cfg.ckpt_dir or os.path.join(run_dir, "checkpoints")
  ckpt_dir = ckpt_dir if "://" in ckpt_dir else os.path.abspath(ckpt_dir)
  if "://" not in ckpt_dir and not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"no checkpoint directory {ckpt_dir}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0,
                                         max_to_keep=None)
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "config": ocp.JsonCheckpointHandler(), "signature": ocp.JsonCheckpointHandler()}
  with _quiet_orbax():  # orbax warns that the directory is read only
    manager = ocp.CheckpointManager(ckpt_dir, options=options, item_handlers=handlers)
  return cfg, ckpt_dir, manager


def _pick_step(manager, ckpt_dir: str, step: int | None) -> int:
  steps = list(manager.all_steps())
  if not steps:
    raise CheckpointError(f"no committed checkpoint in {ckpt_dir}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {ckpt_dir}; it holds steps "
                          f"{sorted(steps)}")
  return step


def _layers_unrolled(layers: Any) -> bool:
  """True for the layout with one subtree per layer (keys 0, 1, ...), False for the scanned one
  (each leaf stacked over layers on a leading axis)."""
  return isinstance(layers, dict) and bool(layers) and all(str(k).isdigit() for k in layers)


def params_layout(params: Any) -> str:
  """``"unrolled"`` (``layers/<i>/...``) or ``"scanned"`` (``layers/...`` with a leading layer
  axis) for a params tree (arrays, ShapeDtypeStructs or orbax metadata)."""
  layers = params.get("layers") if isinstance(params, dict) else None
  return "unrolled" if layers is None or _layers_unrolled(layers) else "scanned"


def _spec_of(x: Any) -> jax.sharding.PartitionSpec:
  return getattr(x.sharding, "spec", jax.sharding.PartitionSpec())


def _abstract(shape, dtype, mesh, spec) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype,
                              sharding=jax.sharding.NamedSharding(mesh, spec))


def _as_saved_layout(target: Any, saved_layout: str, mesh) -> Any:
  """``target`` (abstract params with shardings) rewritten into ``saved_layout``: the unrolled
  layer ``i`` is slice ``i`` of the scanned leaves; a scanned leaf is its layers stacked (the
  stacked axis unsharded)."""
  if params_layout(target) == saved_layout:
    return target
  out = dict(target)
  layers = target["layers"]
  if saved_layout == "scanned":  # target unrolled
    subs = [layers[k] for k in sorted(layers, key=int)]
    out["layers"] = jax.tree.map(
        lambda x, *_: _abstract((len(subs),) + tuple(x.shape), x.dtype, mesh,
                                jax.sharding.PartitionSpec(None, *_spec_of(x))), *subs)
  else:  # target scanned, saved unrolled
    n = jax.tree.leaves(layers)[0].shape[0]
    one = jax.tree.map(
        lambda x: _abstract(x.shape[1:], x.dtype, mesh,
                            jax.sharding.PartitionSpec(*_spec_of(x)[1:])),
        layers)
    out["layers"] = {i: one for i in range(n)}
  return out


def _to_target_layout(params: Any, target: Any) -> Any:
  """Restored ``params`` in ``target``'s layout and shardings (a jitted stack or unstack)."""
  if params_layout(params) == params_layout(target):
    return params
  shardings = jax.tree.map(lambda x: x.sharding, target)

  def convert(p):
    out = dict(p)
    layers = p["layers"]
    if _layers_unrolled(layers):
      subs = [layers[k] for k in sorted(layers, key=lambda k: int(k))]
      out["layers"] = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *subs)
    else:
      n = jax.tree.leaves(layers)[0].shape[0]
      out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}
    return out

  return jax.jit(convert, out_shardings=shardings)(params)


def _keys_as_target(tree: Any, target: Any) -> Any:
  """``tree`` (orbax metadata: string keys) with ``target``'s dict keys (e.g. int layer keys)."""
  if not isinstance(target, dict):
    return tree
  by_str = {str(k): k for k in target}
  return {by_str.get(str(k), k): _keys_as_target(v, target.get(by_str.get(str(k), k)))
          for k, v in tree.items()}


def load_model_config(run_dir: str, step: int | None = None):
  """The :class:`train.model.LlamaConfig` of a run's checkpoint (its vocabulary from the saved
  embedding, so no tokenizer is needed)."""
  _, ckpt_dir, manager = _open_read_only(run_dir)
  try:
    step = _pick_step(manager, ckpt_dir, step)
    saved_cfg, saved_params = _saved_config_and_params(manager, ckpt_dir, step)
  finally:
    manager.close()
  return _model_config(saved_cfg, saved_params)


def _saved_config_and_params(manager, ckpt_dir: str, step: int):
  where = os.path.join(ckpt_dir, str(step))
  try:
    meta = dict(manager.metadata(step).custom_metadata or {})
  except Exception as e:
    raise unreadable_error(where, e) from e
  check_format_version(meta, where)
  try:
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    tree = manager.item_metadata(step)["state"]
    tree = tree.tree if hasattr(tree, "tree") else tree
  except Exception as e:
    raise unreadable_error(where, e) from e
  if not isinstance(tree, dict) or "params" not in tree:
    raise CheckpointError(f"checkpoint {where} holds no params")
  try:
    cfg = TrainConfig.from_dict(dict(saved["config"] or {}))
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"checkpoint {where}: its config is not one of this version of train "
                          f"({e})") from None
  return cfg, tree["params"]


def _model_config(cfg, saved_params: Any):
  vocab = int(saved_params["embed"]["embedding"].shape[0])
  return build_lib.model_config(cfg, vocab)


def abstract_params(model_config, mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """``(graphdef, params)`` of ``Llama(model_config)``: params as a pure dict of
  ShapeDtypeStructs sharded on ``mesh`` by the trainer's logical-axis rules."""
  abstract_model = nnx.eval_shape(lambda: model_lib.Llama(model_config, rngs=nnx.Rngs(0)))
  graphdef, abs_params = nnx.split(abstract_model, nnx.Param)
  shardings = shd.named(mesh, shd.param_specs(abs_params, mesh))
  abs_params = nnx.to_pure_dict(abs_params)
  return graphdef, jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                abs_params, shardings)


def load_params(run_dir: str, step: int | None = None,
                mesh: jax.sharding.Mesh | None = None) -> Any:
  """The params of a run's checkpoint, alone: no optimizer state is read, no optimizer built.

  Args:
    run_dir: a run directory of ``python -m train`` (its ``config.json`` names the checkpoint
      directory).
    step: the checkpoint's step (default: the latest committed one).
    mesh: where to put them (default: every device on the ``fsdp`` axis); they are sharded by
      the trainer's logical-axis rules on it, whatever mesh, device or process count saved them.
      Multi-process, every process calls this.

  Returns:
    The params as the trainer holds them (``TrainState.params``): a pure dict in the layout of
    the model that the run's config builds now. A checkpoint in the other layout (one subtree per
    layer vs. the layers stacked on a leading axis) is read in its own layout and converted.

  Raises:
    CheckpointError: no such run or step, a format newer than this code, or params that do not
      fit the run's model.

  Example::

    params = load_params("runs/my-run")  # or, with the model definition:
    loaded = load_model("runs/my-run")
    model = flax.nnx.merge(loaded.graphdef, loaded.params)
  """
  return load_model(run_dir, step, mesh).params


class LoadedModel(NamedTuple):
  """What :func:`load_model` returns."""

  params: Any  # as load_params returns them
  graphdef: Any  # nnx.merge(graphdef, params) is the Llama
  model_config: Any  # train.model.LlamaConfig
  config: Any  # the train.config.TrainConfig saved with the checkpoint
  step: int


def load_model(run_dir: str, step: int | None = None,
               mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """:func:`load_params` with the model definition and configs that go with them."""
  _, ckpt_dir, manager = _open_read_only(run_dir)
  try:
    step = _pick_step(manager, ckpt_dir, step)
    where = os.path.join(ckpt_dir, str(step))
    saved_cfg, saved_params = _saved_config_and_params(manager, ckpt_dir, step)
    mesh = mesh if mesh is not None else shd.make_mesh("fsdp=-1")
    mcfg = _model_config(saved_cfg, saved_params)
    graphdef, target = abstract_params(mcfg, mesh)
    params = _restore_params(manager, step, where, saved_params, target, mesh)
  finally:
    manager.close()
  return LoadedModel(params, graphdef, mcfg, saved_cfg, step)


def _restore_params(manager, step: int, where: str, saved_params: Any, target: Any,
                    mesh: jax.sharding.Mesh) -> Any:
  """Reads the params of ``step`` into ``target``'s layout and shardings (partial restore)."""
  read = _as_saved_layout(target, params_layout(saved_params), mesh)
  saved_sig = signature(_keys_as_target(saved_params, read))
  if saved_sig != signature(read):
    raise CheckpointError(f"checkpoint {where} does not match the run's model: "
                          + _describe_diff(saved_sig, signature(read)))
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
      read)
  try:
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": read}, restore_args={"params": restore_args}, partial_restore=True)))
  except Exception as e:
    raise unreadable_error(where, e) from e
  params = _keys_as_target(out["state"]["params"], read)
  return _to_target_layout(params, target)
