"""The training loop end to end on the embedded corpus, gradient accumulation, non-finite steps."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import osd_jax
from tests.train_utils import (
  assert_trees_equal,
  committed_steps,
  host,
  one_device,
  random_batch,
  small_config,
)
from train import optimizers, trainer
from train import sharding as shd
from train import train_step as step_lib

VOCAB = 256


@pytest.mark.parametrize("optimizer, lr", [
    ("adamw", 1e-2), ("osd_adamw", 1e-2), ("osd_lion", 3e-3), ("galore_adamw", 1e-2),
])
def test_loss_decreases_on_embedded_corpus(optimizer, lr, tmp_path, train_tokenizer):
  """The real ``tiny`` preset (4 layers, width 128; the vocabulary is the tokenizer's, as always)
  learns within 40 steps of 8 x 32 tokens (about 15 s per optimizer on 2 CPU cores)."""
  cfg = small_config(tmp_path / "run", optimizer=optimizer, lr=lr, steps=40,
                     update_proj_gap=10, model_overrides={})
  result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  mcfg = result.setup.model_config
  assert (mcfg.dim, mcfg.hidden_dim, mcfg.n_layers, mcfg.n_heads) == (128, 352, 4, 4)
  losses = [r["loss"] for r in result.history if "loss" in r]
  assert len(losses) == 40
  assert all(np.isfinite(losses))
  # ln(512) ~ 6.2 at init; the unigram entropy of this corpus is ~1 nat lower
  assert np.mean(losses[-5:]) < losses[0] - 0.8, losses
  assert result.final_eval["eval_loss"] < result.initial_eval["eval_loss"] - 0.8
  assert int(result.state.skipped) == 0


def test_run_dir_and_result_api(tmp_path, train_tokenizer):
  run_dir = tmp_path / "run"
  cfg = small_config(run_dir, steps=4, ckpt_every=2, tensorboard=True, eval_every=2)
  result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  assert result.run_dir == str(run_dir) and not result.preempted
  for name in ("config.json", "metrics.jsonl", "tokenizer.model", "tensorboard", "checkpoints"):
    assert os.path.exists(run_dir / name), name
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]
  saved = json.loads((run_dir / "config.json").read_text())
  assert saved["optimizer"] == "osd_adamw" and saved["rank"] == 4
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == [1, 2, 3, 4]
  for key in ("grad_norm", "lr", "orthogonality_error", "skipped_total"):
    assert key in train_records[-1], key
  assert "subspace_drift" in train_records[-1]
  assert train_records[-1]["mfu"] == "n/a"  # CPU: no peak-FLOPs entry
  evals = [r["step"] for r in records if "eval_loss" in r]
  assert evals == [0, 2, 4]
  assert result.history == records
  logits = result.model(jnp.zeros((1, 8), jnp.int32))
  assert logits.shape == (1, 8, train_tokenizer.vocab_size)


def _tensorboard_scalars(directory) -> dict:
  """{tag: {step: value}} as TensorBoard shows an event directory: files in name order, and a
  ``SessionLog.START`` event at step s hides the events read so far at steps >= s."""
  import struct

  from tensorboardX.proto import event_pb2

  seen = {}
  for path in sorted(directory.iterdir()):
    data, i = path.read_bytes(), 0
    while i < len(data):  # TFRecords: length, crc, payload, crc
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        seen = {tag: {k: v for k, v in steps.items() if k < event.step}
                for tag, steps in seen.items()}
      for value in event.summary.value:
        seen.setdefault(value.tag, {})[event.step] = value.simple_value
  return seen


def test_tensorboard_events_after_the_resume_step_are_purged(tmp_path):
  """Like metrics.jsonl, TensorBoard keeps the events up to the checkpoint a run resumes from and
  hides the ones a killed run wrote after it; a fresh start hides all earlier ones."""
  import time

  from train.run import metrics as metrics_lib

  def run(purge_step, steps, value, eval_at=()):
    writer = metrics_lib.MetricsWriter(str(tmp_path), purge_step=purge_step)
    for step in steps:
      writer.write(step, {"loss": value})
      if step in eval_at:
        writer.write(step, {"eval_loss": value})
    writer.close()
    time.sleep(1.1)  # tensorboardX names event files by the second

  run(0, range(1, 6), 1.0, eval_at=(2, 5))  # checkpoint at step 3, killed after step 5
  run(4, range(4, 7), 2.0)  # resumed from step 3 (the next eval comes later)
  scalars = _tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars["loss"] == {1: 1.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 2.0, 6: 2.0}
  assert scalars["eval_loss"] == {2: 1.0}  # not the killed run's eval at step 5
  run(0, [1], 3.0)  # a fresh start in the same run dir
  assert _tensorboard_scalars(tmp_path / "tensorboard") == {"loss": {1: 3.0}, "eval_loss": {}}


@pytest.mark.parametrize("scan", [True, False])
def test_projection_rule_follows_the_paper(scan):
  """Attention and MLP kernels are projected, per layer: a scanned kernel [layers, d_in, d_out]
  has the layer axis as a batch axis; norms (a scanned scale [layers, dim] too) are not matrices."""
  setup = trainer.build(small_config(scan_layers=scan), VOCAB)
  params = setup.abstract_state.params
  dims = optimizers.projection_rule(params, "attn_mlp")
  layer = dims["layers"] if scan else dims["layers"][0]
  matrix = osd_jax.DimensionNumbers(1, 2) if scan else osd_jax.DimensionNumbers(0, 1)
  assert layer["attention"]["wq"]["kernel"] == matrix
  assert layer["mlp"]["w2"]["kernel"] == matrix
  assert dims["embed"]["embedding"] is None and dims["head"]["kernel"] is None
  assert layer["attention_norm"]["scale"] is None
  everything = optimizers.projection_rule(params, "all")
  assert everything["head"]["kernel"] == osd_jax.DimensionNumbers(0, 1)
  all_layer = everything["layers"] if scan else everything["layers"][0]
  assert all_layer["mlp_norm"]["scale"] is None
  mask = optimizers.decay_mask(params)
  mask_layer = mask["layers"] if scan else mask["layers"][0]
  assert mask_layer["mlp"]["w1"]["kernel"] and not mask_layer["mlp_norm"]["scale"]
  assert mask["head"]["kernel"] and not mask["norm"]["scale"]
  shapes = optimizers.projected_shapes(params, "attn_mlp")  # per-layer matrices, for --rank
  assert shapes["layers/mlp/w2/kernel" if scan else "layers/0/mlp/w2/kernel"] == (64, 32)


def test_schedule_warmup_then_cosine_to_ten_percent():
  cfg = small_config(lr=1.0, steps=100, warmup_steps=10)
  sched = optimizers.make_schedule(cfg)
  np.testing.assert_allclose([sched(0), sched(4), sched(9), sched(10)], [0.1, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(sched(100), 0.1, rtol=1e-6)
  np.testing.assert_allclose(sched(55), 0.55, rtol=1e-5)  # cosine midpoint: (1 + 0.1) / 2


def test_adamw_scale_multiplies_only_the_projected_matrices_update():
  """``--optimizer adamw --scale s``: AdamW whose direction on the --project matrices is s times
  as large (GaLore's scale without the projection); float64 NumPy Adam as the reference."""
  rng = np.random.default_rng(0)
  shapes = {"layers": {"0": {"attention": {"wq": {"kernel": (4, 6)}}}},
            "head": {"kernel": (6, 5)}, "norm": {"scale": (6,)}}
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s)), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  cfg = small_config(optimizer="adamw", scale=0.25, weight_decay=0.1, grad_clip=0.0, lr=1e-2,
                     warmup_steps=2, steps=10)
  tx, schedule = optimizers.make_optimizer(cfg, params)
  state = tx.init(params)
  ref = {k: np.asarray(v, np.float64) for k, v in {
      "wq": params["layers"]["0"]["attention"]["wq"]["kernel"], "head": params["head"]["kernel"],
      "norm": params["norm"]["scale"]}.items()}
  m = {k: np.zeros_like(v) for k, v in ref.items()}
  v2 = {k: np.zeros_like(v) for k, v in ref.items()}
  factor = {"wq": 0.25, "head": 1.0, "norm": 1.0}
  decays = {"wq": True, "head": True, "norm": False}
  for t in range(1, 4):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), params)
    g = {"wq": grads["layers"]["0"]["attention"]["wq"]["kernel"], "head": grads["head"]["kernel"],
         "norm": grads["norm"]["scale"]}
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    lr = float(schedule(t - 1))
    for k in ref:
      gk = np.asarray(g[k], np.float64)
      m[k] = 0.9 * m[k] + 0.1 * gk
      v2[k] = 0.999 * v2[k] + 0.001 * gk**2
      direction = (m[k] / (1 - 0.9**t)) / (np.sqrt(v2[k] / (1 - 0.999**t)) + 1e-8)
      ref[k] = ref[k] - lr * (factor[k] * direction + (0.1 * ref[k] if decays[k] else 0.0))
  np.testing.assert_allclose(params["layers"]["0"]["attention"]["wq"]["kernel"], ref["wq"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["head"]["kernel"], ref["head"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["norm"]["scale"], ref["norm"], rtol=1e-5, atol=1e-6)


def test_full_rank_adamw_train_step_matches_an_independent_float64_adamw():
  """Rules out a trainer bug in the full-rank path (the quality study's AdamW deficit,
  benchmarks/RESULTS.md §4c): the trainer's whole adamw step (mean token loss, global-norm clip,
  warmup-cosine schedule, decay on matrices only) against the model's gradient of a separately
  written loss fed to a float64 NumPy AdamW."""
  from flax import nnx

  cfg = small_config(optimizer="adamw", lr=1e-2, weight_decay=0.1, grad_clip=0.5,
                     warmup_steps=2, steps=6, min_lr_ratio=0.1)
  setup = trainer.build(cfg, VOCAB, devices=one_device())
  state = setup.init_state()
  params0 = host(state.params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params0)]
  leaves0, treedef = jax.tree.flatten(params0)
  decays = ["kernel" in p or "embedding" in p for p in paths]  # norm scales are not decayed
  assert sum(decays) == len(decays) - 3

  def mean_loss(params, batch):  # written here, not train_step.token_loss
    logits = nnx.merge(setup.graphdef, params)(batch["inputs"]).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.mean(logz - picked)

  grad_fn = jax.jit(jax.grad(mean_loss))
  ref = [np.asarray(x, np.float64) for x in leaves0]
  m = [np.zeros_like(x) for x in ref]
  v = [np.zeros_like(x) for x in ref]
  clipped = 0
  for t in range(1, 5):
    batch = random_batch(t, 8, 32, VOCAB)
    state, _ = setup.train_step(state, batch)
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad_fn(
        jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in ref]), batch))]
    norm = np.sqrt(sum(np.sum(x**2) for x in g))
    clipped += norm > 0.5
    g = [x * min(1.0, 0.5 / norm) for x in g]
    k = t - 1  # lr(k): linear warmup from lr/2 over 2 steps, then cosine to lr/10 at step 6
    lr = 1e-2 * (k + 1) / 2 if k < 2 else 1e-3 + 9e-3 * 0.5 * (1 + np.cos(np.pi * (k - 2) / 4))
    for i in range(len(ref)):
      m[i] = 0.9 * m[i] + 0.1 * g[i]
      v[i] = 0.999 * v[i] + 0.001 * g[i] ** 2
      direction = (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
      ref[i] = ref[i] - lr * (direction + (0.1 * ref[i] if decays[i] else 0.0))
    got = jax.tree.leaves(host(state.params))
    for path, x0, want, have in zip(paths, leaves0, ref, got):
      change_want, change_have = want - x0, np.asarray(have, np.float64) - x0
      err = np.linalg.norm(change_have - change_want) / np.linalg.norm(change_want)
      assert err < 1e-4, (t, path, err)
  assert clipped >= 1  # the clip was exercised


@pytest.mark.parametrize("optimizer", ["osd_adamw", "galore_adamw"])
def test_subspace_optimizers_default_to_scale_a_quarter(optimizer):
  """The trainer's default back-projection scale is 0.25 for OSD too (the quality study in
  benchmarks/RESULTS.md §4c): the update equals the explicit scale=0.25 one, not scale=1's."""
  rng = np.random.default_rng(1)
  params = {"layers": {"0": {"mlp": {"w1": {"kernel": jnp.asarray(rng.normal(size=(8, 12)),
                                                                  jnp.float32)}}}}}
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)

  def update(**kw):
    tx, _ = optimizers.make_optimizer(small_config(optimizer=optimizer, rank=2, **kw), params)
    return jax.tree.leaves(tx.update(grads, tx.init(params), params)[0])[0]

  default, quarter, one = update(), update(scale=0.25), update(scale=1.0)
  np.testing.assert_array_equal(default, quarter)
  np.testing.assert_allclose(one, 4 * quarter, rtol=1e-5, atol=1e-7)


