"""--fused-update: each scanned block updated inside the backward pass (train/fused_update.py).

The issue's semantics, each pinned here: (a) the same optimizer (within 1e-5 of the unfused step,
also on a 4-device fsdp mesh), (b) clipping by the previous step's global norm, or with
--fused-clip exact by this step's (then equal to the unfused clipped step), (c) gradient
accumulation refused, (d) non-finite values (a non-finite loss skips the step before any update;
a block with a non-finite gradient is left bitwise unchanged), (e) resume with and without the
flag, and at most one block's gradient alive at a time (the compiled memory).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_utils import (
  assert_trees_equal,
  host,
  one_device,
  random_batch,
  small_config,
)
from train import checkpoint as ckpt_lib
from train import config as config_lib
from train import fused_update, optimizers, trainer
from train import model as model_lib
from train import sharding as shd

VOCAB = 256
N_LAYERS = 3
FUSED_MODEL = {"dim": 32, "hidden_dim": 64, "n_layers": N_LAYERS, "n_heads": 4,
               "vocab_size": VOCAB}


def _config(**overrides):
  base = dict(model_overrides=dict(FUSED_MODEL), grad_clip=0.0, param_dtype="float32",
              steps=6, log_every=2)
  base.update(overrides)
  return small_config(**base)


def _run(cfg, steps, devices=None, vocab=VOCAB):
  """``steps`` train steps of ``cfg`` from its fresh state; returns (setup, state, metrics)."""
  setup = trainer.build(cfg, vocab, devices=devices or one_device())
  state = setup.init_state()
  sharding = shd.batch_sharding(setup.mesh)
  metrics = []
  for t in range(steps):
    batch = random_batch(t, cfg.batch_size, cfg.seq_len, vocab)
    state, m = setup.train_step(state, {k: jax.device_put(v, sharding) for k, v in batch.items()})
    metrics.append(host(m))
  return setup, state, metrics


def _tiny(**overrides):
  """The issue's check: the tiny preset (width 128, 4 blocks, rank 32), float32, lr 1e-3, no
  clipping, 6 steps (16 × 64 tokens, vocabulary 512)."""
  base = dict(model_overrides={"vocab_size": 512}, rank=None, lr=1e-3, warmup_steps=None,
              grad_clip=0.0, param_dtype="float32", steps=6, batch_size=16, seq_len=64)
  base.update(overrides)
  return small_config(**base)


def _max_relative_error(a, b) -> float:
  out = 0.0
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    out = max(out, float(np.linalg.norm(x - y) / max(np.linalg.norm(x), 1e-30)))
  return out


@pytest.mark.parametrize("optimizer", ["osd_adamw", "galore_adamw", "adamw"])
def test_a_fused_step_is_the_same_optimizer(optimizer):
  """6 float32 steps, clipping off: the final params of the fused and the unfused run agree to
  1e-5 relative, leaf by leaf, and so do the logged metrics. The optimizer state agrees to 1e-3:
  the projectors' Adam turns the gradients' float32 rounding (the two compute them in another
  order) into relative differences of up to 2e-4 in its moments (w2's P: 3.5e-5)."""
  cfg = _tiny(optimizer=optimizer, update_proj_gap=3)
  _, plain, m_plain = _run(cfg, 6, vocab=512)
  _, fused, m_fused = _run(cfg.replace(fused_update=True), 6, vocab=512)
  assert _max_relative_error(plain.params, fused.params) < 1e-5
  assert _max_relative_error(plain.opt_state, fused.opt_state) < 1e-3
  for a, b in zip(m_plain, m_fused):
    for key in ("loss", "grad_norm", "lr"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=key)
    # from the projectors: their state's tolerance; the drift 1 − ‖QᵀQ'‖²/r is a difference
    # from 1, known in float32 to about 1e-6 absolute whatever its size
    for key, atol in (("orthogonality_error", 1e-7), ("subspace_drift", 1e-5),
                      ("captured_energy_mean", 1e-7)):
      if key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-3, atol=atol, err_msg=key)
    assert int(b["skipped_blocks"]) == 0 and int(b["skipped"]) == 0


