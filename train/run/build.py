"""What a run is made of, before any array is allocated: ``build(cfg, vocab_size) -> Setup``
(mesh, model definition, optimizer, shardings and the jitted train/eval steps)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

import osd_jax
from train import model as model_lib
from train import optimizers, xla_cpu
from train import sharding as shd
from train import train_step as step_lib
from train.config import ConfigError, TrainConfig, model_config
from train.run import preflight


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
  #: whether the fused step keeps the remat residuals in host memory (--offload-residuals, resolved)
  offload_residuals: bool = False

  def init_state(self, params: Any = None) -> step_lib.TrainState:
    """Fresh params (seeded by ``cfg.seed``) and optimizer state, created directly sharded; with
    ``params`` (host arrays shaped like ``abstract_state.params``) the optimizer starts there."""
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
  step_options = dict(loss_spike_factor=cfg.loss_spike_factor,
                      subspace_metrics=optimizers.is_subspace(cfg), metrics_every=cfg.log_every,
                      last_step=cfg.steps, energy_metrics=cfg.resolved_energy_metric,
                      stochastic_rounding=cfg.resolved_stochastic_rounding, seed=cfg.seed,
                      loss_chunk=cfg.resolved_loss_chunk)
  offload = cfg.resolved_offload_residuals(mesh.devices.flat[0].platform, mcfg.remat)
  if cfg.fused_update:
    from train import fused_update

    try:
      train_step = fused_update.make_fused_train_step(
          graphdef, optimizers.base_optimizer(cfg, schedule, abs_params), schedule, mesh,
          state_shardings, abs_params, grad_clip=cfg.grad_clip,
          exact_clip=cfg.fused_clip == "exact",
          offload_residuals=offload,
          by_halves=mcfg.remat == "full",
          **step_options)
    except osd_jax.separability.NotSeparableError as e:
      raise ConfigError(f"--fused-update: {e}") from None
  else:
    train_step = step_lib.make_train_step(graphdef, tx, schedule, mesh, state_shardings,
                                          grad_accum=cfg.grad_accum, **step_options)
  eval_step = step_lib.make_eval_step(graphdef, mesh, param_shardings, grad_accum=cfg.grad_accum,
                                      loss_chunk=cfg.resolved_loss_chunk)
  return Setup(cfg, mesh, mcfg, graphdef, tx, schedule, param_shardings, state_shardings,
               abstract, train_step, eval_step,
               float(model_lib.flops_per_token(mcfg, cfg.seq_len)), offload)
