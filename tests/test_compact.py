"""Compact precision: stochastic rounding (osd_jax.rounding), 8-bit moments (osd_jax.quantization)
and the building blocks that keep compact state (osd_jax.transforms), against NumPy in float64."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import osd_jax
from osd_jax import quantization, rounding, transforms


def _neighbours(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
  """The two numbers of ``dtype`` around each float64 ``x`` (both ``x`` where it is one): from
  the sorted table of every finite number of the dtype, in float64."""
  width = np.dtype(dtype).itemsize * 8
  every = np.arange(2 ** width, dtype=np.uint64).astype({8: np.uint8, 16: np.uint16}[width])
  values = every.view(dtype).astype(np.float64)
  values = np.unique(values[np.isfinite(values)])
  hi = np.searchsorted(values, x, side="left")
  exact = values[np.minimum(hi, len(values) - 1)] == x
  lo = np.where(exact, x, values[np.maximum(hi - 1, 0)])
  return lo, np.where(exact, x, values[np.minimum(hi, len(values) - 1)])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn])
def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour(dtype):
  """Each of 64 values, rounded with 4000 seeds: always one of its two neighbours in ``dtype``,
  and the mean is the value (within 4.5 standard errors of the Bernoulli choice), float64."""
  rng = np.random.default_rng(0)
  x32 = (rng.normal(size=64) * 3).astype(np.float32)
  x = x32.astype(np.float64)
  np_dtype = {jnp.bfloat16: ml_dtypes.bfloat16, jnp.float16: np.float16,
              jnp.float8_e4m3fn: ml_dtypes.float8_e4m3fn}[dtype]
  lo, hi = _neighbours(x, np_dtype)
  seeds = jnp.arange(4000, dtype=jnp.uint32)
  draws = jax.jit(jax.vmap(lambda s: rounding.stochastic_round(jnp.asarray(x32), dtype, s)))(
      seeds)
  got = np.asarray(draws.astype(jnp.float32), np.float64)
  assert np.all((got == lo) | (got == hi))
  p = np.where(hi > lo, (x - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
  stderr = (hi - lo) * np.sqrt(p * (1 - p) / len(seeds))
  assert np.all(np.abs(got.mean(axis=0) - x) <= 4.5 * stderr + 1e-12)
  # rounding toward the nearer neighbour is the likelier outcome
  nearer_is_hi = (hi - x) < (x - lo)
  frac_hi = (got == hi).mean(axis=0)
  assert np.all(frac_hi[nearer_is_hi & (p > 0.6)] > 0.5)


def test_stochastic_rounding_keeps_representable_values_and_is_deterministic():
  exact = jnp.asarray([0.0, -0.0, 1.0, -2.5, 2.0**127, jnp.inf, -jnp.inf], jnp.float32)
  out = rounding.stochastic_round(exact, jnp.bfloat16, seed=3)
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)).view(np.int32),
                                np.asarray(exact).view(np.int32))
  assert bool(jnp.isnan(rounding.stochastic_round(jnp.float32(jnp.nan), jnp.bfloat16, 0)))
  x = jax.random.normal(jax.random.key(0), (4, 6, 10))
  a = rounding.stochastic_round(x, jnp.bfloat16, seed=11)
  np.testing.assert_array_equal(a, rounding.stochastic_round(x, jnp.bfloat16, seed=11))
  assert not np.array_equal(a, rounding.stochastic_round(x, jnp.bfloat16, seed=12))
  # a slice at its offset draws the bits it draws in the whole array
  for i in range(4):
    part = rounding.stochastic_round(x[i], jnp.bfloat16, seed=11, offset=i * 60)
    np.testing.assert_array_equal(part, a[i])


def test_small_updates_survive_in_bfloat16_only_with_stochastic_rounding():
  """1000 updates of +1e-4 to weights at 1.0: round to nearest keeps 1.0 (the step is below half
  of bfloat16's spacing 2⁻⁷), stochastic rounding ends at 1.1 on average."""
  w_rtn = w_sr = jnp.ones(2048, jnp.bfloat16)
  for t in range(1000):
    u = jnp.full(2048, 1e-4)
    w_rtn = optax.apply_updates(w_rtn, u)
    w_sr = rounding.apply_updates({"w": w_sr}, {"w": u}, seed=t)["w"]
  assert bool(jnp.all(w_rtn == 1.0))
  mean = float(jnp.mean(w_sr.astype(jnp.float32)))
  assert abs(mean - 1.1) < 0.002, mean


@pytest.mark.parametrize("scheme", quantization.SCHEMES)
@pytest.mark.parametrize("signed", [True, False])
def test_quantization_round_trip_against_numpy(scheme, signed):
  """Every element comes back as one of the two table values around x/scale (times the block's
  absmax scale, computed in float64), unbiased over seeds; the block maxima come back exactly."""
  rng = np.random.default_rng(1)
  x = rng.standard_t(3, size=(3, 700)) * np.exp(rng.normal(size=(3, 1)))
  x = x if signed else np.abs(x)
  x32 = x.astype(np.float32)
  table = quantization.table(scheme, signed).astype(np.float64)
  blocks = np.pad(np.asarray(x32, np.float64), [(0, 0), (0, 68)]).reshape(3, 3, 256)
  scale = np.abs(blocks).max(axis=-1)
  q = quantization.quantize(jnp.asarray(x32), signed=signed, scheme=scheme, seed=5)
  assert q.codes.shape == (3, 700) and q.codes.dtype == jnp.uint8 and q.scale.shape == (3, 3)
  np.testing.assert_allclose(q.scale, scale, rtol=0)
  y = (blocks / scale[..., None]).reshape(3, -1)[:, :700]
  hi_idx = np.clip(np.searchsorted(table, y, side="left"), 1, len(table) - 1)
  lo_v, hi_v = table[hi_idx - 1], table[hi_idx]
  back = np.asarray(quantization.dequantize(q), np.float64)
  s = np.repeat(scale, 256, axis=-1)[:, :700]
  ok = np.isclose(back, lo_v * s, rtol=1e-6, atol=0) | np.isclose(back, hi_v * s, rtol=1e-6,
                                                                 atol=0)
  assert ok.all()
  biggest = np.abs(blocks).argmax(axis=-1)  # each block's absmax element: exactly itself
  for r in range(3):
    for b in range(3):
      j = b * 256 + biggest[r, b]
      if j < 700:
        assert back[r, j] == np.float64(x32[r, j])
  # unbiased: the mean over seeds is x, within the rounding's standard error
  draws = np.stack([np.asarray(quantization.dequantize(quantization.quantize(
      jnp.asarray(x32[:1, :256]), signed=signed, scheme=scheme, seed=k)), np.float64)
      for k in range(400)])
  mean = draws.mean(axis=0)
  width = (hi_v - lo_v)[0, :256] * s[0, :256]
  assert np.all(np.abs(mean - x32[0, :256]) <= 4.5 * width / np.sqrt(4 * 400) + 1e-12)


def test_eight_bit_adam_state_bytes_are_exact():
  params = {"w": jnp.zeros((64, 700)), "b": jnp.zeros(700), "s": jnp.zeros(())}
  for optimizer, make in (("adamw", lambda: optax.chain(transforms.scale_by_adam(
      state_dtype="int8"))), ("osd_adamw", lambda: osd_jax.osd_adamw(1e-3, 8, state_dtype="int8")),
                          ("galore_adamw", lambda: osd_jax.galore_adamw(1e-3, 8,
                                                                        state_dtype="int8")),
                          ("osd_lion", lambda: osd_jax.osd_lion(1e-3, 8, state_dtype="int8"))):
    state = jax.eval_shape(make().init, params)
    expected = osd_jax.expected_state_bytes(params, 8, optimizer=optimizer, state_dtype="int8")
    assert osd_jax.state_bytes(state) == expected, optimizer
  # by hand for osd_adamw: inner moments (8, 700) and full-rank ones, P (64, 8) in float32,
  # P's moments (64, 8) in 8 bits, counts
  by_hand = (2 * (8 * 700 + 4 * 8 * 3)  # the projected matrix's two moments, 3 blocks per row
             + 2 * (700 + 4 * 3) + 2 * (1 + 4)  # "b" (3 blocks) and "s" (one element, one block)
             + 64 * 8 * 4 + 2 * (64 * 8 + 4 * 64) + 4  # P, P's moments (1 block/row), P's count
             + 4 + 4)  # the subspace and inner counts
  state = jax.eval_shape(osd_jax.osd_adamw(1e-3, 8, state_dtype="int8").init, params)
  assert osd_jax.state_bytes(state) == by_hand


@pytest.mark.parametrize("projector_optimizer", ["adam", "lion", "adafactor"])
@pytest.mark.parametrize("state_dtype", [None, "int8"])
def test_projector_optimizer_state_bytes_are_exact(projector_optimizer, state_dtype):
  """P's optimizer's state, stacked over 3 layers, counted exactly and by hand."""
  params = {"w": jnp.zeros((3, 64, 700)), "b": jnp.zeros(700)}
  dims = {"w": osd_jax.DimensionNumbers(1, 2), "b": None}
  for optimizer in ("osd_adamw", "osd_lion"):
    alias = getattr(osd_jax, optimizer)
    tx = alias(1e-3, 8, weight_dimension_numbers=dims, state_dtype=state_dtype,
               projector=osd_jax.ProjectorOptions(optimizer=projector_optimizer))
    state = jax.eval_shape(tx.init, params)
    assert osd_jax.state_bytes(state) == osd_jax.expected_state_bytes(
        params, 8, optimizer=optimizer, weight_dimension_numbers=dims, state_dtype=state_dtype,
        projector_optimizer=projector_optimizer), optimizer
  # by hand, P's optimizer only, per layer (P is 64 × 8, float32): the difference to Adam's
  moment = 64 * 8 * 4 if state_dtype is None else 64 * 8 + 64 * 4  # 1 block of 256 per row
  p_state = {"adam": 2 * moment + 4, "lion": moment + 4,
             "adafactor": 4 * (64 + 8 + 1) + 4}[projector_optimizer]  # rows, columns, optax's
  adam = jax.eval_shape(osd_jax.osd_adamw(1e-3, 8, weight_dimension_numbers=dims,  # placeholder
                                          state_dtype=state_dtype).init, params)
  state = jax.eval_shape(osd_jax.osd_adamw(
      1e-3, 8, weight_dimension_numbers=dims, state_dtype=state_dtype,
      projector=osd_jax.ProjectorOptions(optimizer=projector_optimizer)).init, params)
  assert osd_jax.state_bytes(adam) - osd_jax.state_bytes(state) == 3 * (2 * moment + 4 - p_state)


@pytest.mark.parametrize("state_dtype, tol", [("float32", 1e-6), ("bfloat16", 2e-2),
                                              ("int8_dynamic", 8e-2), ("int8", 2e-1)])
def test_compact_adam_follows_optax(state_dtype, tol):
  """20 steps on the same gradients: N within ``tol`` (relative, whole leaf) of optax's. The
  dynamic map's finer steps near a block's maximum (0.7 % at 1) give 0.05–0.08 here, e4m3's
  (6–12 % in every binade) 0.16: per step e4m3 is the noisier on gradients of one scale, and
  the closer on gradients of many (test_eight_bit_adam_keeps_small_elements_of_a_block)."""
  g0 = {"w": jnp.zeros((6, 300)), "b": jnp.zeros(20)}
  ours, ref = transforms.scale_by_adam(state_dtype=state_dtype), optax.scale_by_adam()
  s1, s2 = ours.init(g0), ref.init(g0)
  update = jax.jit(ours.update)
  for t in range(20):
    g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.key(t), x.shape), g0)
    n1, s1 = update(g, s1)
    n2, s2 = ref.update(g, s2)
  for a, b in zip(jax.tree.leaves(n1), jax.tree.leaves(n2)):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < tol