def _steps(cfg, batches, devices=None):
  setup = trainer.build(cfg, VOCAB, devices=devices)
  state = setup.init_state()
  sharding = shd.batch_sharding(setup.mesh)
  out = []
  for b in batches:
    state, m = setup.train_step(state, {k: jax.device_put(v, sharding) for k, v in b.items()})
    out.append(host(m))
  return out, host(state)


def test_gradient_accumulation_matches_one_big_batch():
  batches = [random_batch(i, 8, 32, VOCAB) for i in range(2)]
  cfg = small_config(optimizer="adamw", lr=1e-3)
  devices = jax.devices()[:2]  # 8 sequences = 2 devices x 4 micro-batches of 1
  ref, ref_state = _steps(cfg, batches, devices)
  acc, acc_state = _steps(cfg.replace(grad_accum=4), batches, devices)
  np.testing.assert_allclose([m["loss"] for m in acc], [m["loss"] for m in ref], rtol=1e-5)
  for want, got in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(acc_state.params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_eval_runs_in_the_train_steps_micro_batches():
  """--grad-accum k: eval runs the batch as the same k micro-batches as training (same loss sum and
  token count as one pass, to float tolerance), so its compiled program needs less temp memory."""
  batch = random_batch(0, 16, 32, VOCAB)
  batch["targets"][:3, 20:] = -1  # some padding: the token count must add up too
  devices = jax.devices()[:2]
  out, temp = {}, {}
  for k in (1, 4):
    setup = trainer.build(small_config(optimizer="adamw", batch_size=16, grad_accum=k), VOCAB,
                          devices=devices)
    params = setup.init_state().params
    b = {name: jax.device_put(v, shd.batch_sharding(setup.mesh)) for name, v in batch.items()}
    out[k] = [float(x) for x in setup.eval_step(params, b)]
    memory = setup.eval_step.lower(params, b).compile().memory_analysis()
    temp[k] = None if memory is None else memory.temp_size_in_bytes
  assert out[4][1] == out[1][1] == float(np.sum(batch["targets"] >= 0))
  np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5)
  if temp[1] is not None:
    assert temp[4] < temp[1], temp


