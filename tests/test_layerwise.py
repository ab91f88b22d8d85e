"""osd_jax.layerwise: an optax transformation run one layer of stacked params at a time, and the
jaxpr check (osd_jax.separability) that refuses transformations it would change."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import osd_jax
from osd_jax import layerwise, separability
from osd_jax.separability import NotSeparableError

L = 3


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  return {"layers": {"w": jax.random.normal(k[0], (L, 16, 24)), "norm": jnp.ones((L, 16)),
                     "heads": jax.random.normal(k[1], (L, 2, 16, 12))},
          "head": jax.random.normal(k[2], (16, 10)), "bias": jnp.zeros(10)}


STACKED = {"layers": {"w": True, "norm": True, "heads": True}, "head": False, "bias": False}
WDN = {"layers": {"w": osd_jax.DimensionNumbers(1, 2), "norm": None,
                  "heads": osd_jax.DimensionNumbers(2, 3)},  # batch axes: layer and head
       "head": osd_jax.DimensionNumbers(), "bias": None}
MASK = {"layers": {"w": True, "norm": False, "heads": True}, "head": True, "bias": False}

OPTIMIZERS = {
    "osd_adamw": lambda: osd_jax.osd_adamw(1e-2, 4, weight_decay=0.1, mask=MASK,
                                           weight_dimension_numbers=WDN),
    "osd_lion": lambda: osd_jax.osd_lion(1e-3, 4, weight_dimension_numbers=WDN),
    "galore_adamw": lambda: osd_jax.galore_adamw(1e-2, 4, update_proj_gap=2,
                                                 weight_dimension_numbers=WDN),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1, mask=MASK),
    "lion": lambda: optax.lion(1e-3),
}


def _grads(t):
  return jax.tree.map(lambda x: jax.random.normal(jax.random.key(100 + t), x.shape), _params())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_layer_at_a_time_equals_the_whole_tree(name):
  """Four steps (a refresh at t = 0, and GaLore's at t = 2): updates and state agree."""
  tx = OPTIMIZERS[name]()
  params = _params()
  split = layerwise.split_layers(tx, params, STACKED)
  whole, by_layer = tx.init(params), tx.init(params)
  update = jax.jit(split.update)
  for t in range(4):
    u_whole, whole = tx.update(_grads(t), whole, params)
    u_layer, by_layer = update(_grads(t), by_layer, params)
    for a, b in zip(jax.tree.leaves((u_whole, whole)), jax.tree.leaves((u_layer, by_layer))):
      np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)


def test_state_leaves_are_sliced_shared_or_the_rests():
  params = _params()
  tx = OPTIMIZERS["osd_adamw"]()
  split = layerwise.split_layers(tx, params, STACKED)
  kinds = dict(zip(split.state_paths, split.state_kinds))
  assert kinds["[0].count"] == "shared" and kinds["[0].inner_state.count"] == "shared"
  assert kinds["[0].inner_state.mu['layers']['w']"] == "layer"
  assert kinds["[0].projector_state['layers']['heads'].state.p"] == "layer"
  assert kinds["[0].projector_state['layers']['w'].state.opt_state.count"] == "layer"  # [L]
  assert kinds["[0].inner_state.mu['head']"] == "rest"
  # one layer's state: the layer axis is gone, from the arrays and the static layouts
  state = tx.init(params)
  one = split.layer_state(state, 1)
  slot = one[0].projector_state["layers"]["heads"]
  assert slot.state.p.shape == (2, 12, 4) and slot.layout.shape == (2, 16, 12)
  assert slot.layout.batch_axes == (0,)
  # every update reads the shared counts as they were; set_rest advances them once
  u, new = split.update_layer(split.layer_view(_grads(0), 0), state, split.layer_view(params, 0),
                              0)
  state = split.set_layer(state, new, 0)
  assert int(state[0].count) == 0
  _, new_rest = split.update_rest(split.rest_view(_grads(0)), state, split.rest_view(params))
  state = split.set_rest(state, new_rest)
  assert int(state[0].count) == 1 and int(state[0].inner_state.count) == 1


