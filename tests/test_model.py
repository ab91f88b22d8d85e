"""Tests of the Flax NNX LLaMA in train/model.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train import model as model_lib

SMALL = model_lib.LlamaConfig(vocab_size=97, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                              max_seq_len=16)
NOMINAL = {"60m": 60e6, "130m": 130e6, "350m": 350e6, "1b": 1e9, "7b": 7e9}
# The LLaMA configs of the GaLore paper (Zhao et al. 2024, appendix table "Hyperparameters of LLaMA
# models for evaluation"; configs/llama_*.json in jiaweizzhao/GaLore):
# (dim, hidden_dim, n_layers, n_heads); vocab 32000, one key/value head per query head.
GALORE_SHAPES = {"60m": (512, 1376, 8, 8), "130m": (768, 2048, 12, 12),
                 "350m": (1024, 2736, 24, 16), "1b": (2048, 5461, 24, 32),
                 "7b": (4096, 11008, 32, 32)}


def _flat_params(model_or_state):
  state = nnx.state(model_or_state, nnx.Param)
  return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _tokens(cfg, batch=2, seq=None, seed=0):
  seq = seq or cfg.max_seq_len
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_forward_shapes_and_dtypes(dtype):
  cfg = SMALL.replace(dtype=dtype)
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  logits = model(_tokens(cfg, batch=3, seq=10))
  assert logits.shape == (3, 10, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert all(v.dtype == jnp.float32 for v in _flat_params(model).values())


def _block_shapes(cfg, n_kv):
  d, h, f = cfg.dim, cfg.head_dim, cfg.hidden_dim
  return {"attention/wq/kernel": (d, cfg.n_heads * h), "attention/wk/kernel": (d, n_kv * h),
          "attention/wv/kernel": (d, n_kv * h), "attention/wo/kernel": (cfg.n_heads * h, d),
          "mlp/w1/kernel": (d, f), "mlp/w3/kernel": (d, f), "mlp/w2/kernel": (f, d),
          "attention_norm/scale": (d,), "mlp_norm/scale": (d,)}


def test_param_paths_and_shapes():
  """Unrolled: ``layers/<i>/...``; scanned (the default): ``layers/...`` with a leading layer
  axis on every leaf (the param-tree contract the exporters and the optimizer rules rely on)."""
  cfg = SMALL.replace(n_kv_heads=2)
  assert cfg.scan_layers
  d = cfg.dim
  top = {"embed/embedding": (cfg.vocab_size, d), "head/kernel": (d, cfg.vocab_size),
         "norm/scale": (d,)}
  scanned = _flat_params(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  assert {k: tuple(v.shape) for k, v in scanned.items()} == top | {
      "layers/" + k: (cfg.n_layers,) + shape for k, shape in _block_shapes(cfg, 2).items()}
  unrolled = _flat_params(model_lib.Llama(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))
  assert {k: tuple(v.shape) for k, v in unrolled.items()} == top | {
      f"layers/{i}/" + k: shape for i in range(cfg.n_layers)
      for k, shape in _block_shapes(cfg, 2).items()}


@pytest.mark.parametrize("scan", [True, False])
def test_logical_axis_names_on_every_param(scan):
  for cfg in (SMALL.replace(scan_layers=scan), SMALL.replace(n_kv_heads=1, scan_layers=scan)):
    params = _flat_params(model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
    for path, v in params.items():
      names = v.get_metadata().get("out_sharding")
      assert names is not None and len(names) == v.ndim, path
      assert set(names) <= set(model_lib.LOGICAL_AXIS_NAMES), (path, names)
    grouped = cfg.grouped
    layer = ("layers",) if scan else ()
    wk, w2 = ("layers/attention/wk/kernel", "layers/mlp/w2/kernel") if scan else (
        "layers/0/attention/wk/kernel", "layers/1/mlp/w2/kernel")
    assert params[wk].get_metadata()["out_sharding"] == layer + (
        "embed", "kv" if grouped else "heads")
    assert params["embed/embedding"].get_metadata()["out_sharding"] == ("vocab", "embed")
    assert params["head/kernel"].get_metadata()["out_sharding"] == ("embed", "vocab")
    assert params[w2].get_metadata()["out_sharding"] == layer + ("mlp", "embed")
    assert params["norm/scale"].get_metadata()["out_sharding"] == ("norm",)
    if scan:
      assert params["layers/mlp_norm/scale"].get_metadata()["out_sharding"] == ("layers", "norm")


@pytest.mark.parametrize("n_kv", [None, 2])
def test_scanned_forward_equals_unrolled_forward_with_the_same_weights(n_kv):
  """The scan over stacked params computes the loop over blocks: the unrolled model's params,
  stacked with ``stack_layers``, give the same float32 logits (and ``unstack_layers`` inverts)."""
  cfg = SMALL.replace(dtype="float32", n_kv_heads=n_kv, n_layers=3)
  unrolled = model_lib.Llama(cfg.replace(scan_layers=False), rngs=nnx.Rngs(8))
  params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  stacked = model_lib.stack_layers(params)
  assert stacked["layers"]["attention"]["wq"]["kernel"].shape == (3, cfg.dim, cfg.dim)
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["w2"]["kernel"][1],
                                params["layers"][1]["mlp"]["w2"]["kernel"])
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0))))
  scanned = nnx.merge(graphdef, stacked)
  tokens = _tokens(cfg, seed=9)
  want, got = np.asarray(unrolled(tokens)), np.asarray(scanned(tokens))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(want).max() > 1e-2  # not a trivially small output
  back = model_lib.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("dtype,n_kv", [("bfloat16", None), ("float32", None), ("float32", 2),
                                        ("bfloat16", 1)])
def test_causal_mask(dtype, n_kv):
  """Changing tokens at positions >= k never changes the logits at positions < k."""
  cfg = SMALL.replace(dtype=dtype, n_kv_heads=n_kv)
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(1))
  forward = jax.jit(lambda m, x: m(x))
  tokens = _tokens(cfg, seed=2)
  base = np.asarray(forward(model, tokens))
  for k in (1, 5, cfg.max_seq_len - 1):
    changed = tokens.at[:, k:].set((tokens[:, k:] + 7) % cfg.vocab_size)
    out = np.asarray(forward(model, changed))
    np.testing.assert_array_equal(out[:, :k], base[:, :k])
    assert not np.array_equal(out[:, k:], base[:, k:])


def _rope_reference(x, positions, theta):
  """float64 NumPy RoPE: feature i pairs with i + h/2 as the complex number x_i + i·x_{i+h/2}."""
  x = np.asarray(x, np.float64)
  h = x.shape[-1]
  freqs = theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
  angle = np.asarray(positions, np.float64)[..., None] * freqs  # [B, T, h/2]
  z = (x[..., : h // 2] + 1j * x[..., h // 2:]) * np.exp(1j * angle)[..., None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_numpy_reference():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
  positions = np.stack([np.arange(9), np.arange(100, 109)])
  got = np.asarray(model_lib.apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0))
  np.testing.assert_allclose(got, _rope_reference(x, positions, 10000.0), rtol=1e-4, atol=2e-5)
  # position 0 is the identity, and the rotation preserves norms
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 32)).astype(np.float32)
  def score(m, n):
    rq = model_lib.apply_rope(jnp.asarray(q), jnp.array([[m]]), 500.0)
    rk = model_lib.apply_rope(jnp.asarray(k), jnp.array([[n]]), 500.0)
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-4)
  np.testing.assert_allclose(score(7, 7), float(np.sum(q * k)), rtol=1e-4)


def test_grouped_kv_equals_multi_head_with_repeated_kv():
  """A GQA model equals the MHA model whose k/v heads are copies of the shared kv heads."""
  gqa_cfg = SMALL.replace(dtype="float32", n_kv_heads=2, scan_layers=False)
  mha_cfg = gqa_cfg.replace(n_kv_heads=None)
  gqa = model_lib.Llama(gqa_cfg, rngs=nnx.Rngs(3))
  mha = model_lib.Llama(mha_cfg, rngs=nnx.Rngs(4))
  nnx.update(mha, {k: v for k, v in nnx.state(gqa, nnx.Param).items() if k != "layers"})
  group, h = gqa_cfg.n_heads // 2, gqa_cfg.head_dim
  for lg, lm in zip(gqa.layers, mha.layers):
    for name in ("wq", "wo"):
      getattr(lm.attention, name).kernel[...] = getattr(lg.attention, name).kernel[...]
    for name in ("wk", "wv"):
      w = getattr(lg.attention, name).kernel[...].reshape(gqa_cfg.dim, 2, 1, h)
      w = jnp.repeat(w, group, axis=2).reshape(gqa_cfg.dim, gqa_cfg.n_heads * h)
      getattr(lm.attention, name).kernel[...] = w
    for name in ("attention_norm", "mlp_norm", "mlp"):
      nnx.update(getattr(lm, name), nnx.state(getattr(lg, name)))
  tokens = _tokens(gqa_cfg, seed=5)
  np.testing.assert_allclose(np.asarray(mha(tokens)), np.asarray(gqa(tokens)), rtol=1e-5,
                             atol=1e-5)
  assert model_lib.param_count(gqa_cfg) < model_lib.param_count(mha_cfg)


@pytest.mark.parametrize("n_kv", [None, 2])
def test_attention_impls_agree(n_kv):
  cfg = SMALL.replace(dtype="float32", n_kv_heads=n_kv)
  a = model_lib.Llama(cfg, rngs=nnx.Rngs(6))
  b = model_lib.Llama(cfg.replace(attention_impl="jax"), rngs=nnx.Rngs(6))
  tokens = _tokens(cfg, seed=7)
  np.testing.assert_allclose(np.asarray(a(tokens)), np.asarray(b(tokens)), rtol=1e-5, atol=1e-5)


def test_param_count_of_every_preset_without_allocation(capsys):
  rows = []
  for name in model_lib.PRESETS:
    cfg = model_lib.get_config(name)
    abstract = nnx.eval_shape(lambda cfg=cfg: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
    leaves = _flat_params(abstract).values()
    assert all(isinstance(v.get_value(), jax.ShapeDtypeStruct) for v in leaves)
    n = sum(int(np.prod(v.shape)) for v in leaves)
    assert n == model_lib.param_count(cfg), name
    flops = model_lib.flops_per_token(cfg, 256)
    rows.append(f"{name:>5}: {n:>14,d} params, {flops:.3e} FLOPs/token")
    if name in NOMINAL:
      assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads) == GALORE_SHAPES[name], name
      assert cfg.num_kv_heads == cfg.n_heads, name
      assert cfg.vocab_size == 32000
      assert 0.8 * NOMINAL[name] <= n <= 1.4 * NOMINAL[name], (name, n)
  assert set(NOMINAL) == set(GALORE_SHAPES) == set(model_lib.PRESETS) - {"tiny"}
  with capsys.disabled():
    print("\n" + "\n".join(rows))


def test_grouped_param_count():
  cfg = model_lib.get_config("60m", n_kv_heads=2)
  abstract = nnx.eval_shape(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(v.shape)) for v in _flat_params(abstract).values())
  assert n == model_lib.param_count(cfg)


def test_flops_per_token_formula():
  cfg = model_lib.get_config("60m")
  n = model_lib.param_count(cfg)
  matmul = n - cfg.vocab_size * cfg.dim - (2 * cfg.n_layers + 1) * cfg.dim
  assert model_lib.flops_per_token(cfg, 256) == 6 * matmul + 12 * cfg.n_layers * 256 * cfg.dim


def test_get_config_and_validation_errors():
  assert model_lib.get_config("TINY", vocab_size=512).vocab_size == 512
  assert model_lib.get_config("60m").head_dim == 64
  with pytest.raises(ValueError, match=r"'13b'.*tiny, 60m, 130m, 350m, 1b, 7b"):
    model_lib.get_config("13b")
  with pytest.raises(ValueError, match="bogus"):
    model_lib.get_config("tiny", bogus=1)
  with pytest.raises(ValueError, match="n_heads"):
    SMALL.replace(n_heads=5)
  with pytest.raises(ValueError, match="n_kv_heads"):
    SMALL.replace(n_kv_heads=3)
  with pytest.raises(ValueError, match="attention_impl"):
    SMALL.replace(attention_impl="flash")
  with pytest.raises(ValueError, match="dtype"):
    SMALL.replace(dtype="notadtype")
  with pytest.raises(ValueError, match="max_seq_len"):
    model_lib.Llama(SMALL, rngs=nnx.Rngs(0))(jnp.zeros((1, SMALL.max_seq_len + 1), jnp.int32))
  assert dataclasses.is_dataclass(SMALL) and SMALL.to_dict()["dim"] == 32


def test_sharded_init_under_mesh_with_logical_rules():
  """Under ``jax.set_mesh`` and logical-axis rules, params are created already sharded."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py requests 8 fake CPU devices)")
  devices = np.array(jax.devices()[:4]).reshape(2, 2)
  mesh = jax.make_mesh((2, 2), ("fsdp", "tensor"), devices=devices.flatten().tolist(),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("kv", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor"), ("norm", None))
  cfg = SMALL.replace(n_kv_heads=2, vocab_size=96)  # divisible by the mesh axes
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = nnx.jit(lambda: model_lib.Llama(cfg, rngs=nnx.Rngs(0)))()
  params = _flat_params(model)
  spec = params["layers/attention/wq/kernel"].get_value().sharding.spec
  assert tuple(spec) == (None, "fsdp", "tensor")  # the layer axis is not in the rules: replicated
  assert tuple(params["embed/embedding"].get_value().sharding.spec) == ("tensor", "fsdp")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    model = nnx.jit(lambda: model_lib.Llama(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))()
  spec = _flat_params(model)["layers/0/attention/wq/kernel"].get_value().sharding.spec
  assert tuple(spec) == ("fsdp", "tensor")


@pytest.mark.parametrize("n_kv, scan", [(None, False), (2, False), (None, True)])
def test_every_activation_is_named_for_sharding(n_kv, scan):
  """Inside ``activation_sharding`` each block names 7 activations, plus the embedding table (as
  looked up), the embeddings and logits;
  the names fit each array's rank, and the constraint's output is what the model goes on with.
  (The scan traces its block once: 7 names for all layers.)"""
  cfg = SMALL.replace(dtype="float32", n_kv_heads=n_kv, scan_layers=scan)
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens(cfg)
  seen = []

  def record(x, names):
    seen.append((tuple(names), x.shape))
    return x

  with model_lib.activation_sharding(record):
    logits = model(tokens)
  kv = "kv" if n_kv else "heads"
  b, t, h = tokens.shape[0], tokens.shape[1], cfg.head_dim
  per_layer = [
      (("batch", "length", "heads", None), (b, t, cfg.n_heads, h)),
      (("batch", "length", kv, None), (b, t, cfg.num_kv_heads, h)),
      (("batch", "length", kv, None), (b, t, cfg.num_kv_heads, h)),
      (("batch", "length", "heads", None), (b, t, cfg.n_heads, h)),
      (("batch", "length", "activation_embed"), (b, t, cfg.dim)),
      (("batch", "length", "mlp"), (b, t, cfg.hidden_dim)),
      (("batch", "length", "activation_embed"), (b, t, cfg.dim)),
  ]
  assert seen == ([(("vocab", None), (cfg.vocab_size, cfg.dim)),  # the table, gathered over embed
                   (("batch", "length", "activation_embed"), (b, t, cfg.dim))]
                  + per_layer * (1 if scan else cfg.n_layers)
                  + [(("batch", "length", "vocab"), (b, t, cfg.vocab_size))])
  # outside the context the names are ignored, and the constraint never changes values
  np.testing.assert_array_equal(model(tokens), logits)
  with model_lib.activation_sharding(lambda x, names: x * 0):
    assert not np.any(np.asarray(model(tokens)))


def test_block_halves_compose_to_the_block_and_split_its_params():
  """``Llama.block_halves``: attend then feed_forward is the block; ATTENTION_HALF names exactly
  the params the attention half reads (the fused update splits a block's optimizer by it)."""
  cfg = SMALL.replace(dtype="float32", param_dtype="float32")
  model = model_lib.Llama(cfg, rngs=nnx.Rngs(0))
  p0 = jax.tree.map(lambda x: x[1], nnx.to_pure_dict(nnx.state(model.layers, nnx.Param)))
  positions = model_lib.positions_of(_tokens(cfg, batch=2, seq=8))
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.dim), jnp.float32)
  attend, feed_forward = model.block_halves(positions)
  np.testing.assert_allclose(feed_forward(p0, attend(p0, x)),
                             model.block_function(positions)(p0, x), rtol=1e-6, atol=1e-6)
  g_att = jax.grad(lambda p: jnp.sum(attend(p, x) ** 2))(p0)
  g_ff = jax.grad(lambda p: jnp.sum(feed_forward(p, x) ** 2))(p0)

  def touched(g):
    return {k for k, v in g.items() if any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(v))}

  assert touched(g_att) == set(model_lib.ATTENTION_HALF)
  assert touched(g_ff) == set(p0) - set(model_lib.ATTENTION_HALF)