@pytest.mark.parametrize("optimizer", ["adamw", "osd_adamw"])
def test_non_finite_step_is_skipped_and_counted(optimizer):
  """A NaN weight that a batch touches makes loss and gradients NaN: that step changes nothing."""
  cfg = small_config(optimizer=optimizer)
  setup = trainer.build(cfg, VOCAB, devices=one_device())
  state = setup.init_state()
  sharding = shd.batch_sharding(setup.mesh)

  def put(b):
    return {k: jax.device_put(v, sharding) for k, v in b.items()}

  clean = random_batch(0, 8, 32, VOCAB)
  clean = {k: np.where(v == 0, 1, v) for k, v in clean.items()}  # never uses token 0
  poisoned = {k: v.copy() for k, v in clean.items()}
  poisoned["inputs"][0, 0] = 0
  state, _ = setup.train_step(state, put(clean))  # step 0 (sets P_0 for OSD)
  params = state.params
  params["embed"]["embedding"] = params["embed"]["embedding"].at[0].set(jnp.nan)
  state = state._replace(params=jax.device_put(params, setup.param_shardings))
  before = host(state)
  state, m = setup.train_step(state, put(poisoned))
  assert not np.isfinite(float(m["loss"])) and int(m["skipped"]) == 1
  after = host(state)
  assert_trees_equal(after.params, before.params)
  assert_trees_equal(after.opt_state, before.opt_state)  # inner state and projectors included
  assert int(after.skipped) == 1 and int(after.bad_streak) == 1 and int(after.step) == 2
  state, m = setup.train_step(state, put(clean))  # a clean batch trains again
  assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
  assert int(state.bad_streak) == 0 and int(state.skipped) == 1
  if optimizer == "osd_adamw":
    assert all(np.isfinite(np.asarray(p)).all() for p in osd_jax.projectors_of(state.opt_state))