@pytest.mark.parametrize("state_dtype", ["int8_dynamic", "int8"])
def test_eight_bit_adam_keeps_small_elements_of_a_block(state_dtype):
  """Gradients whose scale falls over 4 decades along a block (8 decades in v = E[g²]), 60
  steps: the RMS of N over each eighth of the block (half a decade) stays within 2× of optax's
  (float32). Stored as v, a block's small elements round to 0 and their next N is far too
  large (measured: RMS ratio up to 1.6e3 with the dynamic map, 4.1e3 with e4m3; the tiny demo
  diverged); stored as √v (osd_jax.transforms): 0.99–1.38 dynamic map, 0.97–1.05 e4m3."""
  scales = 10.0 ** -jnp.linspace(0.0, 4.0, 256)
  g0 = {"w": jnp.zeros((8, 256))}
  ours, ref = transforms.scale_by_adam(state_dtype=state_dtype), optax.scale_by_adam()
  s1, s2 = ours.init(g0), ref.init(g0)
  update = jax.jit(ours.update)
  ratios = []
  for t in range(60):
    g = {"w": jax.random.normal(jax.random.key(t), (8, 256)) * scales}
    n1, s1 = update(g, s1)
    n2, s2 = ref.update(g, s2)
    rms = [np.sqrt(np.mean(np.asarray(n, np.float64).reshape(8, 8, 32) ** 2, axis=(0, 2)))
           for n in (n1["w"], n2["w"])]
    ratios.append(rms[0] / rms[1])
  assert 0.5 < np.min(ratios) and np.max(ratios) < 2.0, (np.min(ratios), np.max(ratios))


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_a_skipped_step_keeps_compact_moments_bitwise(state_dtype):
  params = {"w": jax.random.normal(jax.random.key(0), (12, 300)), "b": jnp.ones(20)}
  tx = osd_jax.osd_adamw(1e-2, 4, state_dtype=state_dtype,
                         projector=osd_jax.ProjectorOptions(dtype="bfloat16"))
  state = tx.init(params)
  update = jax.jit(lambda g, s, ok: tx.update(g, s, params, apply_step=ok))
  for t in range(3):
    g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.key(10 + t), x.shape), params)
    _, kept = update(jax.tree.map(lambda x: x * jnp.nan, g), state, jnp.bool_(False))
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, state = update(g, state, jnp.bool_(True))
  assert state[0].projector_state["w"].state.p.dtype == jnp.bfloat16
  mu = state[0].projector_state["w"].state.opt_state.mu
  assert quantization.is_quantized(mu) if state_dtype == "int8" else mu.dtype == jnp.bfloat16


