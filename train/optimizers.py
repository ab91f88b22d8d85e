"""Optimizers by name, the learning-rate schedule and the paper's projection rule.

``make_optimizer(cfg, params)`` returns ``(tx, schedule)`` where ``tx`` is
``clip_by_global_norm -> <optimizer>``; skipping of non-finite steps happens in the train step
(:mod:`train.train_step`), which keeps params, optimizer state and projectors unchanged on such
steps.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import osd_jax
from osd_jax.dimension_numbers import is_dimension_numbers_leaf
from train import model as model_lib
from train.config import SUBSPACE_OPTIMIZERS, ConfigError, OptimizerConfig, TrainConfig

# Path components that mark a matrix the paper projects (attention and MLP weights).
PROJECTED_MODULES = ("attention", "attn", "mlp", "feed_forward", "ffn")
# The collection of transformer blocks: ``layers/<i>/...`` (unrolled, one entry per block) or
# ``layers/...`` with a leading axis of size n_layers on every leaf (scanned, train.model).
LAYERS_COLLECTION = "layers"


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Linear warmup to ``lr`` (reached at step ``warmup``), then cosine decay to ``min_lr_ratio*lr``.

  The warmup starts at ``lr/warmup`` rather than 0 so that step 0 already trains; with
  ``--reference-code`` it starts at 0, as the official code's does (step 0 then only fills the
  optimizer's moments).
  """
  opt = cfg.optim
  peak, warmup, total = opt.lr, opt.warmup_steps, cfg.steps
  floor = opt.min_lr_ratio * peak

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    first = 0.0 if opt.reference_code else 1.0
    warm = peak * jnp.minimum(count + first, float(max(warmup, 1))) / max(warmup, 1)
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
    return 0 if model_lib.is_layer_index(after) else 1
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
  flat_specs = jax.tree.leaves(specs, is_leaf=is_dimension_numbers_leaf)
  flat = jax.tree_util.tree_leaves_with_path(params)
  return {path_str(p): (x.shape[s.reduction_axis], x.shape[s.output_axis])
          for (p, x), s in zip(flat, flat_specs) if s is not None}


def _grouped(paths: list[str]) -> list[str]:
  """Paths with the layer index replaced by ``*`` (``layers/*/mlp/w1/kernel``), first-seen order."""
  out: list[str] = []
  for p in paths:
    g = "/".join("*" if part.isdigit() else part for part in p.split("/"))
    if g not in out:
      out.append(g)
  return out