def test_loss_spike_guard_skips_a_spiking_step():
  cfg = small_config(optimizer="adamw", loss_spike_factor=1.5)
  setup = trainer.build(cfg, VOCAB, devices=one_device())
  state = setup.init_state()
  sharding = shd.batch_sharding(setup.mesh)
  batch = {k: jax.device_put(v, sharding) for k, v in random_batch(0, 8, 32, VOCAB).items()}
  state, m = setup.train_step(state, batch)
  assert int(m["skipped"]) == 0
  state = state._replace(loss_avg=jnp.asarray(0.1, jnp.float32))  # a loss of ~5.5 is now a spike
  state, m = setup.train_step(state, batch)
  assert int(m["skipped"]) == 1


# One config for the two tests below (one compiled program): projector metrics at steps 2, 4, 5.
_METRICS_CFG = {"optimizer": "osd_adamw", "log_every": 2, "steps": 5}


def test_zero_gradients_never_make_projectors_nan():
  """P_0 from an all-zero gradient (a batch of padding only), then matrices whose gradient is
  zero because their output is multiplied by a zero matrix (wo = w2 = 0 in layer 0): projectors,
  params and metrics stay finite and no step is skipped."""
  setup = trainer.build(small_config(**_METRICS_CFG), VOCAB, devices=one_device())
  sharding = shd.batch_sharding(setup.mesh)

  def put(b):
    return {k: jax.device_put(v, sharding) for k, v in b.items()}

  padding = random_batch(0, 8, 32, VOCAB)
  padding["targets"][:] = -1  # no valid target: loss 0, every gradient exactly 0
  state, m = setup.train_step(setup.init_state(), put(padding))
  assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0
  params = state.params
  layer = params["layers"]  # scanned: every leaf has a leading layer axis
  for module, name in (("attention", "wo"), ("mlp", "w2")):
    layer[module][name]["kernel"] = layer[module][name]["kernel"].at[0].set(0.0)
  state = state._replace(params=jax.device_put(params, setup.param_shardings))
  for i in range(1, 5):
    state, m = setup.train_step(state, put(random_batch(i, 8, 32, VOCAB)))
    projectors = osd_jax.projectors_of(state.opt_state)
    assert all(np.isfinite(np.asarray(p)).all() for p in projectors), f"step {i + 1}"
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(state.params)))
  assert np.isfinite(float(m["orthogonality_error"]))  # step 5 is the last step: a log step