def test_eight_bit_state_shards_like_the_moment():
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:4]).reshape(4), ("fsdp",))
  params = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.float32),
            "h": jax.ShapeDtypeStruct((512, 64), jnp.float32)}
  specs = {"w": NamedSharding(mesh, P("fsdp", None)), "h": NamedSharding(mesh, P(None, "fsdp"))}
  tx = osd_jax.osd_adamw(1e-3, 32, state_dtype="int8",
                         weight_dimension_numbers={"w": osd_jax.DimensionNumbers(), "h": None})
  shardings = osd_jax.optimizer_state_sharding(jax.eval_shape(tx.init, params), specs)
  inner = shardings[0].inner_state
  assert inner.mu["h"].codes.spec == P(None, "fsdp")  # an unprojected leaf: the param's spec
  assert inner.mu["h"].scale.spec == P()  # 512 // 256 = 2 blocks: not divisible by 4
  proj = shardings[0].projector_state["w"].state
  assert proj.p.spec == P(None, None) or proj.p.spec == P()  # w is (1024, 512): s = 512
  assert inner.mu["w"].codes.spec == P(None, "fsdp")  # (r, L = 1024): L as the param's axis 0


# ---------------------------------------------------------------- the trainer's compact precision


def _compact_config(run_dir=None, **overrides):
  from tests.train_utils import small_config

  base = dict(model_overrides={"dim": 32, "hidden_dim": 64, "n_layers": 3, "n_heads": 4,
                               "vocab_size": 512},
              param_dtype="bfloat16", state_dtype="int8", fused_update=True, steps=4,
              ckpt_every=2, log_every=2, grad_clip=0.0,  # (the fused step clips by the last norm)
              run_dir=None if run_dir is None else str(run_dir))
  base.update(overrides)
  return small_config(**base)