def test_a_block_by_halves_is_the_same_optimizer(monkeypatch):
  """Remat full: each block's backward step in two halves (the feed-forward's VJP and update,
  then the attention's). osd_adamw: the same params as the unfused step to 1e-5 after 6 steps;
  with bf16 weights and int8 state, against the unfused compact step, within a bf16 step
  (stochastic rounding with the same bits: a weight lands a step apart only where the two
  steps' float32 rounding crosses a rounding threshold, test_compact's criterion). The halves
  are cut by param path, whatever the optimizer (adamw by halves: the non-finite test below)."""
  calls = []
  halves = model_lib.Llama.block_halves
  monkeypatch.setattr(model_lib.Llama, "block_halves",
                      lambda self, positions: calls.append(1) or halves(self, positions))
  for compact in ({}, {"param_dtype": "bfloat16", "state_dtype": "int8"}):
    cfg = _tiny(optimizer="osd_adamw", remat="full", **compact)
    _, plain, m_plain = _run(cfg, 6, vocab=512)
    _, fused, m_fused = _run(cfg.replace(fused_update=True), 6, vocab=512)
    if compact:
      for a, b in zip(jax.tree.leaves(host(plain.params)), jax.tree.leaves(host(fused.params))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.mean(np.abs(a - b) > np.abs(b) * 2.0 ** -7 + 1e-30) < 0.01
    else:
      assert _max_relative_error(plain.params, fused.params) < 1e-5
      for a, b in zip(m_plain, m_fused):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    assert all(int(m["skipped_blocks"]) == 0 and int(m["skipped"]) == 0 for m in m_fused)
  assert calls  # the fused step took the halves


def test_fused_on_a_four_device_fsdp_mesh_matches_the_unfused_one_device_run():
  """(The sharded run differs from the one-device run by its reductions' order, 3.5e-6 here;
  fused and unfused on the same mesh agree to 1e-8.)"""
  cfg = _tiny(optimizer="osd_adamw")
  _, plain, _ = _run(cfg, 6, vocab=512)
  _, fused, _ = _run(cfg.replace(fused_update=True, mesh="data=1,fsdp=4,tensor=1"), 6,
                     devices=jax.devices()[:4], vocab=512)
  assert _max_relative_error(plain.params, fused.params) < 1e-5


@pytest.mark.parametrize("remat", ["none", "full"])
def test_offloaded_residuals_give_the_same_steps_on_a_sharded_mesh(remat):
  """--offload-residuals keeps the saved block inputs in host memory: the same program otherwise,
  so the same numbers (bitwise on a CPU, where host and device memory are one), here on a
  2-device fsdp mesh (remat full: a block by halves); and it is refused without --fused-update."""
  cfg = _config(fused_update=True, mesh="data=1,fsdp=2,tensor=1", remat=remat)
  _, kept, m_kept = _run(cfg, 3, devices=jax.devices()[:2])
  _, offloaded, m_off = _run(cfg.replace(offload_residuals=True), 3, devices=jax.devices()[:2])
  assert_trees_equal(kept.params, offloaded.params)
  assert_trees_equal(kept.opt_state, offloaded.opt_state)
  assert [m["loss"] for m in m_kept] == [m["loss"] for m in m_off]
  with pytest.raises(config_lib.ConfigError, match="--offload-residuals .* add --fused-update"):
    config_lib.validate(_config(offload_residuals=True))


def test_residuals_are_offloaded_by_default_with_remat_full_off_the_cpu():
  """--offload-residuals unset: on for the fused step with remat full on a GPU or TPU (the 7B
  recipe's device memory), off on a CPU (host and device memory are one) and without remat full
  (no residual stack to move); a flag given either way wins."""
  from train import __main__ as cli

  default = _config(fused_update=True)
  assert default.offload_residuals is None
  assert default.resolved_offload_residuals("gpu", "full")
  assert default.resolved_offload_residuals("tpu", "full")
  assert not default.resolved_offload_residuals("cpu", "full")
  assert not default.resolved_offload_residuals("gpu", "none")
  assert not _config().resolved_offload_residuals("gpu", "full")  # not fused
  assert not default.replace(offload_residuals=False).resolved_offload_residuals("gpu", "full")
  assert default.replace(offload_residuals=True).resolved_offload_residuals("cpu", "none")
  assert cli.parse_config(["--fused-update"]).offload_residuals is None
  assert cli.parse_config(["--fused-update", "--no-offload-residuals"]).offload_residuals is False
  cfg = default.replace(remat="full")
  assert not trainer.build(cfg, VOCAB, devices=one_device()).offload_residuals  # this CPU
  assert trainer.build(cfg.replace(offload_residuals=True), VOCAB,
                       devices=one_device()).offload_residuals


def test_stacks_are_carried_flat_only_where_that_keeps_their_sharding():
  """The fused loop carries [L, a, b] as [L, a·b] (one layout per layer row, so XLA:GPU cannot
  relay a whole stack) only when b is not split over the mesh: a split a stays a contiguous split
  of the row, a split b would need a collective every step."""
  from jax.sharding import PartitionSpec as P

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  stack, norm = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32), jax.ShapeDtypeStruct((4, 8),
                                                                                     jnp.float32)

  def flattens(x, *spec):
    return fused_update.flattens_in_place(x, jax.sharding.NamedSharding(mesh, P(*spec)))

  assert flattens(stack) and flattens(stack, None, "fsdp")
  assert not flattens(stack, None, None, "fsdp")
  assert not flattens(norm)