def unprojected_by_rank(params: Any, cfg: TrainConfig) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the matrices the rule selects but ``--rank`` leaves unprojected.

  As in :func:`osd_jax.dimension_numbers.make_layout`, a matrix is projected only when the rank is
  below its smaller side; at ``rank >= min(m, n)`` it gets the inner optimizer at full rank.
  """
  rank = cfg.resolved_rank
  return {p: s for p, s in projected_shapes(params, cfg.project).items() if rank >= min(s)}


def check_rank(params: Any, cfg: TrainConfig) -> list[str]:
  """Raises ConfigError when ``--rank`` projects no matrix; returns a warning (or nothing) naming
  the matrices it leaves unprojected (grouped over layers)."""
  shapes = projected_shapes(params, cfg.project)
  if not shapes:
    raise ConfigError(f"--project {cfg.project} selects no matrix of this model to project")
  rank = cfg.resolved_rank
  full = unprojected_by_rank(params, cfg)
  if len(full) == len(shapes):
    path, shape = max(shapes.items(), key=lambda kv: min(kv[1]))
    raise ConfigError(f"--rank {rank} projects no matrix: a matrix is projected only when the "
                      f"rank is below its smaller side, and the largest smaller side here is "
                      f"{min(shape)} ({path} {shape}); use --rank < {min(shape)} (e.g. "
                      f"{max(1, min(shape) // 4)}) or --optimizer adamw")
  if not full:
    return []
  names = _grouped(list(full))
  smallest = min(min(s) for s in full.values())
  return [(f"--rank {rank} leaves {len(full)} of {len(shapes)} selected matrices unprojected "
           f"(full-rank updates, rank >= their smaller side): {', '.join(names)}; use --rank < "
           f"{smallest} to project them all")]


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not on norms/biases; a scanned norm scale ``[n_layers, dim]``
  is a stack of vectors, not a matrix)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: x.ndim - layer_axes(p) >= 2, params)


def base_optimizer(cfg: TrainConfig, schedule: optax.Schedule, params: Any):
  """The optimizer named by ``cfg.optimizer``, without the gradient clipping in front of it."""
  opt = cfg.optim
  ref = opt.reference_code
  mask = None if ref else decay_mask(params)  # the official code decays every parameter
  adam = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  lion = dict(b1=opt.b1, b2=opt.b2)
  compact = dict(state_dtype=opt.state_dtype, seed=cfg.seed)  # the moments' storage
  # P in 16 bits (with stochastic rounding) next to compact moments: the weights' 16-bit float
  # type (bfloat16 unless they are float16), else float32
  p_dtype = (cfg.param_dtype if cfg.param_dtype == "float16" else "bfloat16"
             ) if cfg.compact_state else None
  if opt.name == "adamw":
    if opt.scale is None:  # optax.adamw, whose moments keep themselves on a skipped step
      return osd_jax.skipping.chain(osd_jax.transforms.scale_by_adam(**adam, **compact),
                                    optax.add_decayed_weights(opt.weight_decay, mask),
                                    optax.scale_by_learning_rate(schedule))
    return _scaled_adamw(opt, cfg.seed, schedule, params, mask, adam)
  if opt.name == "lion":  # optax.lion, as adamw
    return osd_jax.skipping.chain(osd_jax.transforms.scale_by_lion(**lion, **compact),
                                  optax.add_decayed_weights(opt.weight_decay, mask),
                                  optax.scale_by_learning_rate(schedule))
  dims = projection_rule(params, opt.project)
  if opt.name == "galore_adamw":
    return osd_jax.galore_adamw(
        schedule, opt.rank, update_proj_gap=opt.update_proj_gap,
        scale=osd_jax.DEFAULT_SCALE if opt.scale is None else opt.scale,
        weight_decay=opt.weight_decay, weight_dimension_numbers=dims, mask=mask,
        align_signs=None if ref else opt.align_signs, reference_code=ref,
        projector_dtype=p_dtype, **compact, **adam)
  p = opt.projector
  projector = osd_jax.ProjectorOptions(
      lr_ratio=p.lr_ratio, orthogonality_weight=p.orthogonality_weight,
      weight_decay=p.weight_decay, init=p.init, optimizer=p.optimizer, seed=cfg.seed,
      update_proj_gap=opt.update_proj_gap, peak_learning_rate=opt.lr, dtype=p_dtype)
  # scale: osd_jax.DEFAULT_SCALE (0.25) unless --scale is given
  osd = dict(scale=opt.scale, projector=projector, weight_dimension_numbers=dims, mask=mask,
             weight_decay=opt.weight_decay, reference_code=ref, state_dtype=opt.state_dtype)
  if opt.name == "osd_adamw":
    return osd_jax.osd_adamw(schedule, opt.rank, **adam, **osd)
  if opt.name == "osd_lion":
    return osd_jax.osd_lion(schedule, opt.rank, **lion, **osd)
  raise ConfigError(f"unknown --optimizer {opt.name!r}")


def _scaled_adamw(opt: OptimizerConfig, seed: int, schedule: optax.Schedule, params: Any,
                  mask: Any, adam: dict) -> optax.GradientTransformation:
  """AdamW whose direction on the matrices ``--project`` selects is multiplied by ``--scale``:

      W ← W − lr(t)·(scale·m̂/(√v̂ + ε) + λ·W)   (other leaves: scale 1)

  i.e. galore_adamw/osd_adamw's back-projection scale without the projection (their full-rank
  limit). The control for the quality study: does a subspace method win by its subspace or by
  the smaller step on the block matrices (benchmarks/RESULTS.md §4c, §4d)?
  """
  selected = jax.tree.map(lambda d: d is not None, projection_rule(params, opt.project),
                          is_leaf=is_dimension_numbers_leaf)
  return optax.chain(
      osd_jax.transforms.scale_by_adam(**adam, state_dtype=opt.state_dtype, seed=seed),
      optax.masked(optax.scale(opt.scale), selected),
      optax.add_decayed_weights(opt.weight_decay, mask),
      optax.scale_by_learning_rate(schedule))


def make_optimizer(cfg: TrainConfig, params: Any) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
  """The optimizer named by ``cfg.optimizer`` for ``params`` (arrays or ShapeDtypeStructs)."""
  if cfg.optimizer in SUBSPACE_OPTIMIZERS:
    for message in check_rank(params, cfg):
      if jax.process_index() == 0:
        logging.getLogger("train").warning("warning: %s", message)
  schedule = make_schedule(cfg)
  parts = []
  if cfg.optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.optim.grad_clip))
  parts.append(base_optimizer(cfg, schedule, params))
  # a skipped step (train_step's apply_step) leaves the state of every part as it was
  return osd_jax.skipping.chain(*parts), schedule


def is_subspace(cfg: TrainConfig) -> bool:
  return cfg.optimizer in SUBSPACE_OPTIMIZERS


def state_shardings(opt_shapes: Any, param_shardings: Any, mesh) -> Any:
  """Shardings of the optimizer state from the params' (projectors never inherit a wrong axis)."""
  return osd_jax.optimizer_state_sharding(opt_shapes, param_shardings, mesh=mesh)