def test_compact_defaults_and_flags():
  from train import __main__ as cli

  cfg = cli.parse_config(["--param-dtype", "bfloat16", "--state-dtype", "int8"])
  assert cfg.state_dtype == "int8" and cfg.resolved_stochastic_rounding and cfg.compact_state
  cfg = cli.parse_config(["--param-dtype", "bfloat16", "--no-stochastic-rounding"])
  assert not cfg.resolved_stochastic_rounding and cfg.state_dtype is None
  assert not cli.parse_config([]).resolved_stochastic_rounding  # float32 weights


@pytest.mark.parametrize("optimizer", ["osd_adamw", "adamw"])
def test_compact_run_resumes_bitwise_and_matches_the_unfused_step(optimizer, tmp_path,
                                                                   train_tokenizer):
  """bf16 weights (stochastic rounding), 8-bit state, the fused update: a run stopped at step 2
  and resumed ends bitwise where the uninterrupted one ends; the unfused step takes the same
  stochastic-rounding bits (each block's slice draws what it draws in the whole stack), so it
  ends within a bf16 step of it."""
  from tests.train_utils import assert_trees_equal, one_device
  from train import trainer

  cfg = _compact_config(optimizer=optimizer)
  whole = trainer.train(cfg.replace(run_dir=str(tmp_path / "whole")), tokenizer=train_tokenizer,
                        devices=one_device())
  run = cfg.replace(run_dir=str(tmp_path / "split"))
  trainer.train(run, tokenizer=train_tokenizer, devices=one_device(), stop_at=2)
  resumed = trainer.train(run.replace(resume=True), tokenizer=train_tokenizer,
                          devices=one_device())
  assert_trees_equal(resumed.state, whole.state)
  params = whole.state.params
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  moments = whole.state.opt_state[-1][0]
  moments = moments.inner_state if optimizer == "osd_adamw" else moments
  assert quantization.is_quantized(moments.mu["head"]["kernel"])
  unfused = trainer.train(cfg.replace(run_dir=str(tmp_path / "unfused"), fused_update=False),
                          tokenizer=train_tokenizer, devices=one_device())
  for a, b in zip(jax.tree.leaves(unfused.state.params), jax.tree.leaves(params)):
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    spacing = np.abs(np.asarray(b, np.float32)) * 2.0 ** -7 + 1e-30
    assert np.mean(diff > spacing) < 0.01  # at most a step apart, and that rarely