@pytest.mark.parametrize("optimizer,state_dtype", [("osd_adamw", "int8"),
                                                    ("galore_adamw", "bfloat16")])
def test_the_embedding_and_head_updated_by_rows_are_the_whole_update(monkeypatch, optimizer,
                                                                      state_dtype):
  """The embedding's, final norm's and head's update runs a chunk of rows at a time
  (fused_update.rest_by_rows): bitwise the whole update, here with bf16 weights rounded
  stochastically and compact moments (whose random bits a chunk must draw as the whole leaf
  does), 3 steps."""
  cfg = _config(optimizer=optimizer, fused_update=True, param_dtype="bfloat16",
                state_dtype=state_dtype)
  _, by_rows, m_rows = _run(cfg, 3)
  rows, rest, _ = _rows(cfg, one_device())
  assert rows is not None and rows.n == fused_update.REST_CHUNKS
  assert rows.to_chunks(rest)["embed"]["embedding"].shape == (rows.n, VOCAB // rows.n,
                                                              FUSED_MODEL["dim"])
  monkeypatch.setattr(fused_update, "rest_by_rows", lambda *a, **k: None)
  _, whole, m_whole = _run(cfg, 3)
  assert_trees_equal(by_rows.params, whole.params)
  assert_trees_equal(by_rows.opt_state, whole.opt_state)
  assert [m["loss"] for m in m_rows] == [m["loss"] for m in m_whole]


def test_rows_are_chunked_only_where_the_mesh_keeps_them_whole():
  """A leaf whose rows the mesh splits (or that REST_CHUNKS does not divide) is updated whole."""
  seen = set()
  for mesh, devices in (("data=1,fsdp=1,tensor=2", 2), ("data=1,fsdp=2,tensor=1", 2)):
    cfg = _config(fused_update=True, mesh=mesh)
    rows, rest, setup = _rows(cfg, jax.devices()[:devices])
    for name, leaf in (("embed", "embedding"), ("head", "kernel")):
      shape = rest[name][leaf].shape
      whole = setup.state_shardings.params[name][leaf].shard_shape(shape)[0] == shape[0]
      in_chunks = rows is not None and len(rows.to_chunks(rest)[name][leaf].shape) == 3
      assert in_chunks == whole, (mesh, name, shape)
      seen.add(whole)
  assert seen == {True, False}  # both cases met


def _rows(cfg, devices):
  """(fused_update.rest_by_rows of cfg's trainer, the abstract rest params, the trainer)."""
  setup = trainer.build(cfg, VOCAB, devices=devices)
  abstract = setup.abstract_state.params
  split = fused_update.split_optimizer(optimizers.base_optimizer(cfg, setup.schedule, abstract),
                                       abstract)
  rows = fused_update.rest_by_rows(split, abstract, setup.state_shardings.params)
  return rows, split.rest_view(abstract), setup


