"""The refresh branch's temporary memory does not grow with the number of stacked matrices.

An SVD works on a copy of its input and makes a Vᵀ as large as it; vmapped over the layer axis
of a stacked [n_layers, s, L] gradient it would hold n_layers of those at once (at 7B, tens of
GiB). The refresh loops over batch axes instead, so its temporaries are one matrix's. Read from
XLA's memory analysis of the compiled update (CPU); nothing is timed.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import osd_jax
from osd_jax import projectors

S, L, RANK = 64, 256, 4
MATRIX_BYTES = S * L * 4


def _temp_bytes(rule, n_layers: int) -> int:
  params = {"w": jax.ShapeDtypeStruct((n_layers, S, L), jnp.float32)}
  wdn = {"w": osd_jax.DimensionNumbers(1, 2)}
  tx = osd_jax.scale_by_subspace_descent(optax.scale_by_adam(), RANK, rule,
                                         weight_dimension_numbers=wdn)
  state = jax.eval_shape(tx.init, params)
  compiled = jax.jit(lambda g, st: tx.update(g, st)).lower(params, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _without_refresh(rule):
  """The same rule's per-step part alone (no conditional, no SVD)."""
  return projectors.projector_rule(rule.init, rule.step)


@pytest.mark.parametrize("rule", [projectors.frozen(), projectors.svd(every=10),
                                  projectors.online_pca(1e-2)], ids=["frozen", "svd", "online_pca"])
def test_refresh_temporaries_do_not_scale_with_stacked_layers(rule):
  refresh_cost = {n: _temp_bytes(rule, n) - _temp_bytes(_without_refresh(rule), n)
                  for n in (2, 8)}
  # 4× the layers add less than one matrix's worth: a vmapped SVD would add
  # 6 × (input copy + Vᵀ) ≥ 12 matrices.
  assert refresh_cost[8] - refresh_cost[2] < MATRIX_BYTES, refresh_cost
  # The gradients are not copied into the conditional: that alone would be 8 matrices.
  assert refresh_cost[8] < 2 * MATRIX_BYTES, refresh_cost