def test_projector_metrics_only_at_log_steps():
  """The orthogonality error, drift and captured energy (a QR of every projector) are computed
  only at log steps (--log-every 2, --steps 5: steps 2, 4, 5) and are NaN at the others; the drift
  is that of the step itself (P before vs after it), the energy that of the step's gradient."""
  setup = trainer.build(small_config(**_METRICS_CFG), VOCAB, devices=one_device())
  sharding = shd.batch_sharding(setup.mesh)
  state = setup.init_state()
  from train.train_step import token_loss

  for i in range(1, 6):
    before = host(state.opt_state)
    batch = {k: jax.device_put(v, sharding) for k, v in random_batch(i, 8, 32, VOCAB).items()}
    grads = jax.grad(lambda p, b=batch: token_loss(setup.graphdef, p, b)[0])(state.params)
    state, m = setup.train_step(state, batch)
    logged = i in (2, 4, 5)
    assert np.isfinite(float(m["subspace_drift"])) == logged, i
    assert np.isfinite(float(m["orthogonality_error"])) == logged, i
    assert np.isfinite(float(m["captured_energy_mean"])) == logged, i
    if logged:  # the energy fraction ignores the gradient's scale (loss sum vs mean)
      energy = np.asarray(osd_jax.captured_energy(host(grads), host(state.opt_state)))
      np.testing.assert_allclose(float(m["captured_energy_mean"]), energy.mean(), rtol=1e-4)
      np.testing.assert_allclose(float(m["captured_energy_min"]), energy.min(), rtol=1e-4)
      assert 0 < energy.min() <= energy.mean() < 1
      np.testing.assert_allclose(float(m["subspace_drift"]),
                                 float(osd_jax.subspace_drift(before, host(state.opt_state))),
                                 rtol=1e-4, atol=1e-7)
      np.testing.assert_allclose(
          float(m["orthogonality_error"]),
          float(osd_jax.projector_orthogonality_error(host(state.opt_state))), rtol=1e-4)