def test_clipping_uses_the_previous_steps_global_norm():
  """Step 2 with --grad-clip c scales the gradients by min(1, c/‖g₁‖), ‖g₁‖ the first step's
  norm (TrainState.grad_norm); read off AdamW's first moment m₂ = b1·m₁ + (1 − b1)·f·g₂."""
  cfg = _config(optimizer="adamw", fused_update=True, steps=2, grad_clip=1e9)  # f = 1
  setup, state1, m1 = _run(cfg, 1)
  norm1 = float(state1.grad_norm)
  np.testing.assert_allclose(norm1, m1[0]["grad_norm"], rtol=1e-6)
  clip = 0.5 * norm1
  clipped = trainer.build(cfg.replace(grad_clip=clip), VOCAB, devices=one_device())
  sharding = shd.batch_sharding(setup.mesh)
  batch = {k: jax.device_put(v, sharding) for k, v in random_batch(1, 8, 32, VOCAB).items()}
  mu1 = host(state1.opt_state[-1][0].mu)
  copy = lambda s: jax.tree.map(jnp.copy, s)  # noqa: E731  (the steps donate their state)
  no_clip, _ = setup.train_step(copy(state1), batch)
  with_clip, metrics = clipped.train_step(copy(state1), batch)
  b1 = 0.9
  f = min(1.0, clip / norm1)
  assert f == pytest.approx(0.5)
  g2 = jax.tree.map(lambda m, m1: (m - b1 * m1) / (1 - b1), host(no_clip.opt_state[-1][0].mu),
                    mu1)
  want = jax.tree.map(lambda m1, g: b1 * m1 + (1 - b1) * f * g, mu1, g2)
  for got, ref in zip(jax.tree.leaves(host(with_clip.opt_state[-1][0].mu)),
                      jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-9)
  # the logged norm is the raw one, and it is what the next step clips with
  np.testing.assert_allclose(float(with_clip.grad_norm), float(metrics["grad_norm"]), rtol=1e-6)
  # a run's first step has no previous norm: no clipping
  first = trainer.build(cfg.replace(grad_clip=1e-6), VOCAB, devices=one_device())
  state0 = first.init_state()
  a, _ = first.train_step(copy(state0), batch)
  b, _ = setup.train_step(copy(state0), batch)
  assert_trees_equal(a.params, b.params)


def test_exact_clipping_is_the_unfused_steps():
  """--fused-clip exact: 6 float32 steps clipped at a norm every step exceeds end where the
  unfused clipped run ends (1e-5 relative), with the same logged norms (osd_adamw; adamw's
  exact mode is exercised by the non-finite test below)."""
  cfg = _tiny(optimizer="osd_adamw", grad_clip=0.05)
  _, plain, m_plain = _run(cfg, 6, vocab=512)
  _, fused, m_fused = _run(cfg.replace(fused_update=True, fused_clip="exact"), 6, vocab=512)
  assert min(float(m["grad_norm"]) for m in m_plain) > 0.05  # clipped at every step
  assert _max_relative_error(plain.params, fused.params) < 1e-5
  for a, b in zip(m_plain, m_fused):
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)
  # the previous step's norm (the default) is another optimizer: it differs at step 1
  _, stale, _ = _run(cfg.replace(fused_update=True), 6, vocab=512)
  assert _max_relative_error(plain.params, stale.params) > 1e-4


def test_gradient_accumulation_and_unrolled_layers_are_refused_in_one_line():
  with pytest.raises(config_lib.ConfigError, match=r"--fused-update .*\(--grad-accum 2\)"):
    config_lib.validate(_config(fused_update=True, grad_accum=2))
  with pytest.raises(config_lib.ConfigError, match="--fused-update .* --no-scan-layers"):
    config_lib.validate(_config(fused_update=True, scan_layers=False))


def test_a_non_finite_loss_skips_the_whole_step_before_any_update():
  cfg = _config(optimizer="osd_adamw", fused_update=True)
  setup, state, _ = _run(cfg, 1)
  params = jax.tree.map(np.array, host(state.params))  # writable copies
  params["embed"]["embedding"][:] = np.nan  # every token: the loss is NaN
  state = state._replace(params=jax.device_put(params, setup.param_shardings))
  before = host(state)
  batch = {k: jax.device_put(v, shd.batch_sharding(setup.mesh))
           for k, v in random_batch(5, 8, 32, VOCAB).items()}
  state, m = setup.train_step(state, batch)
  assert not np.isfinite(m["loss"]) and int(m["skipped"]) == 1
  assert int(m["skipped_blocks"]) == 0  # the step was skipped before any block
  after = host(state)
  assert_trees_equal(after.params, before.params)
  assert_trees_equal(after.opt_state, before.opt_state)
  assert int(after.step) == 2 and int(after.skipped) == 1