@pytest.mark.parametrize("make, where", [
    (lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx), "reduce_sum"),
    (lambda tx: optax.apply_if_finite(tx, 3), "reduce_and"),
    (lambda tx: optax.chain(tx, optax.scale_by_trust_ratio()), "reduce_sum"),
], ids=["clip_by_global_norm", "apply_if_finite", "trust_ratio"])
def test_a_transformation_that_mixes_layers_is_refused_in_one_error(make, where):
  tx = make(OPTIMIZERS["adamw"]())
  with pytest.raises(NotSeparableError, match="not separable by layer.*") as e:
    layerwise.split_layers(tx, _params(), STACKED)
  assert where in str(e.value) and "\n" not in str(e.value)


def test_the_layer_axis_must_be_a_batch_axis_of_the_projected_matrix():
  wdn = {**WDN, "layers": {**WDN["layers"], "w": osd_jax.DimensionNumbers((0, 1), 2)}}
  tx = osd_jax.osd_adamw(1e-2, 4, weight_dimension_numbers=wdn)
  with pytest.raises(NotSeparableError, match="layer axis must be a batch axis"):
    layerwise.split_layers(tx, _params(), STACKED)


def test_write_after_keeps_every_bit():
  y = jnp.asarray([-0.0, 0.0, 1.5, -3.0, jnp.inf, jnp.nan], jnp.float32)
  for token in (jnp.float32(2.0), jnp.float32(-7.0), jnp.float32(jnp.nan), jnp.float32(jnp.inf)):
    out = jax.jit(layerwise.write_after(token))(y)
    np.testing.assert_array_equal(np.asarray(out).view(np.int32), np.asarray(y).view(np.int32))
  counts = jnp.asarray([3, 0], jnp.int32)
  np.testing.assert_array_equal(layerwise.write_after(jnp.float32(5.0))(counts), counts)


# ---------------------------------------------------------------- the jaxpr check on its own


def _check(fn, *args):
  """Checks ``fn(stacked, rest) -> (stacked out, rest out)`` (layer axis 0 on ``stacked``)."""
  separability.check_layer_separable(fn, args, ("layer", "rest"), ["stacked", "rest"],
                                     ["layer", "rest"])


X, R = jnp.ones((L, 5, 7)), jnp.ones((5, 7))


@pytest.mark.parametrize("fn", [
    lambda x, r: (x * 2 + jnp.sum(x, axis=(1, 2), keepdims=True), r),  # per-layer norm
    lambda x, r: (jnp.swapaxes(x, 1, 2).reshape(L, 35).reshape(L, 7, 5).swapaxes(1, 2), r + 1),
    lambda x, r: (jnp.einsum("lij,jk->lik", x, jnp.ones((7, 3))), r),  # a constant matrix
    lambda x, r: (jax.vmap(lambda a: jnp.linalg.qr(a)[0])(x), r),  # batched linalg
    lambda x, r: (jax.lax.map(lambda a: a @ a.T @ a, x), r),  # a loop over the layers
    lambda x, r: (jax.lax.cond(jnp.sum(X) > 0, lambda: x, lambda: -x), r),  # a constant decides
    lambda x, r: (x, jax.lax.fori_loop(0, 3, lambda i, c: c * 2 + r, r)),  # a loop on the rest
], ids=["per_layer_sum", "reshapes", "einsum", "vmapped_qr", "lax_map", "cond_on_constant",
        "loop_on_rest"])
def test_separable_programs_pass(fn):
  _check(fn, X, R)


@pytest.mark.parametrize("fn, message", [
    (lambda x, r: (x / jnp.sum(x), r), "every layer"),
    (lambda x, r: (x, r + jnp.sum(x[0])), "depends on the stacked layers"),
    (lambda x, r: (x + jnp.sum(r), r), "other \\(unstacked\\) leaves"),
    (lambda x, r: (jnp.cumsum(x, axis=0), r), "cumsum"),
    (lambda x, r: (jnp.einsum("lij,mij->lmij", x, x)[:, 0], r), "dot_general|slice"),
    (lambda x, r: (jax.lax.scan(lambda c, a: (c + a, c), jnp.zeros((5, 7)), x)[1], r),
     "carries one layer's values into the next"),
    (lambda x, r: (jax.lax.cond(jnp.sum(x) > 0, lambda: x, lambda: -x), r), "reduce_sum"),
    (lambda x, r: (x + jnp.sum(r), r), "other \\(unstacked\\) leaves"),
], ids=["global_sum", "rest_from_layer", "layer_from_rest", "cumsum", "outer_product", "scan_carry",
        "cond_on_layers", "layer_from_rest_sum"])
