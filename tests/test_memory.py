"""state_bytes == expected_state_bytes on a LLaMA-60M-shaped tree, and the saving vs AdamW."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

import osd_jax

DIM, HIDDEN, LAYERS, VOCAB, RANK = 512, 1376, 8, 32000, 128  # GaLore-paper 60M, r = 128


def llama60m_shapes():
  layer = {
      "attention": {k: jax.ShapeDtypeStruct((DIM, DIM), jnp.float32)
                    for k in ("wq", "wk", "wv", "wo")},
      "mlp": {"w1": jax.ShapeDtypeStruct((DIM, HIDDEN), jnp.float32),
              "w3": jax.ShapeDtypeStruct((DIM, HIDDEN), jnp.float32),
              "w2": jax.ShapeDtypeStruct((HIDDEN, DIM), jnp.float32)},
      "attention_norm": jax.ShapeDtypeStruct((DIM,), jnp.float32),
      "mlp_norm": jax.ShapeDtypeStruct((DIM,), jnp.float32),
  }
  return {
      "embed": jax.ShapeDtypeStruct((VOCAB, DIM), jnp.float32),
      "layers": [layer] * LAYERS,
      "norm": jax.ShapeDtypeStruct((DIM,), jnp.float32),
      "head": jax.ShapeDtypeStruct((DIM, VOCAB), jnp.float32),
  }


def attention_and_mlp(params):
  """The paper's rule: project attention and MLP matrices only."""
  def spec(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    projected = ("attention" in names or "mlp" in names) and len(leaf.shape) == 2
    return osd_jax.DimensionNumbers() if projected else None
  return jax.tree_util.tree_map_with_path(spec, params)


def _hand_count(optimizer):
  """The closed form written out for this tree (independent of osd_jax.expected_state_bytes)."""
  full = VOCAB * DIM * 2 + DIM * (2 * LAYERS + 1)  # embed + head + norms (unprojected)
  matrices = [(DIM, DIM)] * 4 + [(DIM, HIDDEN)] * 2 + [(HIDDEN, DIM)]
  if optimizer == "adamw":
    return 4 * 2 * (full + LAYERS * sum(m * n for m, n in matrices)) + 4
  total = 4 * 2 * full + 4 + 4  # Adam mu, nu on unprojected leaves; subspace + inner counts
  for m, n in matrices:
    s, L = min(m, n), max(m, n)  # noqa: N806
    total += LAYERS * (4 * 2 * RANK * L + 4 * 3 * s * RANK + 4)  # inner mu,nu; P, Adam_P; count
  return total


def test_state_bytes_equal_closed_form_on_llama60m():
  params = llama60m_shapes()
  tx = osd_jax.osd_adamw(1e-3, RANK, weight_dimension_numbers=attention_and_mlp)
  measured = osd_jax.state_bytes(jax.eval_shape(tx.init, params))
  closed = osd_jax.expected_state_bytes(params, RANK, weight_dimension_numbers=attention_and_mlp)
  assert measured == closed == _hand_count("osd_adamw")
  adamw = osd_jax.state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  assert adamw == osd_jax.expected_state_bytes(params, optimizer="adamw") == _hand_count("adamw")
  assert measured / adamw == pytest.approx(_hand_count("osd_adamw") / _hand_count("adamw"), rel=0)
  assert measured < adamw
  print(f"\n60M r={RANK}: osd_adamw {measured / 2**20:.1f} MiB vs adamw {adamw / 2**20:.1f} MiB "
        f"(ratio {measured / adamw:.3f})")


@pytest.mark.parametrize("optimizer,make", [
    ("osd_lion", lambda lr, r, **kw: osd_jax.osd_lion(lr, r, **kw)),
    ("galore_adamw", lambda lr, r, **kw: osd_jax.galore_adamw(lr, r, **kw)),
])
def test_closed_form_for_other_aliases(optimizer, make):
  params = llama60m_shapes()
  tx = make(optax.constant_schedule(1e-3), RANK, weight_dimension_numbers=attention_and_mlp)
  measured = osd_jax.state_bytes(jax.eval_shape(tx.init, params))
  assert measured == osd_jax.expected_state_bytes(
      params, RANK, optimizer=optimizer, weight_dimension_numbers=attention_and_mlp,
      learning_rate_is_schedule=True)


def test_closed_form_with_batch_axes_and_bf16():
  params = {"stack": jax.ShapeDtypeStruct((3, 64, 96), jnp.bfloat16)}
  wdn = osd_jax.DimensionNumbers(1, 2)
  tx = osd_jax.osd_adamw(1e-3, 8, weight_dimension_numbers=wdn, mu_dtype=jnp.float32)
  measured = osd_jax.state_bytes(jax.eval_shape(tx.init, params))
  expected = 3 * (8 * 96 * (4 + 2) + 3 * 64 * 8 * 4 + 4) + 8
  assert measured == expected == osd_jax.expected_state_bytes(
      params, 8, weight_dimension_numbers=wdn, mu_dtype=jnp.float32)


def test_state_bytes_counts_real_arrays():
  state = {"a": jnp.zeros((3, 5), jnp.float32), "b": jnp.zeros(7, jnp.bfloat16)}
  assert osd_jax.state_bytes(state) == 3 * 5 * 4 + 7 * 2
  assert math.isclose(osd_jax.state_bytes({}), 0)
