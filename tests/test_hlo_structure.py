"""What the compiled update holds: one conditional, no SVD off the refresh path, local sharding.

These tests read the optimized HLO (``jax.jit(...).lower(...).compile().as_text()``) with
``benchmarks.hlo``; nothing is timed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import osd_jax
from benchmarks import hlo
from osd_jax import projectors
from osd_jax.dimension_numbers import is_dimension_numbers_leaf


def _many_matrices():
  """A model-like tree: 14 projected matrices of three shapes, a stacked leaf, vectors."""
  params = {}
  for i in range(4):
    params[f"layer{i}"] = {"wq": jnp.zeros((32, 32)), "w1": jnp.zeros((32, 48)),
                           "w2": jnp.zeros((48, 32)), "norm": jnp.zeros((32,))}
  params["stacked"] = jnp.zeros((2, 24, 40))  # a batch axis: vmapped, still one branch
  params["head"] = jnp.zeros((32, 40))
  wdn = jax.tree.map(lambda x: osd_jax.DimensionNumbers(1, 2) if x.ndim == 3
                     else osd_jax.DimensionNumbers() if x.ndim == 2 else None, params)
  return params, wdn


def _subspace(rule):
  return lambda wdn: optax.chain(
      osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), 8, rule,
                                        weight_dimension_numbers=wdn),
      optax.scale_by_learning_rate(1e-3))


OPTIMIZERS = {
    "osd_adamw": lambda wdn: osd_jax.osd_adamw(1e-3, 8, weight_decay=0.1,
                                               weight_dimension_numbers=wdn),
    "osd_adamw_randomized": lambda wdn: osd_jax.osd_adamw(1e-3, 8, weight_dimension_numbers=wdn,
        projector=osd_jax.ProjectorOptions(init="randomized")),
    "osd_lion": lambda wdn: osd_jax.osd_lion(1e-4, 8, weight_dimension_numbers=wdn),
    "galore_adamw": lambda wdn: osd_jax.galore_adamw(1e-3, 8, weight_dimension_numbers=wdn),
    "svd": _subspace(projectors.svd(every=5)),
    "svd_randomized": _subspace(projectors.svd(every=5, method="randomized")),
    "random": _subspace(projectors.random(every=5)),
    "frozen": _subspace(projectors.frozen()),
}


def _compiled_update(tx, params):
  state = jax.eval_shape(tx.init, params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return hlo.parse(jax.jit(step).lower(params, state, params).compile().as_text())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_conditional_and_no_decomposition_off_the_refresh_branch(name):
  params, wdn = _many_matrices()
  module = _compiled_update(OPTIMIZERS[name](wdn), params)
  conds = hlo.conditionals(module)
  assert len(conds) == 1, [c.line[:120] for c in conds]
  # The refresh (SVD, QR, eigh) is there, and all of it sits in the true branch of that one
  # conditional: the other branch and everything outside hold none.
  assert hlo.decompositions(module), "expected the refresh to compile to LAPACK custom calls"
  false_branch, true_branch = conds[0].branches
  assert hlo.decompositions(module, hlo.reachable_from(module, true_branch))
  assert not hlo.decompositions(module, hlo.reachable_from(module, false_branch))
  steady = hlo.reachable(module, skip=[true_branch])
  assert not hlo.decompositions(module, steady)
  assert hlo.refresh_branches(module) == [true_branch]


def test_the_number_of_conditionals_does_not_grow_with_the_tree():
  """The old per-matrix rule had 2 conds per matrix; a tree twice as big still has one."""
  params, wdn = _many_matrices()
  big = {"a": params, "b": params}
  module = _compiled_update(osd_jax.osd_adamw(1e-3, 8, weight_dimension_numbers={"a": wdn,
                                                                                 "b": wdn}),
                            big)
  assert len(hlo.conditionals(module)) == 1
  assert len(hlo.decompositions(module)) >= 28  # one SVD per projected matrix (2×14)


def test_projector_rule_update_matches_the_split_path():
  """``rule.update`` (refresh if due, then step) equals refresh + step called by hand."""
  rule = projectors.online_pca(1e-2, weight_decay=0.1)
  state = rule.init(10, 16, 3, jnp.float32)
  by_parts = state
  for t in range(3):
    g = jax.random.normal(jax.random.key(10 + t), (10, 16))
    key = jax.random.key(t)
    p_t, g_hat, state = jax.jit(rule.update)(g, state, jnp.int32(t), key)
    if t == 0:
      assert bool(rule.is_refresh(jnp.int32(t)))
      by_parts = rule.refresh(g, by_parts, jnp.int32(t), key)
    else:
      assert not bool(rule.is_refresh(jnp.int32(t)))
    q_t, q_hat, by_parts = rule.step(g, by_parts, jnp.int32(t))
    np.testing.assert_allclose(p_t, q_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_hat, q_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.p, by_parts.p, rtol=1e-5, atol=1e-6)


def test_projector_rule_needs_both_refresh_parts():
  with pytest.raises(ValueError, match="is_refresh and refresh"):
    projectors.projector_rule(lambda *a: None, lambda *a: None, is_refresh=lambda c: c == 0)


# --------------------------------------------------------------------------- sharded update

_D, _H, _V, _R = 128, 344, 1024, 32  # r/s = 1/4 as in the 60M preset (r = 128, s = 512)


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("fsdp",))


def _sharded_model():
  """LLaMA-like FSDP shapes: every 2-D leaf sharded P("fsdp", None); the embedding unprojected."""
  params = {"embed": jax.ShapeDtypeStruct((_V, _D), jnp.float32)}
  for i in range(2):
    params[f"layer{i}"] = {
        "wq": jax.ShapeDtypeStruct((_D, _D), jnp.float32),  # square: P spans n (unsharded)
        "w1": jax.ShapeDtypeStruct((_D, _H), jnp.float32),  # P spans m = the sharded axis
        "w2": jax.ShapeDtypeStruct((_H, _D), jnp.float32),  # P spans n, L = m is sharded
        "norm": jax.ShapeDtypeStruct((_D,), jnp.float32)}
  specs = jax.tree.map(lambda x: P("fsdp", None) if len(x.shape) == 2 else P(), params)
  wdn = jax.tree.map(lambda x: osd_jax.DimensionNumbers() if len(x.shape) == 2 else None,
                     params)
  wdn["embed"] = None
  return params, specs, wdn


def _loss(params, tokens):
  """A small residual MLP stack; activations pinned batch-sharded, as an FSDP trainer does."""
  batch = NamedSharding(_mesh(), P("fsdp"))

  def pin(x):
    return jax.lax.with_sharding_constraint(x, batch)

  x = pin(params["embed"][tokens])
  for i in range(2):
    layer = params[f"layer{i}"]
    h = pin(x + (x * layer["norm"]) @ layer["wq"])
    x = pin(h + pin(jax.nn.silu(h @ layer["w1"])) @ layer["w2"])
  return jnp.mean((x @ params["embed"].T) ** 2)


def _steady_collectives(tx, params, specs, train_step: bool):
  mesh = _mesh()
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                          is_leaf=lambda x: isinstance(x, P))
  shapes = jax.eval_shape(tx.init, params)
  state_sh = osd_jax.optimizer_state_sharding(shapes, param_sh)
  if train_step:
    batch_sh = NamedSharding(mesh, P("fsdp"))
    tokens = jax.ShapeDtypeStruct((64,), jnp.int32)

    def step(params, state, tokens):
      grads = jax.grad(_loss)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, in_shardings=(param_sh, state_sh, batch_sh),
                     out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
    lowered = jitted.lower(params, shapes, tokens)
  else:

    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, in_shardings=(param_sh, state_sh, param_sh),
                     out_shardings=(param_sh, state_sh), donate_argnums=(0, 1))
    lowered = jitted.lower(params, shapes, params)
  module = hlo.parse(lowered.compile().as_text())
  steady = hlo.reachable(module, skip=hlo.refresh_branches(module))
  return module, hlo.collectives(module, steady), hlo.collective_summary(module, steady)


def _budget_bytes(params, wdn) -> int:
  """The partial sums the math needs per projected matrix: Ĝ (r×L) or B (s×r), [PᵀP, PᵀB]
  (r×2r), ‖G‖ and the scalars of the inner Adam; float32."""
  total = 0
  leaves = jax.tree.leaves(params)
  specs = jax.tree.leaves(wdn, is_leaf=is_dimension_numbers_leaf)
  for x, spec in zip(leaves, specs):
    if spec is None:
      continue
    m, n = x.shape
    s, L = min(m, n), max(m, n)  # noqa: N806
    total += 4 * (max(_R * L, s * _R) + 2 * _R * _R + 4)
  return total


pytestmark_sharded = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytestmark_sharded
@pytest.mark.parametrize("name", ["osd_adamw", "osd_lion", "galore_adamw"])
def test_sharded_update_gathers_no_matrix_and_reduces_only_partial_sums(name):
  params, specs, wdn = _sharded_model()
  make = {"osd_adamw": lambda: osd_jax.osd_adamw(1e-3, _R, weight_decay=0.1,
                                                 weight_dimension_numbers=wdn),
          "osd_lion": lambda: osd_jax.osd_lion(1e-4, _R, weight_dimension_numbers=wdn),
          "galore_adamw": lambda: osd_jax.galore_adamw(1e-3, _R, weight_dimension_numbers=wdn)}
  module, steady, summary = _steady_collectives(make[name](), params, specs, train_step=False)
  # The refresh gathers G for its SVD, inside the refresh branch only.
  refresh = hlo.refresh_branches(module)
  assert len(refresh) == 1
  in_refresh = hlo.collectives(module, hlo.reachable_from(module, refresh[0]))
  assert max(i.bytes for i in in_refresh["all-gather"]) >= 4 * _D * _H
  # Steady state: no all-gather, all-to-all or permute at all; all-reduces of partial sums.
  for kind in ("all-gather", "all-to-all", "collective-permute"):
    assert not steady[kind], [i.line[:120] for i in steady[kind]]
  # (XLA combines several all-reduces into one of a tuple: check every array in it.)
  arrays = [b for i in steady["all-reduce"] + steady["reduce-scatter"] for b in i.array_bytes]
  assert arrays and max(arrays) <= 4 * _R * _H < 4 * _D * _H  # r×L at most, never s×L
  assert 0 < summary["total"]["bytes"] <= _budget_bytes(params, wdn)


@pytestmark_sharded
def test_sharded_train_step_collectives_within_ten_percent_of_adamw():
  params, specs, wdn = _sharded_model()
  _, adamw, adamw_sum = _steady_collectives(optax.adamw(1e-3, weight_decay=0.1), params, specs,
                                            train_step=True)
  _, osd, osd_sum = _steady_collectives(
      osd_jax.osd_adamw(1e-3, _R, weight_decay=0.1, weight_dimension_numbers=wdn), params,
      specs, train_step=True)
  # The FSDP parameter gathers are the same; the optimizer adds no all-gather of its own.
  gathered = sorted(i.bytes for i in osd["all-gather"])
  assert gathered == sorted(i.bytes for i in adamw["all-gather"])
  assert adamw_sum["total"]["bytes"] > 0
  extra = osd_sum["total"]["bytes"] - adamw_sum["total"]["bytes"]
  assert 0 < extra <= _budget_bytes(params, wdn)
  assert osd_sum["total"]["bytes"] <= 1.1 * adamw_sum["total"]["bytes"]
