"""Read-only loading of a run's checkpoint, without its optimizer: :func:`load_params`,
:func:`load_model`, :func:`load_model_config`, :func:`load_run_config`. Nothing in the run
directory is created, cleaned up or deleted, so a live run's saves are safe; the params come back
in the layout of the model the run's config builds now, whatever layout saved them."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import nnx

from train import model as model_lib
from train import sharding as shd
from train.checkpoint.format import (
    CheckpointError,
    check_format_version,
    describe_diff,
    quiet_orbax,
    signature,
    unreadable_error,
)
from train.config import TrainConfig, model_config
from train.model import params_layout


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
  with quiet_orbax():  # orbax warns that the directory is read only
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
  convert = (model_lib.stack_layers if params_layout(params) == "unrolled"
             else model_lib.unstack_layers)
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
  return model_config(cfg, vocab)


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
  try:
    saved_layout = params_layout(saved_params)
  except ValueError as e:
    raise CheckpointError(f"checkpoint {where}: {e}") from None
  read = _as_saved_layout(target, saved_layout, mesh)
  saved_sig = signature(_keys_as_target(saved_params, read))
  if saved_sig != signature(read):
    raise CheckpointError(f"checkpoint {where} does not match the run's model: "
                          + describe_diff(saved_sig, signature(read)))
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