def test_too_many_skipped_steps_in_a_row_save_and_stop(tmp_path, train_tokenizer):
  """--max-consecutive-skips: with a loss-spike guard that rejects every step after the first, the
  run stops after 2 skipped steps in a row, with a checkpoint at that step (exit status 3 from the
  command line)."""
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=6, loss_spike_factor=1e-6,
                     max_consecutive_skips=2)
  with pytest.raises(FloatingPointError, match="2 steps in a row .* stopped at step 3"):
    trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  assert committed_steps(str(tmp_path / "run" / "checkpoints")) == [3]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
             .splitlines() if '"loss"' in line]
  assert [r["skipped"] for r in records] == [0, 1, 1] and records[-1]["skipped_total"] == 2


def test_a_streak_of_skips_that_ends_between_log_steps_still_stops(tmp_path, train_tokenizer,
                                                                   monkeypatch):
  """--max-consecutive-skips is checked at log steps over every step since the previous one (no
  host sync per step): a streak of 2 skipped steps (steps 2-3) that has ended by the log step 4
  stops the run there. The train step's bad_streak metric is scripted."""
  make_train_step = step_lib.make_train_step

  def scripted_make_train_step(*args, **kwargs):
    step_fn, script = make_train_step(*args, **kwargs), iter([0, 1, 2, 0, 0, 0])

    def train_step(state, batch):
      state, metrics = step_fn(state, batch)
      return state, {**metrics, "bad_streak": jnp.asarray(next(script), jnp.int32)}

    return train_step

  monkeypatch.setattr(step_lib, "make_train_step", scripted_make_train_step)
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=6, log_every=4,
                     max_consecutive_skips=2)
  with pytest.raises(FloatingPointError, match="2 steps in a row .* stopped at step 4"):
    trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())



@pytest.mark.slow
def test_reference_code_trains_sharded(tmp_path, train_tokenizer):
  """--reference-code through the whole trainer on the 8 fake devices: GaLore with the official
  SVD signs, the official Adam and decay order; the loss is finite and the captured energy of
  the step-0 SVD subspace is logged."""
  cfg = small_config(tmp_path / "run", optimizer="galore_adamw", reference_code=True, steps=3,
                     update_proj_gap=2, weight_decay=0.1)
  result = trainer.train(cfg, tokenizer=train_tokenizer)
  steps = [r for r in result.history if "loss" in r]
  assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
  assert all(0 < r["captured_energy_mean"] < 1 for r in steps)
  assert steps[0]["lr"] == 0.0 and steps[1]["lr"] > 0  # the official warmup starts at lr 0
