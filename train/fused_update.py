"""The fused update (``--fused-update``): each scanned block is updated inside the backward pass.

The unfused step (:mod:`train.train_step`) holds the whole gradient tree after the backward pass
(25 GiB in float32 at 7B) because clipping, the skip decision and the update come after it. Here
the step owns its backward pass:

1. forward: the embedding, a scan over the stacked blocks that keeps each block's residuals (under
   remat ``full``: its input only; a block's params are never copied into them), then the final
   norm, the head and the loss;
2. the head's and final norm's VJP gives their gradients and the gradient of the blocks' output;
3. a loop over the blocks from the last to the first takes one block's VJP (recomputing what its
   remat policy did not save), hands that block's gradient and its slice of the optimizer state to
   the optimizer (:mod:`osd_jax.layerwise`), writes the block's new params and state into the
   stacks in place and drops the gradient: at most one block's gradient is alive at a time.
   Under remat ``full`` (``by_halves``) a block is taken in two halves (``Block.attend``,
   ``Block.feed_forward``): the feed-forward's VJP and update, then the attention's, so that the
   MLP's weight gradients are gone before the attention's backward step;
4. the embedding's VJP, then the embedding, final norm and head are updated together, their big
   leaves a chunk of rows at a time (:func:`rest_by_rows`: one chunk's float32 temporaries, not
   the whole embedding's and head's).

What it changes (train/README.md, "The fused update"):

* **Same optimizer.** Without clipping the step equals the unfused one (to float rounding).
* **Clipping** (``--grad-clip > 0``) needs the global norm before any update; it scales the
  cotangent that enters the blocks (their VJPs are linear in it), not each gradient. By default
  (``--fused-clip previous``) the gradients are scaled by min(1, clip / ‖g‖) with ‖g‖ of the
  previous step (``TrainState.grad_norm``; no clipping at a run's first step). With
  ``--fused-clip exact`` a first loop over the blocks computes this step's gradients only for
  their norm (and drops each at once), then the fused loop clips by it: the unfused step's
  clipping, and its skipping too (a non-finite gradient anywhere skips the whole step before any
  update), for one more backward pass.
* **Gradient accumulation** is refused (``--grad-accum 1`` only): the optimizer would have to see
  the sum of the micro-batches' gradients of a block before updating it.
* **Non-finite values.** A non-finite or spiking loss skips the whole step before any update. A
  block whose gradient is not finite is left bitwise unchanged, params and optimizer state (the
  blocks after it in the backward pass — below it — get non-finite gradients too and are left as
  well; those above it were already updated; by halves, a block whose attention's gradient alone
  is not finite keeps its attention's params and state, its feed-forward's were updated first);
  the embedding, final norm and head, updated last,
  and the step counts move only when every gradient was finite. Such a step counts as skipped;
  ``skipped_blocks`` says how many groups were left.
* **Resume.** The state is the unfused step's, so a checkpoint resumes with or without the flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import osd_jax
from osd_jax import layerwise
from train import model as model_lib
from train import sharding as shd
from train import train_step as step_lib

LAYERS = "layers"
NS = "newton_schulz"
REST_CHUNKS = 8  # the embedding's and head's update in this many chunks of rows


def _is_stacked(path, _) -> bool:
  return getattr(path[0], "key", None) == LAYERS


def split_optimizer(base: optax.GradientTransformation,
                    abstract_params: Any) -> layerwise.LayerSplit:
  """The base optimizer split by layer of the scanned blocks (refused when not separable)."""
  return layerwise.split_layers(osd_jax.skipping.honour_apply_step(base), abstract_params,
                                _is_stacked, apply_step=jnp.bool_(True))


#: what the attention half's VJP keeps through the feed-forward half's backward step and update:
#: q, k and v (its backward step recomputes the norm and the scores, ≈ 0.3 % of a block's FLOPs
#: at 7B; recomputing the whole half would cost ≈ 8 %, keeping the scores 0.2 GiB at 7B)
ATTENTION_SAVES = jax.checkpoint_policies.save_only_these_names(
    *model_lib.ATTENTION_INPUTS)


def _in_half(first: bool) -> Callable:
  def in_half(path, x) -> bool:
    in_attention = getattr(path[1], "key", None) in model_lib.ATTENTION_HALF
    return _is_stacked(path, x) and in_attention == first
  return in_half


def split_halves(base: optax.GradientTransformation,
                 abstract_params: Any) -> tuple[layerwise.LayerSplit, layerwise.LayerSplit]:
  """The base optimizer split by layer of each half of the scanned blocks: (feed-forward's,
  attention's), each updating its half's slices of the params and the state."""
  tx = osd_jax.skipping.honour_apply_step(base)
  return tuple(layerwise.split_layers(tx, abstract_params, _in_half(first),
                                      apply_step=jnp.bool_(True)) for first in (False, True))


def _updated_where(ok, params, updates, step, stochastic_rounding: bool, seed: int,
                   layer_index=None):
  """The params with ``updates`` applied (:func:`train.train_step.apply_updates`) where ``ok``,
  and bitwise as they were where not (a skipped step, or a block with a non-finite gradient)."""
  new = step_lib.apply_updates(params, updates, step, stochastic_rounding, seed,
                               layer_index=layer_index)
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, params)


def _first_elements(arrays) -> jax.Array:
  """A scalar read from every non-empty array just written: the token after which later work is
  ordered (:func:`osd_jax.layerwise.write_after`)."""
  return sum(x.reshape(-1)[0].astype(jnp.float32) for x in arrays if x.size)


def _read_back(stacks, i) -> jax.Array:
  """:func:`_first_elements` of layer ``i`` of every stack."""
  return _first_elements(x[i] for x in stacks)


def rest_by_rows(split: layerwise.LayerSplit, abstract_params: Any, param_shardings: Any,
                 n: int = REST_CHUNKS) -> layerwise.RowChunks | None:
  """The update of the embedding, final norm and head with their big leaves cut into ``n`` chunks
  of rows (:func:`osd_jax.layerwise.chunk_rows`), or None where that cannot be done: a leaf whose
  first axis ``n`` does not divide or the mesh splits is left whole; an optimizer that mixes rows
  (a projected embedding, a factored moment) keeps the whole update."""
  rest = split.rest_view(abstract_params)
  shardings = dict(
      (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(
          split.rest_view(param_shardings))[0])

  def chunked(path, x):
    sharding = shardings.get(jax.tree_util.keystr(path))
    rows_whole = sharding is None or sharding.shard_shape(x.shape)[0] == x.shape[0]
    return len(x.shape) >= 2 and x.shape[0] % n == 0 and rows_whole

  if not any(chunked(p, x) for p, x in jax.tree_util.tree_flatten_with_path(rest)[0]):
    return None
  try:
    return layerwise.chunk_rows(split.tx, rest, n, chunked, apply_step=jnp.bool_(True))
  except osd_jax.separability.NotSeparableError:
    return None


def _update_by_rows(rows: layerwise.RowChunks, grads, state, params, ok, step,
                    stochastic_rounding: bool, seed: int):
  """(new params, new state) of the rest's update, a chunk of rows at a time: the same numbers as
  the whole update (bit for bit), holding one chunk's float32 temporaries instead of the whole
  embedding's and head's (2 GiB at 7B)."""
  cs = rows.split
  g_c, s_c = rows.to_chunks(grads), rows.state_to_chunks(state)
  p_c = rows.to_chunks(params)

  def body(c, carry):
    stacked, s_c = carry
    p_view = cs.layer_view_of([x[c] for x in stacked])
    u, new = cs.update_layer(cs.layer_view(g_c, c), s_c, p_view, c, apply_step=ok)
    new_view = _updated_where(ok, p_view, u, step, stochastic_rounding, seed, layer_index=c)
    stacked = [x.at[c].set(y) for x, y in zip(stacked, cs.stacked_leaves(new_view))]
    return stacked, cs.set_layer(s_c, new, c, token=_read_back(stacked, c))

  stacked, s_c = jax.lax.fori_loop(0, rows.n, body, (cs.stacked_leaves(p_c), s_c))
  p_small = cs.rest_view(p_c)
  u, new_small = cs.update_rest(cs.rest_view(g_c), s_c, p_small, apply_step=ok)
  new_small_p = _updated_where(ok, p_small, u, step, stochastic_rounding, seed)
  new_p = cs.merge_views(stacked, new_small_p)
  return rows.from_chunks(new_p), rows.state_from_chunks(cs.set_rest(s_c, new_small))


def _sum_squares(tree) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             jnp.zeros([], jnp.float32))


def flattens_in_place(stack, sharding) -> bool:
  """Whether ``[L, a, b, ...] -> [L, a·b·...]`` keeps this stack's sharding as it is: only the
  layer axis and a matrix's first axis may be split over the mesh."""
  spec = tuple(getattr(sharding, "spec", ())) + (None,) * stack.ndim
  return stack.ndim >= 3 and all(axis is None for axis in spec[2:stack.ndim])


def _split_residuals(vjp_fn, layer_params):
  """A block's VJP as (residual leaves to stack, treedef, slots): a residual that IS one of the
  block's param leaves is not stacked (it is read from the params stack in the backward loop)."""
  res, treedef = jax.tree.flatten(vjp_fn)
  p_leaves = jax.tree.leaves(layer_params)
  slots = tuple(next((k for k, q in enumerate(p_leaves) if r is q), None) for r in res)
  return [r for r, s in zip(res, slots) if s is None], treedef, slots


def _rebuild_vjp(saved: list, treedef, slots, layer_params):
  p_leaves = jax.tree.leaves(layer_params)
  saved = iter(saved)
  return jax.tree.unflatten(treedef, [p_leaves[s] if s is not None else next(saved)
                                      for s in slots])


def _projector_sums(old_state, new_state, grads, energy: bool):
  """(matrices, Σ drift, Σ captured energy, min energy) of the projected matrices of a state."""
  ps = osd_jax.projectors_of(new_state)
  n = sum(int(p.size // (p.shape[-1] * p.shape[-2])) for p in ps)
  nan = jnp.full([], jnp.nan, jnp.float32)
  if not n:
    return jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), nan
  # orthonormal bases by Newton–Schulz, not QR: a LAPACK call inside the backward loop can
  # deadlock XLA:CPU's thread pool (seen at 60M; osd_jax.diagnostics._orthonormal)
  drift = osd_jax.subspace_drift(old_state, new_state, NS).astype(jnp.float32) * n
  if not energy:
    return jnp.float32(n), drift, nan, nan
  e = osd_jax.captured_energy(grads, new_state, NS)
  return jnp.float32(n), drift, jnp.sum(e), jnp.min(e)


# long on purpose: the one traced program of a fused train step, read top to bottom
def make_fused_train_step(graphdef: nnx.GraphDef, base: optax.GradientTransformation,
                          schedule: optax.Schedule, mesh: Mesh, shardings: step_lib.TrainState,
                          abstract_params: Any, *, grad_clip: float = 0.0,
                          loss_spike_factor: float = 0.0, subspace_metrics: bool = False,
                          energy_metrics: bool = True, metrics_every: int = 1,
                          last_step: int = -1, donate: bool = True,
                          stochastic_rounding: bool = False, seed: int = 0,
                          loss_chunk: int = 0, exact_clip: bool = False,
                          offload_residuals: bool = False, by_halves: bool = False) -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)`` with the update inside the backward pass.

  ``base`` is the trainer's optimizer without its clip (:func:`train.optimizers.base_optimizer`):
  the last part of the chain whose state the train state holds (a leading
  ``clip_by_global_norm``, stateless, is replaced by the previous step's norm). The metrics are
  the unfused step's plus ``skipped_blocks``. ``stochastic_rounding``, ``seed``: as the unfused
  step (the same bits: a block's slice draws what it draws in the whole stack); ``loss_chunk``:
  :func:`train.train_step.cross_entropy_sum`; ``exact_clip``: clip by this step's global norm,
  from a first, norm-only loop over the blocks (``--fused-clip exact``); ``offload_residuals``:
  the blocks' residuals stacked in host memory (``jax.memory.Space.Host``) and one block's
  brought back to the device for its backward step, and the head's gradient recomputed after
  the blocks' loop instead of held through it (``--offload-residuals``); ``by_halves`` (remat
  ``full`` only: the blocks save nothing but their input): each block's backward step in two
  halves, the feed-forward's VJP and update before the attention's VJP, so that the MLP's
  weight gradients are gone before the attention's backward step. The embedding's and head's
  update runs a chunk of rows at a time where it can (:func:`rest_by_rows`).
  """
  split = split_optimizer(base, abstract_params)
  halves = split_halves(base, abstract_params) if by_halves else None
  rows = rest_by_rows(split, abstract_params, shardings.params)
  n_layers = split.n_layers
  pin_activations = shd.activation_constraint(mesh)

  def step_fn(state: step_lib.TrainState, batch: dict) -> tuple[step_lib.TrainState, dict]:
    params = state.params
    opt = state.opt_state[-1]  # the base optimizer's state; the clip part's is empty
    tokens, targets = batch["inputs"], batch["targets"]
    valid = targets >= 0
    n_tokens = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
    n = state.step + 1
    at_log_step = (n % max(metrics_every, 1) == 0) | (n == last_step)
    prev = state.grad_norm
    clip_factor = jnp.where((grad_clip > 0) & (prev > grad_clip),
                            grad_clip / jnp.maximum(prev, 1e-30), 1.0).astype(jnp.float32)

    with model_lib.activation_sharding(pin_activations):
      model = nnx.merge(graphdef, params)
      block = model.block_function(model_lib.positions_of(tokens))
      block_halves = model.block_halves(model_lib.positions_of(tokens)) if halves else None

      def embed(e):
        return nnx.merge(graphdef, {**params, "embed": e}).embed_tokens(tokens)

      def head_loss(norm, head, h):
        top = nnx.merge(graphdef, {**params, "norm": norm, "head": head})
        return step_lib.cross_entropy_sum(top.logits, h, targets, loss_chunk) / n_tokens

      # 1. forward, keeping each block's residuals (not its params)
      x0, embed_vjp = jax.vjp(embed, params["embed"])
      structure = {}

      def forward(h, layer_params):
        if halves:  # remat full: a block's input is all its backward step needs
          y, saved = block(layer_params, h), [h]
        else:
          y, vjp_fn = jax.vjp(block, layer_params, h)
          saved, structure["treedef"], structure["slots"] = _split_residuals(vjp_fn, layer_params)
        if offload_residuals:  # stacked in host memory, a block's brought back in the backward
          saved = [jax.device_put(r, jax.memory.Space.Host) for r in saved]
        return y, saved

      def residuals_of(i):
        rs = [s[i] for s in saved]
        return [jax.device_put(r, jax.memory.Space.Device) for r in rs] if offload_residuals else rs

      def block_vjp(i, p_i):
        """Block i's VJP, ``dy -> (its params' gradient, dx)``, from its residuals."""
        if halves:
          return jax.vjp(block, p_i, *residuals_of(i))[1]
        return _rebuild_vjp(residuals_of(i), structure["treedef"], structure["slots"], p_i)

      h, saved = jax.lax.scan(forward, x0, params[LAYERS])
      loss, head_vjp = jax.vjp(head_loss, params["norm"], params["head"], h)
      step_ok = jnp.isfinite(loss)
      if loss_spike_factor > 0:
        step_ok &= ~((state.loss_avg > 0) & (loss > loss_spike_factor * state.loss_avg))
      # 2. the head's and final norm's gradients, and the blocks' output's
      g_norm, g_head, dh = head_vjp(jnp.ones_like(loss))

      g_embed = None
      if exact_clip and grad_clip > 0:
        # 2b. --fused-clip exact: this step's global norm first, each gradient dropped at once
        def norm_only(j, carry):
          dh, sq = carry
          i = n_layers - 1 - j
          p_i = jax.tree.map(lambda x: x[i], params[LAYERS])
          g_i, dh = block_vjp(i, p_i)(dh)
          return dh, sq + _sum_squares(g_i)

        dh0, blocks_sq = jax.lax.fori_loop(0, n_layers, norm_only,
                                           (dh, jnp.zeros([], jnp.float32)))
        # the fused loop's VJPs read the same residuals and not-yet-updated blocks, so its dh at
        # the bottom is this dh0: the embedding's gradient is computed here, once
        (g_embed,) = embed_vjp(dh0)
        norm = jnp.sqrt(blocks_sq + _sum_squares(split.rest_view(
            {**params, "embed": g_embed, "norm": g_norm, "head": g_head})))
        step_ok &= jnp.isfinite(norm)  # the unfused step's skip: before any update
        # optax.clip_by_global_norm: g / ‖g‖ · clip when ‖g‖ > clip
        clip_factor = jnp.where(norm > grad_clip, grad_clip / jnp.where(norm > 0, norm, 1.0),
                                1.0).astype(jnp.float32)

      # 3. the blocks, last to first: VJP, update, write, drop the gradient. The loop carries
      # each weight stack with a layer's axes flattened ([L, d_in·d_out], a bitcast of the
      # stack): XLA:GPU's layout assignment otherwise gives a carried stack the layout its
      # backward dot prefers for one layer (w2 transposed) and transposes the whole stack in and
      # out of the loop (2.7 GiB at 7B); a flat row has one layout, so only a layer's slice is
      # relaid.
      # Only where that keeps the stack's sharding: no mesh axis on a matrix's second axis (a
      # split first axis stays a contiguous split of the flat row); others are carried as stored.
      layer_shapes = jax.tree.map(lambda x: x.shape[1:], params[LAYERS])
      flattened = jax.tree.map(flattens_in_place, params[LAYERS], shardings.params[LAYERS])

      def flat(stack, ok):
        return stack.reshape(stack.shape[0], -1) if ok else stack

      def update_group(sp, g_part, p_i, ok, i, flat_layers, opt, metrics):
        """Update the leaves of layer i in ``g_part`` (a block's, or a half's) with their part
        ``sp`` of the optimizer; write the params and the state slices in place. Returns the
        carry's three and a scalar read back from every slice written."""
        p_part = {k: p_i[k] for k in g_part}
        g_view = sp.layer_view_of(jax.tree.leaves(g_part))
        p_view = sp.layer_view_of(jax.tree.leaves(p_part))
        old_state = sp.layer_state(opt, i)
        u_view, new_state = sp.tx.update(g_view, old_state, p_view, apply_step=ok, layer_index=i)
        new_view = _updated_where(ok, p_view, u_view, state.step, stochastic_rounding, seed,
                                  layer_index=i)
        new_p = jax.tree.unflatten(jax.tree.structure(p_part), sp.stacked_leaves(new_view))
        if subspace_metrics:
          metrics = jax.lax.cond(
              at_log_step,
              lambda: tuple(a + b if k < 3 else jnp.fmin(a, b) for k, (a, b) in enumerate(zip(
                  metrics, _projector_sums(old_state, new_state, g_view, energy_metrics)))),
              lambda: metrics)
        flat_layers = {**flat_layers, **{k: jax.tree.map(
            lambda x, y: x.at[i].set(y.reshape(x.shape[1:])), flat_layers[k], new_p[k])
            for k in g_part}}
        # The state writes come after the params' and after the metrics, each reading back what
        # was written before it (osd_jax.layerwise.write_after): every read of an old slice then
        # precedes the write over it, so XLA keeps no copy of a whole stack.
        params_written = _read_back(jax.tree.leaves({k: flat_layers[k] for k in g_part}), i)
        token = params_written + sum(jnp.where(jnp.isfinite(m), m, 0.0) for m in metrics)
        opt = sp.set_layer(opt, new_state, i, token=token)
        # what was written, read back: a later step that must follow these writes depends on it
        written = params_written + _first_elements(jax.tree.leaves(sp.layer_state(opt, i)))
        return flat_layers, opt, metrics, written

      def backward(j, carry):
        dh, flat_layers, opt, acc = carry
        i = n_layers - 1 - j
        p_i = jax.tree.map(lambda x, shape: x[i].reshape(shape), flat_layers, layer_shapes)
        metrics = acc["metrics"]
        if halves:
          # the feed-forward half first: its VJP, its update, then the attention half's VJP,
          # whose cotangent reads back what the update wrote (XLA would otherwise keep the
          # MLP's weight gradients alive through the attention's backward step; an optimization
          # barrier does not order them: XLA:GPU removes it before scheduling)
          ff_split, attend_split = halves
          attend, feed_forward = block_halves
          p_att = {k: v for k, v in p_i.items() if k in model_lib.ATTENTION_HALF}
          p_ff = {k: v for k, v in p_i.items() if k not in model_lib.ATTENTION_HALF}
          h_mid, attend_vjp = jax.vjp(jax.checkpoint(lambda p, x: attend({**p_i, **p}, x),
                                                     policy=ATTENTION_SAVES),
                                      p_att, *residuals_of(i))
          _, ff_vjp = jax.vjp(lambda p, h: feed_forward({**p_i, **p}, h), p_ff, h_mid)
          g_ff, dh_mid = ff_vjp(dh)  # clipped already: dh carries the clip factor
          sq_ff = _sum_squares(g_ff)
          ok_ff = step_ok & jnp.isfinite(sq_ff)
          flat_layers, opt, metrics, written = update_group(ff_split, g_ff, p_i, ok_ff, i,
                                                            flat_layers, opt, metrics)
          dh_mid = layerwise.write_after(written)(dh_mid)
          g_att, dh = attend_vjp(dh_mid)
          sq_att = _sum_squares(g_att)
          # an attention half is left when either half's gradient is not finite (the block,
          # whole, when the feed-forward's is not)
          flat_layers, opt, metrics, _ = update_group(attend_split, g_att, p_i,
                                                      ok_ff & jnp.isfinite(sq_att), i,
                                                      flat_layers, opt, metrics)
          sq = sq_ff + sq_att
        else:
          g_i, dh = block_vjp(i, p_i)(dh)  # clipped already: dh carries the clip factor
          sq = _sum_squares(g_i)
          flat_layers, opt, metrics, _ = update_group(split, g_i, p_i,
                                                      step_ok & jnp.isfinite(sq), i,
                                                      flat_layers, opt, metrics)
        finite = jnp.isfinite(sq)
        acc = {"sq": acc["sq"] + jnp.where(finite, sq, jnp.inf),
               "bad": acc["bad"] + (~finite).astype(jnp.int32), "metrics": metrics}
        return dh, flat_layers, opt, acc

      # Clipping scales the cotangent entering the blocks: a VJP is linear in it, so every
      # block's gradient and the embedding's come out multiplied by the clip factor. (Scaling
      # each block's gradient instead made XLA keep a clipped copy beside the raw one: 0.38 GiB
      # at 7B.) The norms below divide it out again.
      dh = (dh * clip_factor).astype(dh.dtype)
      if (offload_residuals or halves) and g_embed is None:  # (--fused-clip exact used them)
        g_norm = g_head = None  # recomputed after the loop, not held through it

      def clipped(g):
        return (g * clip_factor).astype(g.dtype)

      zero = jnp.zeros([], jnp.float32)
      acc = {"sq": zero, "bad": jnp.zeros([], jnp.int32),
             "metrics": (zero, zero, zero, jnp.full([], jnp.inf, jnp.float32))}
      dh, flat_layers, opt, acc = jax.lax.fori_loop(
          0, n_layers, backward, (dh, jax.tree.map(flat, params[LAYERS], flattened), opt, acc))
      layers = jax.tree.map(lambda x, shape: x.reshape(x.shape[:1] + shape), flat_layers,
                            layer_shapes)
      if g_head is None:  # XLA computes only what is used of each of the two head VJPs
        g_norm, g_head, _ = head_vjp(jnp.ones_like(loss))
      # 4. the embedding's gradient, clipped (2b's is raw); then the embedding, norm and head
      if g_embed is None:
        (g_embed,) = embed_vjp(dh)
      else:
        g_embed = jax.tree.map(clipped, g_embed)

    unclip = 1.0 / jnp.square(clip_factor)  # exactly 1 when nothing is clipped
    rest_sq = _sum_squares(g_embed) * unclip + _sum_squares((g_norm, g_head))
    rest_finite = jnp.isfinite(rest_sq)
    grad_norm = jnp.sqrt(acc["sq"] * unclip + rest_sq)  # inf when a block's was not finite
    ok = step_ok & (acc["bad"] == 0) & rest_finite  # every gradient finite: the step applies
    g_rest = split.rest_view({**params, "embed": g_embed, "norm": jax.tree.map(clipped, g_norm),
                              "head": jax.tree.map(clipped, g_head)})
    p_rest = split.rest_view(params)
    old_rest = split.rest_state(opt)
    if rows is not None:  # the embedding's and head's rows a chunk at a time
      new_p_rest, new_rest = _update_by_rows(rows, g_rest, old_rest, p_rest, ok, state.step,
                                             stochastic_rounding, seed)
    else:
      u_rest, new_rest = split.tx.update(g_rest, old_rest, p_rest, apply_step=ok)
      new_p_rest = _updated_where(ok, p_rest, u_rest, state.step, stochastic_rounding, seed)
    new_params = split.merge_views(jax.tree.leaves(layers), new_p_rest)
    opt = split.set_rest(opt, new_rest)
    new_opt = (*state.opt_state[:-1], opt)

    skipped_now = (~ok).astype(jnp.int32)
    avg = jnp.where(state.loss_avg > 0, 0.95 * state.loss_avg + 0.05 * loss, loss)
    finite_loss = jnp.isfinite(loss)
    loss_sum = state.loss_sum + jnp.where(finite_loss, loss, 0.0).astype(jnp.float32)
    loss_count = state.loss_count + finite_loss.astype(jnp.int32)
    new_state = step_lib.TrainState(
        step=state.step + 1, params=new_params, opt_state=new_opt,
        skipped=state.skipped + skipped_now,
        bad_streak=jnp.where(ok, 0, state.bad_streak + 1),
        loss_avg=jnp.where(ok, avg, state.loss_avg),
        loss_sum=jnp.where(at_log_step, 0.0, loss_sum),
        loss_count=jnp.where(at_log_step, 0, loss_count),
        grad_norm=jnp.where(jnp.isfinite(grad_norm), grad_norm, state.grad_norm))
    metrics = {
        "loss": loss,
        "loss_mean": jnp.where(loss_count > 0, loss_sum / jnp.maximum(loss_count, 1), jnp.nan),
        "grad_norm": grad_norm,
        "lr": schedule(state.step - state.skipped),
        "skipped": skipped_now,
        "skipped_total": new_state.skipped,
        "bad_streak": new_state.bad_streak,
        # groups left unchanged for a non-finite gradient: blocks, then embedding/norm/head
        "skipped_blocks": jnp.where(step_ok, acc["bad"] + (~ok).astype(jnp.int32), 0),
    }
    if subspace_metrics:
      count, drift_sum, energy_sum, energy_min = acc["metrics"]
      r_count, r_drift, r_energy, r_min = jax.lax.cond(
          at_log_step, lambda: _projector_sums(old_rest, new_rest, g_rest, energy_metrics),
          lambda: (jnp.zeros([], jnp.float32),) * 3 + (jnp.full([], jnp.nan, jnp.float32),))
      count, nan = count + r_count, jnp.full([], jnp.nan, jnp.float32)
      some = at_log_step & (count > 0)
      metrics["orthogonality_error"] = jax.lax.cond(
          at_log_step, lambda o: osd_jax.projector_orthogonality_error(o).astype(jnp.float32),
          lambda o: nan, new_opt)
      metrics["subspace_drift"] = jnp.where(some, (drift_sum + r_drift) / count, nan)
      energy_ok = some & energy_metrics
      metrics["captured_energy_mean"] = jnp.where(energy_ok, (energy_sum + r_energy) / count,
                                                  nan)
      metrics["captured_energy_min"] = jnp.where(energy_ok, jnp.fmin(energy_min, r_min), nan)
    return new_state, metrics

  rep = shd.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, shd.batch_sharding(mesh)),
                 out_shardings=(shardings, rep), donate_argnums=(0,) if donate else ())