def test_programs_that_mix_layers_are_refused(fn, message):
  with pytest.raises(NotSeparableError, match=message):
    _check(fn, X, R)


def _by_rows(rows: layerwise.RowChunks, grads, state, params):
  """The whole update run a chunk of rows at a time (a loop), then the leaves left whole."""
  cs = rows.split
  g, p, s = rows.to_chunks(grads), rows.to_chunks(params), rows.state_to_chunks(state)

  def body(c, carry):
    s, stacked = carry
    u, new = cs.update_layer(cs.layer_view(g, c), s, cs.layer_view(p, c), c)
    return cs.set_layer(s, new, c), [x.at[c].set(y) for x, y in zip(stacked, cs.stacked_leaves(u))]

  zeros = [jnp.zeros_like(x) for x in cs.stacked_leaves(g)]
  s, stacked = jax.lax.fori_loop(0, rows.n, body, (s, zeros))
  u_rest, new_rest = cs.update_rest(cs.rest_view(g), s, cs.rest_view(p))
  return (rows.from_chunks(cs.merge_views(stacked, u_rest)),
          rows.state_from_chunks(cs.set_rest(s, new_rest)))


@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_an_update_by_chunks_of_rows_is_the_whole_update(state_dtype):
  """chunk_rows: an embedding [40, 512] and a head [16, 256] in 4 chunks of rows (8-bit moments
  blocked along the rows, stochastically rounded) and a bias left whole: two steps of the cut
  leaves equal the whole update bit for bit (the bias's to an ulp: the same update, in another
  program)."""
  from osd_jax import transforms

  k = jax.random.split(jax.random.key(1), 3)
  params = {"embed": jax.random.normal(k[0], (40, 512)), "head": jax.random.normal(k[1], (16, 256)),
            "bias": jnp.zeros(7)}
  tx = optax.chain(transforms.scale_by_adam(state_dtype=state_dtype, seed=3),
                   optax.add_decayed_weights(0.1), optax.scale(-1e-2))
  rows = layerwise.chunk_rows(tx, params, 4)
  assert rows.to_chunks(params)["embed"].shape == (4, 10, 512)
  assert rows.to_chunks(params)["bias"].shape == (7,)  # one axis: left whole
  state = tx.init(params)
  for t in range(2):
    grads = jax.tree.map(lambda x, t=t: jnp.cos(x * (t + 2)) * 10.0 ** -(t + 1), params)
    want_u, want_s = jax.jit(tx.update)(grads, state, params)
    got_u, got_s = jax.jit(lambda g, s, p: _by_rows(rows, g, s, p))(grads, state, params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path((want_u, want_s))[0],
                            jax.tree.leaves((got_u, got_s))):
      if "bias" in jax.tree_util.keystr(path):  # not cut: the same update in another program,
        np.testing.assert_allclose(b, a, rtol=1e-6)  # which XLA may round apart by an ulp
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = want_s
    params = optax.apply_updates(params, want_u)


def test_chunks_of_rows_are_refused_where_rows_mix_or_nothing_is_cut():
  params = {"embed": jnp.ones((8, 6)), "bias": jnp.ones(3)}
  # Adafactor's factored second moment keeps one statistic per column over all rows
  with pytest.raises(NotSeparableError):
    layerwise.chunk_rows(optax.adafactor(1e-2, min_dim_size_to_factor=2), params, 2)
  with pytest.raises(ValueError, match="no leaf is cut into 3 chunks"):
    layerwise.chunk_rows(optax.adam(1e-2), params, 3)
  with pytest.raises(ValueError, match=r"\['bias'\] \(3,\) cannot be cut"):
    layerwise.chunk_rows(optax.adam(1e-2), params, 2, lambda path, x: True)
