"""osd_jax transformations inside jit, scan, cond and the optax combinators; dtypes; batch axes."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osd_jax
from osd_jax import projectors
from tests import numpy_reference as ref


def _params(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
      "dense": {"kernel": jax.random.normal(k1, (12, 20), dtype), "bias": jnp.zeros(20, dtype)},
      "out": jax.random.normal(k2, (20, 6), dtype),
      "scale": jax.random.normal(k3, (6,), dtype),
  }


def _grads(params, t):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape, p.dtype), params)


def _run(tx, params, steps=4, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for t in range(steps):
    u, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
    outs.append(u)
  return params, state, outs


TXS = {
    "osd_adamw": lambda: osd_jax.osd_adamw(1e-2, rank=3, weight_decay=0.1),
    "osd_lion": lambda: osd_jax.osd_lion(1e-3, rank=3),
    "galore_adamw": lambda: osd_jax.galore_adamw(1e-2, rank=3, update_proj_gap=2),
}


@pytest.mark.parametrize("name", sorted(TXS))
def test_jit_equals_eager(name):
  p_jit, _, _ = _run(TXS[name](), _params())
  p_eager, _, _ = _run(TXS[name](), _params(), jit=False)
  chex.assert_trees_all_close(p_jit, p_eager, rtol=1e-5, atol=1e-6)


def test_lax_scan_matches_python_loop():
  tx = osd_jax.osd_adamw(1e-2, rank=3)
  params = _params()
  grads = [_grads(params, t) for t in range(4)]

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads)
  (p_scan, s_scan), _ = jax.lax.scan(body, (params, tx.init(params)), stacked)
  p_loop, s_loop = params, tx.init(params)
  for g in grads:
    (p_loop, s_loop), _ = body((p_loop, s_loop), g)
  chex.assert_trees_all_close(p_scan, p_loop, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal_structs(s_scan, s_loop)


def test_state_is_stable_across_lax_cond():
  """Under lax.cond the taken branch is exactly tx.update and the untaken one leaves the state."""
  tx = osd_jax.osd_adamw(1e-2, rank=3)
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)

  @jax.jit
  def maybe_step(flag, g, state):
    return jax.lax.cond(flag, lambda: tx.update(g, state, params),
                        lambda: (jax.tree.map(jnp.zeros_like, g), state))

  flags = [True, False, True, True, False]
  for t, flag in enumerate(flags):
    g = _grads(params, t)
    u, new_state = maybe_step(flag, g, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    if flag:
      u_direct, state_direct = update(g, state, params)
      chex.assert_trees_all_close(u, u_direct, rtol=1e-6, atol=1e-7)
      chex.assert_trees_all_close(new_state, state_direct, rtol=1e-6, atol=1e-7)
    else:
      chex.assert_trees_all_equal(new_state, state)  # count, moments and projectors unchanged
      chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g))
    state = new_state
  assert int(state[0].count) == flags.count(True)  # the subspace step t counts taken steps


def test_chain_and_partition():
  params = _params()
  labels = jax.tree.map(lambda p: "osd" if p.ndim == 2 else "adam", params)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.partition({"osd": osd_jax.osd_adamw(1e-2, rank=3), "adam": optax.adamw(1e-2)},
                      labels),
  )
  new_params, state, _ = _run(tx, params)
  chex.assert_tree_all_finite(new_params)
  # the matrices really went through the subspace: their updates have rank ≤ 3
  _, _, outs = _run(tx, params, steps=1)
  assert np.linalg.matrix_rank(np.asarray(outs[0]["dense"]["kernel"]), tol=1e-6) <= 3


def test_partition_with_pytree_dimension_numbers():
  """Inside optax.partition the params hold MaskedNode for the other group's leaves; a spec for
  the full tree still matches and its entries there are ignored."""
  params = _params()
  params["emb"] = jax.random.normal(jax.random.key(5), (30, 8))
  labels = {"dense": {"kernel": "osd", "bias": "adam"}, "out": "osd", "scale": "adam",
            "emb": "adam"}
  dn = osd_jax.DimensionNumbers()
  spec = {"dense": {"kernel": dn, "bias": None}, "out": None, "scale": None, "emb": dn}
  tx = optax.partition(
      {"osd": osd_jax.osd_adamw(1e-2, rank=3, weight_dimension_numbers=spec),
       "adam": optax.adamw(1e-2, weight_decay=0.0)}, labels)
  new_params, state, _ = _run(tx, params)
  osd_state = state.inner_states["osd"].inner_state[0]
  is_node = lambda x: isinstance(x, (osd_jax.ProjectedLeafState, optax.MaskedNode))  # noqa: E731
  kinds = jax.tree.map(lambda x: type(x).__name__, osd_state.projector_state, is_leaf=is_node)
  assert kinds == {"dense": {"kernel": "ProjectedLeafState", "bias": "MaskedNode"},
                   "out": "MaskedNode", "scale": "MaskedNode", "emb": "MaskedNode"}
  # same as one osd_adamw whose spec leaves the "adam" leaves unprojected (they get AdamW)
  whole_spec = dict(spec, emb=None)
  ref_params, _, _ = _run(osd_jax.osd_adamw(1e-2, rank=3, weight_dimension_numbers=whole_spec),
                          params)
  chex.assert_trees_all_close(new_params, ref_params, rtol=1e-5, atol=1e-6)


def test_multisteps_accumulates():
  params = _params()
  tx = optax.MultiSteps(osd_jax.osd_adamw(1e-2, rank=3), every_k_schedule=2)
  state = tx.init(params)
  u1, state = tx.update(_grads(params, 0), state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u1))
  u2, state = tx.update(_grads(params, 1), state, params)
  assert float(jnp.abs(u2["dense"]["kernel"]).max()) > 0.0
  # equals one osd_adamw step on the mean gradient
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, _grads(params, 0), _grads(params, 1))
  ref_tx = osd_jax.osd_adamw(1e-2, rank=3)
  ref_u, _ = ref_tx.update(mean_g, ref_tx.init(params), params)
  chex.assert_trees_all_close(u2, ref_u, rtol=1e-5, atol=1e-6)


def test_inject_hyperparams_with_static_rank():
  params = _params()
  tx = optax.inject_hyperparams(osd_jax.osd_adamw, static_args=("rank",))(
      learning_rate=1e-2, rank=3, weight_decay=0.1)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(_grads(params, 0), state, params)
  ref_tx = osd_jax.osd_adamw(1e-2, rank=3, weight_decay=0.1)
  ref_u, _ = ref_tx.update(_grads(params, 0), ref_tx.init(params), params)
  chex.assert_trees_all_close(u, ref_u, rtol=1e-5, atol=1e-7)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, _ = jax.jit(tx.update)(_grads(params, 1), state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))


INJECT_CASES = {
    "osd_adamw": (osd_jax.osd_adamw, dict(
        learning_rate=1e-2, rank=3, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.1, scale=0.7,
        projector=osd_jax.ProjectorOptions(orthogonality_weight=0.2, lr_ratio=2.0,
                                           weight_decay=0.05))),
    "osd_adamw_reference_code": (osd_jax.osd_adamw, dict(
        learning_rate=1e-2, rank=3, reference_code=True,
        projector=osd_jax.ProjectorOptions(peak_learning_rate=2e-2, update_proj_gap=5))),
    "osd_lion": (osd_jax.osd_lion, dict(
        learning_rate=1e-3, rank=3, b1=0.8, b2=0.95, weight_decay=0.1, scale=0.5,
        projector=osd_jax.ProjectorOptions(orthogonality_weight=0.2, lr_ratio=20.0))),
    "galore_adamw": (osd_jax.galore_adamw, dict(
        learning_rate=1e-2, rank=3, update_proj_gap=2, scale=0.3, b1=0.8, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", sorted(INJECT_CASES))
def test_inject_hyperparams_matches_plain_alias_over_steps(name):
  """Every numeric argument but rank may be an array hyperparameter; P moves or refreshes."""
  alias, kwargs = INJECT_CASES[name]
  params = _params()
  tx = optax.inject_hyperparams(alias, static_args=("rank",))(**kwargs)
  ref = alias(**kwargs)
  state, ref_state = tx.init(params), ref.init(params)
  update = jax.jit(tx.update)
  projectors_seen = []
  for t in range(4):
    u, state = update(_grads(params, t), state, params)
    ref_u, ref_state = ref.update(_grads(params, t), ref_state, params)
    chex.assert_trees_all_close(u, ref_u, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(state.inner_state, ref_state, rtol=1e-5, atol=1e-7)
    projectors_seen.append(np.asarray(osd_jax.projectors_of(state)[0]))
  assert not np.allclose(projectors_seen[0], projectors_seen[-1])  # the subspace has moved


def test_refresh_period_accepts_integer_arrays_and_names_the_argument():
  for every in (3, np.int64(3), jnp.asarray(3)):
    projectors.svd(every=every)
    projectors.random(every=every)
    osd_jax.galore_adamw(1e-2, rank=2, update_proj_gap=every)
  for bad in (0, -1, 2.0, True, np.int32(0), jnp.asarray(2.0), jnp.asarray([2])):
    with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
      osd_jax.galore_adamw(1e-2, rank=2, update_proj_gap=bad)
    with pytest.raises(ValueError, match="every must be a positive int"):
      projectors.svd(every=bad)
  with pytest.raises(ValueError, match="update_proj_gap must be a positive int"):
    osd_jax.osd_adamw(1e-2, rank=2, reference_code=True,
        projector=osd_jax.ProjectorOptions(update_proj_gap=0))


def test_apply_if_finite_skips_nan_steps():
  params = _params()
  tx = optax.apply_if_finite(osd_jax.osd_adamw(1e-2, rank=3), max_consecutive_errors=3)
  state = tx.init(params)
  _, state = tx.update(_grads(params, 0), state, params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(params, 1))
  u, new_state = tx.update(bad, state, params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))
  assert int(new_state.notfinite_count) == 1


def test_bf16_params_give_bf16_updates():
  params = _params(jnp.bfloat16)
  for name, make in TXS.items():
    _, state, outs = _run(make(), params, steps=2)
    for u in jax.tree.leaves(outs[-1]):
      assert u.dtype == jnp.bfloat16, name
    for p in osd_jax.projectors_of(state):
      assert p.dtype == jnp.float32  # projectors stay float32 (projector_dtype)


def test_empty_tree_and_no_matrices():
  for params in ({}, {"a": jnp.ones(3), "b": jnp.ones(())}):
    tx = osd_jax.osd_adamw(1e-2, rank=2)
    ref = optax.adamw(1e-2, weight_decay=0.0)
    u, _ = tx.update(params, tx.init(params), params)
    ref_u, _ = ref.update(params, ref.init(params), params)
    chex.assert_trees_all_close(u, ref_u)


def test_batch_axes_match_per_slice_runs():
  """Scanned layers (L, m, n) and attention kernels (embed, heads, head_dim) via vmap."""
  key = jax.random.key(1)
  layers = jax.random.normal(key, (3, 10, 14))
  heads = jax.random.normal(key, (16, 4, 5))  # (embed, heads, head_dim) → matrix 16 × 20
  params = {"layers": layers, "attn": heads}
  dims = {"layers": osd_jax.DimensionNumbers(1, 2), "attn": osd_jax.DimensionNumbers(0, (1, 2))}
  tx = osd_jax.osd_adamw(1e-2, rank=2, weight_dimension_numbers=dims)
  state = tx.init(params)
  assert state[0].projector_state["layers"].state.p.shape == (3, 10, 2)
  assert state[0].projector_state["attn"].state.p.shape == (16, 2)
  per_slice = osd_jax.osd_adamw(1e-2, rank=2)
  slice_states = [per_slice.init({"w": layers[i]}) for i in range(3)]
  flat = {"w": heads.reshape(16, 20)}
  flat_state = per_slice.init(flat)
  update = jax.jit(tx.update)
  for t in range(3):
    g = {"layers": jax.random.normal(jax.random.key(t), layers.shape),
         "attn": jax.random.normal(jax.random.key(t + 9), heads.shape)}
    u, state = update(g, state, params)
    for i in range(3):
      ui, slice_states[i] = per_slice.update({"w": g["layers"][i]}, slice_states[i],
                                             {"w": layers[i]})
      np.testing.assert_allclose(u["layers"][i], ui["w"], rtol=2e-4, atol=1e-6)
    uf, flat_state = per_slice.update({"w": g["attn"].reshape(16, 20)}, flat_state, flat)
    np.testing.assert_allclose(u["attn"].reshape(16, 20), uf["w"], rtol=2e-4, atol=1e-6)


def test_callable_and_pytree_dimension_numbers_select_leaves():
  params = _params()
  only_out = lambda p: {"dense": {"kernel": None, "bias": None}, "out": osd_jax.DimensionNumbers(),  # noqa: E731
                        "scale": None}
  for wdn in (only_out, only_out(params)):
    state = osd_jax.osd_adamw(1e-2, rank=2, weight_dimension_numbers=wdn).init(params)
    kinds = jax.tree.map(lambda x: isinstance(x, osd_jax.ProjectedLeafState),
                         state[0].projector_state,
                         is_leaf=lambda x: isinstance(x, (osd_jax.ProjectedLeafState,
                                                          optax.MaskedNode)))
    assert kinds["out"] is True and kinds["dense"]["kernel"] is False


@pytest.mark.parametrize("rule", [
    projectors.svd(every=2), projectors.random(every=2), projectors.frozen(),
    projectors.online_pca(1e-2, init="randomized")])
def test_any_rule_with_any_inner(rule):
  for inner in (optax.scale_by_adam(), optax.scale_by_lion(), optax.scale_by_factored_rms()):
    tx = optax.chain(osd_jax.scale_by_subspace_descent(inner, 3, rule, project_params=True),
                     optax.scale_by_learning_rate(1e-2))
    new_params, _, _ = _run(tx, _params(), steps=3)
    chex.assert_tree_all_finite(new_params)


def test_transport_state_rotates_first_moment():
  """From the same state, transport gives mu = (Pₜ₊₁ᵀ Pₜ) mu_plain and leaves nu alone."""
  params = {"w": jax.random.normal(jax.random.key(0), (8, 12))}
  rule = projectors.online_pca(0.05)
  plain = osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), 3, rule)
  moved = osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), 3, rule, transport_state=True)
  state = plain.init(params)
  for t in range(2):
    _, state = plain.update({"w": jax.random.normal(jax.random.key(t), (8, 12))}, state)
  g = {"w": jax.random.normal(jax.random.key(7), (8, 12))}
  _, s_plain = plain.update(g, state)
  _, s_moved = moved.update(g, state)
  p_t = np.asarray(state.projector_state["w"].state.p)
  p_next = np.asarray(s_plain.projector_state["w"].state.p)
  assert not np.allclose(p_t, p_next)
  rotation = p_next.T @ p_t
  np.testing.assert_allclose(s_moved.inner_state.mu["w"],
                             rotation @ np.asarray(s_plain.inner_state.mu["w"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(s_moved.inner_state.nu["w"], s_plain.inner_state.nu["w"])


@pytest.mark.parametrize("rule_name", ["svd", "random"])
def test_transport_state_with_periodic_rules(rule_name):
  """svd/random replace P inside update: at a refresh t, M ← b1·(PₜᵀPₜ₋₁)·M + (1−b1)·Ĝ.

  Checked against a float64 NumPy Adam over the P the rule used (and, for svd, P is checked
  to be the top-r singular vectors of G'ₜ at every refresh); a wide and a tall leaf.
  """
  b1, b2, eps, rank, steps = 0.9, 0.999, 1e-8, 3, 5
  shapes = {"wide": (8, 12), "tall": (12, 8)}
  rng = np.random.default_rng(0)
  grads = [{k: rng.normal(size=shp) * (1 + 0.5 * t) for k, shp in shapes.items()}
           for t in range(steps)]
  rule = projectors.svd(every=2) if rule_name == "svd" else projectors.random(every=2, seed=1)
  with jax.enable_x64(True):
    def run(transport):
      tx = osd_jax.scale_by_subspace_descent(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps), rank, rule, transport_state=transport,
          projector_dtype=jnp.float64)
      state = tx.init({k: jnp.zeros(shp, jnp.float64) for k, shp in shapes.items()})
      update = jax.jit(tx.update)
      out = []
      for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state)
        out.append(dict(
            u=jax.tree.map(np.asarray, u), mu=jax.tree.map(np.asarray, state.inner_state.mu),
            p={k: np.asarray(state.projector_state[k].state.p) for k in shapes}))
      return out

    moved, kept = run(True), run(False)

  for k, shp in shapes.items():
    transpose = shp[0] >= shp[1]  # G' = Gᵀ for the tall leaf
    mu = nu = p_prev = None
    for t in range(steps):
      gp = grads[t][k].T if transpose else grads[t][k]
      p_t = moved[t]["p"][k]  # periodic rules store Pₜ₊₁ = Pₜ
      if t % 2 == 0 and rule_name == "svd":
        expected = ref.top_left_singular(gp, rank)
        if t > 0:  # refreshed columns keep the previous P's signs
          expected = expected * np.where(np.sum(expected * p_prev, axis=0) < 0, -1.0, 1.0)
        np.testing.assert_allclose(p_t, expected, atol=1e-10)
      if t % 2:
        np.testing.assert_array_equal(p_t, p_prev)  # no refresh: P is kept
      g_hat = p_t.T @ gp  # Ĝ = PₜᵀG'
      if t == 0:
        mu, nu = np.zeros_like(g_hat), np.zeros_like(g_hat)
      elif t % 2 == 0:
        mu = (p_t.T @ p_prev) @ mu  # M ← (PₜᵀPₜ₋₁) M at the refresh
      mu = b1 * mu + (1 - b1) * g_hat
      nu = b2 * nu + (1 - b2) * g_hat**2
      n = (mu / (1 - b1 ** (t + 1))) / (np.sqrt(nu / (1 - b2 ** (t + 1))) + eps)
      u = p_t @ n
      np.testing.assert_allclose(moved[t]["mu"][k], mu, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(moved[t]["u"][k], u.T if transpose else u, rtol=1e-9,
                                 atol=1e-12)
      p_prev = p_t
    for t in range(steps):  # identical until the first refresh after t = 0 (t = 2), then not
      same = np.array_equal(moved[t]["u"][k], kept[t]["u"][k])
      assert same == (t < 2), (k, t)


def test_side_auto_and_larger():
  params = {"w": jnp.ones((8, 64))}
  smaller = osd_jax.osd_adamw(1e-2, rank=2).init(params)
  larger = osd_jax.osd_adamw(1e-2, rank=2,
      projector=osd_jax.ProjectorOptions(side="larger")).init(params)
  assert smaller[0].projector_state["w"].state.p.shape == (8, 2)
  assert larger[0].projector_state["w"].state.p.shape == (64, 2)
  # galore-like rule (P only) + Adam inner: spanning the larger side stores fewer bytes
  auto = osd_jax.galore_adamw(1e-2, rank=2, side="auto").init(params)
  assert auto[0].projector_state["w"].state.p.shape == (64, 2)
  assert osd_jax.state_bytes(auto) < osd_jax.state_bytes(osd_jax.galore_adamw(1e-2, 2).init(params))
  # online PCA with Adam on P (3 slots): the smaller side is cheaper
  auto_osd = osd_jax.osd_adamw(1e-2, rank=2,
      projector=osd_jax.ProjectorOptions(side="auto")).init(params)
  assert auto_osd[0].projector_state["w"].state.p.shape == (8, 2)


def test_leaves_with_more_than_two_dims_are_never_silently_left_at_full_rank():
  """The default spec projects 2-D leaves only: 3-D/4-D ones are named in one warning with the
  fix, and projected once ``weight_dimension_numbers`` says which axes form the matrix."""
  params = {"stacked": jnp.ones((4, 64, 128)), "conv": jnp.ones((3, 3, 16, 32)),
            "w": jnp.ones((64, 128)), "b": jnp.ones(128)}
  with pytest.warns(osd_jax.UnprojectedWarning) as record:
    state = osd_jax.osd_adamw(1e-3, rank=8).init(params)
  assert len(record) == 1
  message = str(record[0].message)
  assert "['stacked'] (4, 64, 128)" in message and "['conv'] (3, 3, 16, 32)" in message
  assert "weight_dimension_numbers" in message and "['w']" not in message
  adam = state[0].inner_state
  assert adam.mu["stacked"].shape == (4, 64, 128)  # full-size state, as the warning says
  wdn = {"stacked": osd_jax.DimensionNumbers(1, 2), "conv": osd_jax.DimensionNumbers((0, 1, 2), 3),
         "w": osd_jax.DimensionNumbers(), "b": None}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an explicit spec: no warning
    state = osd_jax.osd_adamw(1e-3, rank=8, weight_dimension_numbers=wdn).init(params)
  adam = state[0].inner_state
  assert adam.mu["stacked"].shape == (4, 8, 128) and adam.mu["conv"].shape == (8, 144)