MARK = 1.2345  # a block whose attention_norm scale starts with this gets a NaN gradient


def _poisoned(fn):
  """``fn(p, h)`` whose gradient for the marked block's params is NaN (its value and the
  gradient it passes on to ``h`` are untouched)."""

  @jax.custom_vjp
  def poisoned(p, h):
    return fn(p, h)

  def fwd(p, h):
    return fn(p, h), (p, h)

  def bwd(res, dy):
    p, h = res
    _, vjp = jax.vjp(fn, p, h)
    dp, dh = vjp(dy)
    marked = p["attention_norm"]["scale"][0] == MARK
    return jax.tree.map(lambda g: jnp.where(marked, jnp.nan, g), dp), dh

  poisoned.defvjp(fwd, bwd)
  return poisoned


def _nan_gradient_for_the_marked_block(monkeypatch):
  """Patches the block function, and its halves (remat full), so that the marked block's params
  get a NaN gradient (its forward pass and the gradient it passes on are untouched)."""
  block_function, block_halves = model_lib.Llama.block_function, model_lib.Llama.block_halves
  monkeypatch.setattr(model_lib.Llama, "block_function",
                      lambda self, positions: _poisoned(block_function(self, positions)))
  monkeypatch.setattr(model_lib.Llama, "block_halves", lambda self, positions: tuple(
      _poisoned(f) for f in block_halves(self, positions)))


@pytest.mark.parametrize("optimizer, exact, remat", [
    ("osd_adamw", False, "none"), ("adamw", False, "none"), ("adamw", True, "none"),
    ("osd_adamw", False, "full"), ("adamw", True, "full")])
def test_a_block_with_a_non_finite_gradient_is_left_bitwise_unchanged(optimizer, exact, remat,
                                                                       monkeypatch):
  """Block 1 of 3 gets a NaN gradient: it and its optimizer state stay bitwise as they were;
  block 2 (updated before it) and block 0 (after it, with a finite gradient) move; the
  embedding, final norm and head and the step counts stay, and the step counts as skipped.
  With --fused-clip exact the norm pass sees it first and nothing moves. (Remat full: the
  block's two halves, both NaN.)"""
  _nan_gradient_for_the_marked_block(monkeypatch)
  cfg = _config(optimizer=optimizer, fused_update=True, remat=remat,
                **({"fused_clip": "exact", "grad_clip": 1.0} if exact else {}))
  setup, state, _ = _run(cfg, 1)
  params = jax.tree.map(np.array, host(state.params))  # writable copies
  params["layers"]["attention_norm"]["scale"][1, 0] = MARK
  state = state._replace(params=jax.device_put(params, setup.param_shardings))
  before = host(state)
  batch = {k: jax.device_put(v, shd.batch_sharding(setup.mesh))
           for k, v in random_batch(5, 8, 32, VOCAB).items()}
  state, m = setup.train_step(state, batch)
  after = host(state)
  # (with --fused-clip exact the whole step is skipped before any update: no block counts)
  assert np.isfinite(m["loss"]) and int(m["skipped"]) == 1
  assert int(m["skipped_blocks"]) == (0 if exact else 2)
  assert int(after.skipped) == 1 and int(after.bad_streak) == 1

  def layer(tree, i):
    return jax.tree.map(lambda x: x[i], tree)

  assert_trees_equal(layer(after.params["layers"], 1), layer(before.params["layers"], 1))
  if exact:  # the norm pass saw the NaN first: the whole step is skipped, as unfused
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    return
  for i in (0, 2):
    assert not np.array_equal(after.params["layers"]["mlp"]["w1"]["kernel"][i],
                              before.params["layers"]["mlp"]["w1"]["kernel"][i])
  for name in ("embed", "norm", "head"):
    assert_trees_equal(after.params[name], before.params[name])
  # the optimizer state: block 1's slices, every shared count and every other leaf's state
  abstract = setup.abstract_state.params
  split = fused_update.split_optimizer(optimizers.base_optimizer(cfg, setup.schedule, abstract),
                                       abstract)
  for kind, path, x, y in zip(split.state_kinds, split.state_paths,
                              split.state_treedef.flatten_up_to(after.opt_state[-1]),
                              split.state_treedef.flatten_up_to(before.opt_state[-1])):
    if kind == "layer":
      np.testing.assert_array_equal(x[1], y[1], err_msg=path)
    else:
      np.testing.assert_array_equal(x, y, err_msg=path)


