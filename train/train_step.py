"""The jitted train and eval steps.

The train state is a plain pytree (:class:`TrainState`) so that ``jax.jit`` shardings, donation and
orbax checkpoints all see the same structure. One train step:

1. splits the global batch ``[B, T]`` into ``grad_accum`` micro-batches (each spread over every
   data-parallel device; the model's activations are pinned to the mesh by the logical-axis rules
   of :mod:`train.sharding`) and accumulates float32 gradients of the mean token loss with
   ``lax.scan``;
2. applies ``tx`` (gradient clipping + optimizer);
3. skips the update, leaving params, optimizer state and projectors exactly as they were, when the
   loss or the gradients are not finite (or the loss spikes above ``loss_spike_factor`` x its
   running mean);
4. returns scalar metrics: loss, the mean loss since the last log step (``loss_mean``, from two
   accumulators in the state that are reset after each log step), grad norm, lr, skip counters,
   and for subspace optimizers the mean projector orthogonality error ``||P^T P - I||_F``, the
   subspace drift of this step (mean sin^2 of the principal angles between P before and after it)
   and the mean and min over projected matrices of the captured energy ``||Q^T G'||^2 / ||G'||^2``
   of this step's gradient in span(P after the step) (:func:`osd_jax.captured_energy`). These
   need a QR of every projector, so they are computed under ``lax.cond`` only at log steps (the
   step count after the step is a multiple of ``metrics_every`` or is ``last_step``) and are NaN
   otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import osd_jax
from train import model as model_lib
from train import sharding as shd


class TrainState(NamedTuple):
  """Everything that changes during training (all arrays)."""

  step: jax.Array  # int32 [], batches consumed
  params: Any  # pure dict of float32 master weights
  opt_state: Any  # optax state (projectors included)
  skipped: jax.Array  # int32 [], total steps skipped for non-finite values / spikes
  bad_streak: jax.Array  # int32 [], consecutive skipped steps
  loss_avg: jax.Array  # float32 [], running mean of the loss of applied steps (0 before any)
  # the finite losses since the last log step (summed, counted): the logged loss is their mean;
  # part of the checkpoint, so a run resumed between log steps logs what the uninterrupted run did
  loss_sum: jax.Array  # float32 []
  loss_count: jax.Array  # int32 []
  # float32 [], the global gradient norm (before clipping) of the last step whose norm was
  # finite (0 before the first): the fused update (--fused-update) clips with it
  grad_norm: jax.Array


def init_state(params: Any, opt_state: Any) -> TrainState:
  zero = jnp.zeros([], jnp.int32)
  fzero = jnp.zeros([], jnp.float32)
  return TrainState(zero, params, opt_state, zero, zero, fzero, fzero, zero, fzero)


def state_shardings(param_shardings: Any, opt_shardings: Any, mesh: Mesh) -> TrainState:
  rep = shd.replicated(mesh)
  return TrainState(rep, param_shardings, opt_shardings, rep, rep, rep, rep, rep, rep)


def apply_updates(params: Any, updates: Any, step, stochastic_rounding: bool, seed: int,
                  layer_index=None) -> Any:
  """The new weights: ``optax.apply_updates``, or rounded stochastically into their dtype with
  bits from (``seed``, ``step``, the leaf's path, the element) — the same bits for a layer's
  slice (``layer_index``, the fused update) as for the whole stack."""
  if not stochastic_rounding:
    return optax.apply_updates(params, updates)
  return osd_jax.rounding.apply_updates(params, updates, osd_jax.rounding.combine_seeds(seed, step),
                                        layer_index=layer_index)


def cross_entropy_sum(logits_of: Callable[[jax.Array], jax.Array], h: jax.Array,
                      targets: jax.Array, chunk: int = 0) -> jax.Array:
  """Σ over valid targets (``target >= 0``) of the next-token cross-entropy of
  ``logits_of(h)`` (h: the blocks' output [B, T, dim]).

  With ``chunk`` (a divisor of T) the sequence is cut into chunks of that many positions and
  each chunk's logits are computed, used and dropped in turn (a ``lax.scan`` whose body is under
  ``jax.checkpoint``: the backward pass recomputes them), so the [B, T, vocab] logits and their
  gradient are never held whole — one chunk's are.
  """
  def loss_sum(h_c, t_c):
    logits = logits_of(h_c).astype(jnp.float32)
    ok = t_c >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, t_c, 0))
    return jnp.sum(jnp.where(ok, losses, 0.0))

  t = h.shape[1]
  if not chunk or chunk >= t:
    return loss_sum(h, targets)
  if t % chunk:
    raise ValueError(f"the loss chunk {chunk} does not divide the sequence length {t}")
  b, n = h.shape[0], t // chunk
  hs = h.reshape(b, n, chunk, h.shape[-1]).swapaxes(0, 1)  # [chunks, B, chunk, dim]
  ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
  one = jax.checkpoint(loss_sum)
  total, _ = jax.lax.scan(lambda acc, xs: (acc + one(*xs), None), jnp.zeros([], jnp.float32),
                          (hs, ts))
  return total


def token_loss(graphdef: nnx.GraphDef, params: Any, batch: dict,
               pin_activations: Callable | None = None, loss_chunk: int = 0) -> tuple:
  """Sum of next-token cross-entropy over valid targets (``target >= 0``) and their count.

  ``pin_activations`` (e.g. :func:`train.sharding.activation_constraint`) is applied to the
  model's named activations (:func:`train.model.activation_sharding`); ``loss_chunk``: see
  :func:`cross_entropy_sum`.
  """
  model = nnx.merge(graphdef, params)
  targets = batch["targets"]
  with model_lib.activation_sharding(pin_activations):
    if loss_chunk:
      h = model.hidden_states(batch["inputs"])
      loss = cross_entropy_sum(model.logits, h, targets, loss_chunk)
    else:
      logits = model(batch["inputs"]).astype(jnp.float32)
      loss = cross_entropy_sum(lambda x: x, logits, targets)
  return loss, jnp.sum(targets >= 0).astype(jnp.float32)


def _micro_batches(x: jax.Array, accum: int, mesh: Mesh) -> jax.Array:
  """``[B, ...] -> [accum, B/accum, ...]``; micro-batch j takes rows j, j+accum, ... so that every
  micro-batch keeps its rows on the devices that already hold them."""
  b = x.shape[0]
  y = x.reshape((b // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, shd.BATCH_AXES)))


# long on purpose: the whole jitted step (accumulate, update, skip, metrics) reads as one traced
# program; step_fn is that program
def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Mesh, shardings: TrainState, *,
                    grad_accum: int = 1, loss_spike_factor: float = 0.0,
                    subspace_metrics: bool = False, energy_metrics: bool = True,
                    metrics_every: int = 1,
                    last_step: int = -1, donate: bool = True,
                    stochastic_rounding: bool = False, seed: int = 0,
                    loss_chunk: int = 0) -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)``, jitted with explicit shardings.

  ``energy_metrics=False`` leaves the captured energy out (NaN): it keeps every gradient alive
  until after the update (+20.2 GiB on the 7B step; benchmarks/RESULTS.md §7).
  With ``subspace_metrics`` the projector metrics are computed (under ``lax.cond``, so one compiled
  program serves every step) only at the steps the trainer logs: when the step count after the
  step is a multiple of ``metrics_every`` or equals ``last_step``; they are NaN at other steps.
  ``stochastic_rounding`` rounds the new weights into their dtype stochastically
  (:func:`osd_jax.rounding.apply_updates`, bits from ``seed`` and the step).
  """

  pin_activations = shd.activation_constraint(mesh)

  # long on purpose: the one traced program of a train step (see the comment above)
  def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    n_tokens = jnp.maximum(jnp.sum(batch["targets"] >= 0).astype(jnp.float32), 1.0)

    def loss_fn(params, mb):
      loss_sum, _ = token_loss(graphdef, params, mb, pin_activations, loss_chunk)
      return loss_sum / n_tokens

    grad_fn = jax.value_and_grad(loss_fn)
    if grad_accum == 1:
      loss, grads = grad_fn(state.params, batch)
    else:
      micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum, mesh), batch)

      def body(carry, mb):
        loss_acc, grad_acc = carry
        loss_i, grads_i = grad_fn(state.params, mb)
        return (loss_acc + loss_i, jax.tree.map(jnp.add, grad_acc, grads_i)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (loss, grads), _ = jax.lax.scan(body, (jnp.zeros([], jnp.float32), zeros), micro)
      grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if loss_spike_factor > 0:
      ok &= ~((state.loss_avg > 0) & (loss > loss_spike_factor * state.loss_avg))
    # A transformation that honours apply_step (osd_jax.skipping: the subspace optimizers) keeps
    # its own state on a skipped step: its inner Adam then computes the update from the kept
    # moments, and the select below, which would hold a copy of every moment, is left out.
    updates, new_opt = tx.update(grads, state.opt_state, state.params, apply_step=ok)
    new_params = apply_updates(state.params, updates, state.step, stochastic_rounding, seed)

    def keep(new, old):  # the old values on a skipped step
      return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    new_params = keep(new_params, state.params)
    if not osd_jax.skipping.honours_apply_step(tx):
      new_opt = keep(new_opt, state.opt_state)
    avg = jnp.where(state.loss_avg > 0, 0.95 * state.loss_avg + 0.05 * loss, loss)
    skipped_now = (~ok).astype(jnp.int32)
    # mean loss since the last log step: accumulated here, reset after each log step
    n = state.step + 1  # the step number after this step, as the trainer logs it
    at_log_step = (n % max(metrics_every, 1) == 0) | (n == last_step)
    finite = jnp.isfinite(loss)
    loss_sum = state.loss_sum + jnp.where(finite, loss, 0.0).astype(jnp.float32)
    loss_count = state.loss_count + finite.astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        skipped=state.skipped + skipped_now,
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
        loss_avg=jnp.where(ok, avg, state.loss_avg),
        loss_sum=jnp.where(at_log_step, 0.0, loss_sum),
        loss_count=jnp.where(at_log_step, 0, loss_count),
        grad_norm=jnp.where(jnp.isfinite(grad_norm), grad_norm, state.grad_norm),
    )
    metrics = {
        "loss": loss,
        # NaN when no step since the last log step had a finite loss
        "loss_mean": jnp.where(loss_count > 0, loss_sum / jnp.maximum(loss_count, 1), jnp.nan),
        "grad_norm": grad_norm,
        # the optimizer's own count only advances on applied steps
        "lr": schedule(state.step - state.skipped),
        "skipped": skipped_now,
        "skipped_total": new_state.skipped,
        "bad_streak": new_state.bad_streak,
    }
    if subspace_metrics:
      # A QR of every projector: computed at log steps only, NaN on the others.
      def projector_metrics(old, new, g):
        if g is None:  # no energy: the gradients need not live until after the update
          e_mean = e_min = jnp.full([], jnp.nan, jnp.float32)
        else:
          energy = osd_jax.captured_energy(g, new)  # ‖QᵀG'‖²/‖G'‖² per matrix, P after the step
          e_mean, e_min = jnp.mean(energy), jnp.min(energy)
        return (osd_jax.projector_orthogonality_error(new).astype(jnp.float32),
                osd_jax.subspace_drift(old, new).astype(jnp.float32), e_mean, e_min)

      def skip_metrics(old, new, g):
        return tuple(jnp.full([], jnp.nan, jnp.float32) for _ in range(4))

      energy_grads = grads if energy_metrics else None
      if metrics_every <= 1:
        orth, drift, e_mean, e_min = projector_metrics(state.opt_state, new_opt, energy_grads)
      else:
        orth, drift, e_mean, e_min = jax.lax.cond(at_log_step, projector_metrics, skip_metrics,
                                                  state.opt_state, new_opt, energy_grads)
      metrics["orthogonality_error"] = orth
      metrics["subspace_drift"] = drift
      metrics["captured_energy_mean"] = e_mean
      metrics["captured_energy_min"] = e_min
    return new_state, metrics

  rep = shd.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, shd.batch_sharding(mesh)),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, param_shardings: Any, *,
                   grad_accum: int = 1, loss_chunk: int = 0) -> Callable:
  """Builds ``eval_step(params, batch) -> (loss_sum, token_count)``, jitted.

  The batch runs in the same ``grad_accum`` micro-batches as the train step (``lax.scan`` summing
  loss and token count), so evaluation needs no more activation memory than training.
  """

  pin_activations = shd.activation_constraint(mesh)

  def eval_fn(params, batch):
    if grad_accum == 1:
      return token_loss(graphdef, params, batch, pin_activations, loss_chunk)
    micro = jax.tree.map(lambda x: _micro_batches(x, grad_accum, mesh), batch)

    def body(carry, mb):
      loss_i, count_i = token_loss(graphdef, params, mb, pin_activations, loss_chunk)
      return (carry[0] + loss_i, carry[1] + count_i), None

    zero = jnp.zeros([], jnp.float32)
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero), micro)
    return loss_sum, count

  rep = shd.replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                 out_shardings=(rep, rep))