def test_a_checkpoint_with_another_state_dtype_is_refused_in_one_line(tmp_path, train_tokenizer):
  from tests.train_utils import one_device
  from train import checkpoint as ckpt_lib
  from train import trainer

  cfg = _compact_config(tmp_path / "run", steps=2, fused_update=False)
  trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  with pytest.raises(ckpt_lib.CheckpointError, match="state_dtype: 'int8' in the checkpoint, "
                                                     "'bfloat16' now") as e:
    trainer.train(cfg.replace(state_dtype="bfloat16", resume=True, steps=4),
                  tokenizer=train_tokenizer, devices=one_device())
  assert "\n" not in str(e.value)


def test_projector_optimizer_flag_trains_and_is_structural(tmp_path, train_tokenizer):
  """--projector-optimizer adafactor keeps P's factored statistics (s + r floats, no s×r moment)
  through the fused compact step; resuming it as another P optimizer is refused in one line, and
  a checkpoint written before the flag existed counts as adam."""
  from tests.train_utils import one_device
  from train import __main__ as cli
  from train import checkpoint as ckpt_lib
  from train import config as config_lib
  from train import trainer

  assert config_lib.PROJECTOR_OPTIMIZERS == tuple(osd_jax.projectors.PROJECTOR_OPTIMIZERS)
  assert cli.parse_config(["--projector-optimizer", "lion"]).projector_optimizer == "lion"
  assert cli.parse_config([]).projector_optimizer == "adam"
  with pytest.raises(config_lib.ConfigError, match="--projector-optimizer 'sgd'"):
    config_lib.validate(_compact_config(projector_optimizer="sgd"))
  cfg = _compact_config(tmp_path / "run", steps=2, projector_optimizer="adafactor")
  result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  proj = result.state.opt_state[-1][0].projector_state["layers"]["mlp"]["w1"]["kernel"].state
  factored = proj.opt_state[0]  # (factored second moment, the update clipping's empty state)
  assert isinstance(factored, optax.FactoredState) and int(np.max(factored.count)) == 1
  s, r = proj.p.shape[-2:]  # stacked over the 3 layers
  assert factored.v_row.shape[-1] + factored.v_col.shape[-1] == s + r
  assert {factored.v_row.dtype, factored.v_col.dtype} == {jnp.dtype(jnp.float32)}
  assert np.all(np.isfinite(np.asarray(proj.p, np.float32)))
  with pytest.raises(ckpt_lib.CheckpointError, match="projector_optimizer: 'adafactor' in the "
                                                     "checkpoint, 'adam' now") as e:
    trainer.train(cfg.replace(projector_optimizer="adam", resume=True, steps=4),
                  tokenizer=train_tokenizer, devices=one_device())
  assert "\n" not in str(e.value)
  assert ckpt_lib.config_diff({"optimizer": "osd_adamw"},
                              {"optimizer": "osd_adamw", "projector_optimizer": "adam"}) == []
  assert ckpt_lib.config_diff({"optimizer": "adamw"},
                              {"optimizer": "adamw", "projector_optimizer": "lion"}) == []


@pytest.mark.parametrize("with_offset", [True, False])
def test_rounding_bits_are_not_hoisted_out_of_a_layer_loop(with_offset):
  """The element index is loop-invariant; XLA used to hoist it out of the fused update's layer
  loop and carry a uint32 per element of a slice through the whole loop (0.8 GiB at 7B)."""
  n_layers, m, n = 3, 64, 384

  def step(w, u):
    def body(i, w):
      total = w[i].astype(jnp.float32) + u[i]
      seed = rounding.combine_seeds(5, i)
      offset = i.astype(jnp.uint32) * np.uint32(m * n) if with_offset else 0
      return w.at[i].set(rounding.stochastic_round(total, jnp.bfloat16, seed, offset))
    return jax.lax.fori_loop(0, n_layers, body, w)

  args = (jax.ShapeDtypeStruct((n_layers, m, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((n_layers, m, n), jnp.float32))
  hlo = jax.jit(step, donate_argnums=0).lower(*args).compile().as_text()
  loops = [line for line in hlo.splitlines() if " while(" in line]
  assert loops and not any(f"u32[{m},{n}]" in line for line in loops)