def test_resume_with_and_without_the_flag(tmp_path, train_tokenizer):
  """A fused run stopped at step 2 and resumed (fused) ends bitwise where the uninterrupted
  fused run ends; its checkpoint restores bitwise into the unfused step, which continues."""
  cfg = _config(optimizer="osd_adamw", fused_update=True, steps=4, ckpt_every=2,
                model_overrides={**FUSED_MODEL, "vocab_size": 512})
  whole = trainer.train(cfg.replace(run_dir=str(tmp_path / "whole")),
                        tokenizer=train_tokenizer, devices=one_device())
  run = cfg.replace(run_dir=str(tmp_path / "split"))
  first = trainer.train(run, tokenizer=train_tokenizer, devices=one_device(), stop_at=2)
  assert first.preempted and int(first.state.step) == 2
  resumed = trainer.train(run.replace(resume=True), tokenizer=train_tokenizer,
                          devices=one_device())
  assert_trees_equal(resumed.state.params, whole.state.params)
  assert_trees_equal(resumed.state.opt_state, whole.state.opt_state)
  # the unfused step reads the fused run's checkpoint as it is, and trains on from it
  plain = trainer.build(run.replace(fused_update=False), 512, devices=one_device())
  with ckpt_lib.Checkpointer(str(tmp_path / "split" / "checkpoints")) as ck:
    restored, _, _ = ck.restore(plain.abstract_state, step=2)
  assert_trees_equal(restored, first.state)
  batch = {k: jax.device_put(v, shd.batch_sharding(plain.mesh))
           for k, v in random_batch(0, 8, 32, 512).items()}
  state, m = plain.train_step(restored, batch)
  assert np.isfinite(float(m["loss"])) and int(state.step) == 3


def _copies_of(text: str, shapes: set) -> int:
  """``copy`` instructions of arrays with one of ``shapes`` in an HLO module's text."""
  found = re.findall(r"= \w+\[([0-9,]+)\]\{[^}]*\} copy\(", text)
  return sum(1 for s in found if tuple(int(d) for d in s.split(",")) in shapes)


def test_at_most_one_blocks_gradient_is_alive():
  """The compiled fused step's temporaries are below the unfused step's by about the gradient
  of all blocks but one, and it copies no stacked array of the state (params, moments,
  projectors: each is updated in place, one block's slice at a time)."""
  model = {"dim": 64, "hidden_dim": 192, "n_layers": 8, "n_heads": 4, "vocab_size": VOCAB}
  cfg = small_config(optimizer="osd_adamw", model_overrides=model, rank=8, batch_size=4,
                     seq_len=16, param_dtype="float32")
  temps, texts, stacks = {}, {}, set()
  for fused in (False, True):
    setup = trainer.build(cfg.replace(fused_update=fused), VOCAB, devices=one_device())
    spec = jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=shd.batch_sharding(setup.mesh))
    compiled = setup.train_step.lower(setup.abstract_state,
                                      {"inputs": spec, "targets": spec}).compile()
    temps[fused] = compiled.memory_analysis().temp_size_in_bytes
    texts[fused] = compiled.as_text()
    stacks |= {tuple(x.shape) for x in jax.tree.leaves((setup.abstract_state.params,
                                                        setup.abstract_state.opt_state))
               if x.ndim >= 3 and x.shape[0] == 8}
  block_params = 4 * 64 * 64 + 3 * 64 * 192 + 2 * 64
  blocks_gradient = 8 * block_params * 4  # bytes, float32
  saved = temps[False] - temps[True]
  assert saved >= blocks_gradient - 2 * block_params * 4, (temps, blocks_gradient)
  assert len(stacks) >= 5  # the blocks' kernels, their moments and projectors
  assert _copies_of(texts[True], stacks) == 0
