"""Optimizers by name, the learning-rate schedule and the paper's projection rule.

``make_optimizer(cfg, params)`` returns ``(tx, schedule)`` where ``tx`` is
``clip_by_global_norm -> <optimizer>``; skipping of non-finite steps happens in the train step
(:mod:`train.train_step`), which keeps params, optimizer state and projectors unchanged on such
steps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import osd_jax
from train.config import SUBSPACE_OPTIMIZERS, ConfigError, TrainConfig

# Path components that mark a matrix the paper projects (attention and MLP weights).
PROJECTED_MODULES = ("attention", "attn", "mlp", "feed_forward", "ffn")
# The collection of transformer blocks: ``layers/<i>/...`` (unrolled, one entry per block) or
# ``layers/...`` with a leading axis of size n_layers on every leaf (scanned, train.model).
LAYERS_COLLECTION = "layers"


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr`` (reached at step ``warmup``), then cosine decay to ``min_lr_ratio*lr``.

  The warmup starts at ``lr/warmup`` rather than 0 so that step 0 already trains.
  """
  peak, warmup, total = cfg.lr, cfg.resolved_warmup, cfg.steps
  floor = cfg.min_lr_ratio * peak

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak * jnp.minimum(count + 1.0, float(max(warmup, 1))) / max(warmup, 1)
    progress = jnp.clip((count - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def _path_names(path) -> list[str]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
  return out


def path_str(path) -> str:
  return "/".join(_path_names(path))


def layer_axes(path) -> int:
  """Leading axes of a leaf that stack blocks: 1 under a scanned ``layers`` collection (the
  component after ``layers`` is not a block index), else 0."""
  names = _path_names(path)
  if LAYERS_COLLECTION in names[:-1]:
    after = names[names.index(LAYERS_COLLECTION) + 1]
    return 0 if after.isdigit() else 1
  return 0


def projection_rule(params: Any, rule: str = "attn_mlp") -> Any:
  """Params-shaped tree of ``osd_jax.DimensionNumbers`` (projected) or None (full-rank AdamW).

  ``attn_mlp`` (the paper): kernels under an attention or MLP module; the input axis is the
  reduction axis. ``all``: every matrix. A matrix is a 2-D leaf, or a 3-D leaf of scanned layers
  ``[n_layers, d_in, d_out]`` whose leading ``layers`` axis is a batch axis: each layer's matrix
  gets its own projector (stacked, ``[n_layers, s, r]``), and the update is one batched program
  whatever the depth.
  """

  def spec(path, x):
    stack = layer_axes(path)
    if x.ndim != 2 + stack:
      return None
    names = [n.lower() for n in _path_names(path)]
    if rule == "all" or any(n in PROJECTED_MODULES for n in names):
      return osd_jax.DimensionNumbers(reduction_axis=stack, output_axis=stack + 1)
    return None

  return jax.tree_util.tree_map_with_path(spec, params)


def projected_shapes(params: Any, rule: str) -> dict[str, tuple[int, ...]]:
  """``{path: (d_in, d_out)}`` of the matrices the rule projects (per layer for scanned layers)."""
  specs = projection_rule(params, rule)
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: x is None or isinstance(
      x, osd_jax.DimensionNumbers))
  flat = jax.tree_util.tree_leaves_with_path(params)
  return {path_str(p): (x.shape[s.reduction_axis], x.shape[s.output_axis])
          for (p, x), s in zip(flat, flat_specs) if s is not None}


def check_rank(params: Any, cfg: TrainConfig) -> None:
  """Raises ConfigError when ``--rank`` exceeds a projected matrix's smaller dimension."""
  shapes = projected_shapes(params, cfg.project)
  if not shapes:
    raise ConfigError(f"--project {cfg.project} selects no matrix of this model to project")
  path, shape = min(shapes.items(), key=lambda kv: min(kv[1]))
  if cfg.rank > min(shape):
    raise ConfigError(f"--rank {cfg.rank} is larger than the smaller dimension of {path} "
                      f"{shape}; use --rank <= {min(shape)}")


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on norms/biases; a scanned norm scale ``[n_layers, dim]``
  is a stack of vectors, not a matrix)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim - layer_axes(p) >= 2, params)


def _base_optimizer(cfg: TrainConfig, schedule: optax.Schedule, params: Any):
  name = cfg.optimizer
  mask = decay_mask(params)
  adam = dict(b1=0.9 if cfg.b1 is None else cfg.b1, b2=0.999 if cfg.b2 is None else cfg.b2,
              eps=cfg.eps)
  lion = dict(b1=0.9 if cfg.b1 is None else cfg.b1, b2=0.99 if cfg.b2 is None else cfg.b2)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=mask, **adam)
  if name == "lion":
    return optax.lion(schedule, weight_decay=cfg.weight_decay, mask=mask, **lion)
  dims = projection_rule(params, cfg.project)
  if name == "galore_adamw":
    return osd_jax.galore_adamw(
        schedule, cfg.rank, update_proj_gap=cfg.update_proj_gap,
        scale=0.25 if cfg.scale is None else cfg.scale, weight_decay=cfg.weight_decay,
        weight_dimension_numbers=dims, mask=mask, seed=cfg.seed, **adam)
  osd = dict(scale=1.0 if cfg.scale is None else cfg.scale,
             orthogonality_weight=cfg.orthogonality_weight,
             projector_lr_ratio=cfg.projector_lr_ratio,
             projector_weight_decay=cfg.projector_weight_decay,
             projector_init=cfg.projector_init, weight_dimension_numbers=dims, mask=mask,
             weight_decay=cfg.weight_decay, seed=cfg.seed)
  if name == "osd_adamw":
    return osd_jax.osd_adamw(schedule, cfg.rank, **adam, **osd)
  if name == "osd_lion":
    return osd_jax.osd_lion(schedule, cfg.rank, **lion, **osd)
  raise ConfigError(f"unknown --optimizer {name!r}")


def make_optimizer(cfg: TrainConfig, params: Any) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """The optimizer named by ``cfg.optimizer`` for ``params`` (arrays or ShapeDtypeStructs)."""
  if cfg.optimizer in SUBSPACE_OPTIMIZERS:
    check_rank(params, cfg)
  schedule = make_schedule(cfg)
  parts = []
  if cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(_base_optimizer(cfg, schedule, params))
  return optax.chain(*parts), schedule


def is_subspace(cfg: TrainConfig) -> bool:
  return cfg.optimizer in SUBSPACE_OPTIMIZERS


def state_shardings(opt_shapes: Any, param_shardings: Any, mesh) -> Any:
  """Shardings of the optimizer state from the params' (projectors never inherit a wrong axis)."""
  return osd_jax.optimizer_state_sharding(opt_shapes, param_shardings, mesh=mesh)

