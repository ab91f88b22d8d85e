"""Scanned layers, remat and the compiled train step's shape: the scanned layout computes what the
unrolled one does, its optimizer update does not grow with depth, remat changes memory and not
values, a checkpoint only resumes into its own layout, and no documented mesh makes XLA replicate
an activation to reshard it."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.train_utils import host, one_device, random_batch, small_config
from train import checkpoint as ckpt_lib
from train import model as M
from train import sharding as shd
from train import train_step as step_lib
from train import trainer

VOCAB = 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layers(n):
  return {"dim": 32, "hidden_dim": 64, "n_layers": n, "n_heads": 4}


def _count(op: str, hlo: str) -> int:
  return len(re.findall(rf"\b{op}\(", hlo))


def _update_hlo(cfg) -> str:
  """The compiled ``tx.update`` of ``cfg``'s optimizer on abstract params."""
  setup = trainer.build(cfg, VOCAB, devices=one_device())
  params = setup.abstract_state.params
  update = jax.jit(setup.tx.update)
  return update.lower(params, setup.abstract_state.opt_state, params).compile().as_text()


@pytest.mark.parametrize("optimizer", ["osd_adamw", "galore_adamw"])
def test_scanned_update_has_as_many_dots_for_any_depth(optimizer):
  """The layer axis of a stacked kernel is a batch axis of the projection (DimensionNumbers(1, 2)):
  one batched matmul per kernel name, however many layers. Unrolled, the count grows with depth."""
  dots = {(scan, n): _count("dot", _update_hlo(small_config(
      optimizer=optimizer, scan_layers=scan, model_overrides=_layers(n))))
      for scan in (True, False) for n in (2, 4)}
  assert dots[True, 2] == dots[True, 4] > 0
  assert dots[False, 4] > dots[False, 2] > 0  # the count this test guards against


def _stacked_state(scanned_setup, params):
  """A fresh scanned TrainState holding ``params`` (stacked), with its optimizer's init."""
  tx = scanned_setup.tx
  init = jax.jit(lambda p: step_lib.init_state(p, tx.init(p)),
                 out_shardings=scanned_setup.state_shardings)
  return init(params)


@pytest.mark.parametrize("optimizer", ["adamw", "osd_adamw"])
def test_scanned_train_step_equals_unrolled_train_step(optimizer):
  """Two train steps from the same weights (the unrolled init, stacked): the same losses, grad
  norms and params (unstacked) in both layouts, optimizer included (per-layer projectors)."""
  cfg = small_config(optimizer=optimizer, model_overrides=_layers(3))
  unrolled = trainer.build(cfg.replace(scan_layers=False), VOCAB, devices=one_device())
  scanned = trainer.build(cfg, VOCAB, devices=one_device())
  u_state = unrolled.init_state()
  s_state = _stacked_state(scanned, M.stack_layers(host(u_state.params)))
  for i in range(2):
    batch = {k: jax.device_put(v, shd.batch_sharding(scanned.mesh))
             for k, v in random_batch(i, 8, 32, VOCAB).items()}
    u_state, u_m = unrolled.train_step(u_state, batch)
    s_state, s_m = scanned.train_step(s_state, batch)
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(float(s_m[key]), float(u_m[key]), rtol=1e-5)
  got = M.unstack_layers(host(s_state.params))
  want = host(u_state.params)
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), want,
                       host(unrolled.init_state().params))
  assert min(jax.tree.leaves(moved)) > 1e-4  # both really trained
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), got, want)


def _value_and_grad(cfg):
  """jitted ``(params, tokens) -> (mean next-token loss, grads)`` of ``Llama(cfg)``."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: M.Llama(cfg, rngs=nnx.Rngs(0))))

  def loss(p, tokens):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  return jax.jit(jax.value_and_grad(loss))


REMAT_CFG = M.LlamaConfig(vocab_size=97, dim=32, hidden_dim=64, n_layers=4, n_heads=4,
                          max_seq_len=64, dtype="float32")


@pytest.mark.parametrize("scan", [True, False])
def test_remat_leaves_loss_and_grads_unchanged(scan):
  cfg = REMAT_CFG.replace(scan_layers=scan)
  params = nnx.to_pure_dict(nnx.state(M.Llama(cfg, rngs=nnx.Rngs(1)), nnx.Param))
  tokens = jax.random.randint(jax.random.key(2), (4, 33), 0, cfg.vocab_size)
  want_loss, want_grads = _value_and_grad(cfg)(params, tokens)
  for remat in ("full", "dots", "dots_no_batch"):
    loss, grads = _value_and_grad(cfg.replace(remat=remat))(params, tokens)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, want_grads)


def test_remat_reduces_the_compiled_temporaries():
  """XLA's temp size of the scanned model's value-and-grad: saving nothing but each block's input
  (full) needs less than saving the projections (dots_no_batch), than saving every matmul (dots),
  than saving everything (none)."""
  tokens = jax.ShapeDtypeStruct((4, 65), jnp.int32)
  temp = {}
  for remat in M.REMAT_POLICIES:
    cfg = REMAT_CFG.replace(remat=remat)
    params = jax.eval_shape(
        lambda cfg=cfg: nnx.to_pure_dict(nnx.state(M.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
    compiled = _value_and_grad(cfg).lower(params, tokens).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["full"] < temp["dots_no_batch"] < temp["dots"] < temp["none"], temp


def test_checkpoint_of_the_other_layout_is_refused(tmp_path):
  """A scanned checkpoint resumed unrolled (or the reverse) fails with one message naming the
  flag; a checkpoint whose config predates --scan-layers is unrolled."""
  cfg = small_config(optimizer="adamw")
  setup = trainer.build(cfg, VOCAB, devices=one_device())
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = trainer.build(unrolled_cfg, VOCAB, devices=one_device())
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(1, setup.init_state(), config=cfg.to_dict(), wait=True)
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"holds scanned layers, this run uses unrolled layers "
                             r"\(--scan-layers\); resume with --scan-layers"):
      ck.restore(unrolled.abstract_state, config=unrolled_cfg.to_dict())
    restored, _, _ = ck.restore(setup.abstract_state, config=cfg.to_dict())
    assert restored.params["layers"]["mlp"]["w1"]["kernel"].shape == (2, 32, 64)
  old = {k: v for k, v in unrolled_cfg.to_dict().items() if k != "scan_layers"}
  with ckpt_lib.Checkpointer(str(tmp_path / "old")) as ck:
    ck.save(1, unrolled.init_state(), config=old, wait=True)
    with pytest.raises(ckpt_lib.CheckpointError, match="resume with --no-scan-layers"):
      ck.restore(setup.abstract_state, config=cfg.to_dict())
    ck.restore(unrolled.abstract_state, config=unrolled_cfg.to_dict())


# The mesh shapes train/README.md documents (-1: all 8 fake devices), with --grad-accum.
DOCUMENTED_MESHES = [("data=-1,fsdp=1,tensor=1", 8, 1), ("data=-1,fsdp=8,tensor=1", 8, 1),
                     ("data=2,fsdp=2,tensor=1", 4, 1), ("data=2,fsdp=2,tensor=1", 4, 2),
                     ("data=2,fsdp=2,tensor=2", 8, 1)]

# Compiles the train step for each "MESH DEVICES ACCUM" argument, then (the control) the step of
# the model with flax's own embedding lookup, which resharded its activation gradient; a line
# "== <case>" on stderr starts each case's compiler log.
_COMPILE_STEPS = textwrap.dedent("""
    import sys
    import jax
    from tests.train_utils import small_config
    from train import model as M, sharding as shd, trainer

    def compile_step(mesh, n, accum):
      cfg = small_config(mesh=mesh, seq_len=64, batch_size=16, grad_accum=accum,
                         model_overrides={"dim": 128, "hidden_dim": 256, "n_layers": 2,
                                          "n_heads": 4})
      setup = trainer.build(cfg, 256, devices=jax.devices()[:n])
      tokens = jax.ShapeDtypeStruct((16, 64), "int32", sharding=shd.batch_sharding(setup.mesh))
      setup.train_step.lower(setup.abstract_state, {"inputs": tokens, "targets": tokens}).compile()

    for case in sys.argv[1:]:
      print("==", case, file=sys.stderr, flush=True)
      mesh, n, accum = case.split()
      compile_step(mesh, int(n), int(accum))
    print("== control", file=sys.stderr, flush=True)
    M.Llama._embed = lambda self, tokens: self.embed(tokens)
    compile_step("data=2,fsdp=2,tensor=1", 4, 1)
    print("compiled", flush=True)
""")


@pytest.mark.slow
def test_documented_meshes_compile_without_involuntary_resharding():
  """XLA's SPMD partitioner logs (C++, to stderr) "Involuntary full rematerialization" when it can
  only reach a sharding by replicating a tensor first: an all-gather of an activation per layer on
  a pod. The scanned train step compiles without it on every documented mesh; the control (the
  table sharded over fsdp at the lookup, as before) shows that the log is captured."""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             TF_CPP_MIN_LOG_LEVEL="0")
  cases = [f"{mesh} {n} {accum}" for mesh, n, accum in DOCUMENTED_MESHES]
  out = subprocess.run([sys.executable, "-c", _COMPILE_STEPS, *cases], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
  assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
  logs = dict(re.findall(r"^== (.*)\n((?:(?!== ).*\n)*)", out.stderr, flags=re.M))
  assert set(logs) == set(cases) | {"control"}, out.stderr[-3000:]
  warning = "Involuntary full rematerialization"
  assert warning in logs["control"]
  for case in cases:
    assert warning not in logs[case], (case, logs[case][-2000:])


def test_scan_and_remat_flags_reach_the_model_config():
  """--scan-layers is on by default, --remat auto is the preset's policy (none up to 130m, full
  from 350m), and the model config cannot be given another layout behind the flags' back."""
  from train.__main__ import parse_config

  assert parse_config([]).scan_layers and parse_config([]).remat == "auto"
  assert not parse_config(["--no-scan-layers"]).scan_layers
  assert parse_config(["--remat", "dots_no_batch"]).remat == "dots_no_batch"
  default = {p: trainer.model_config(trainer.TrainConfig(preset=p), 32000) for p in M.PRESETS}
  assert all(m.scan_layers for m in default.values())
  assert {p: m.remat for p, m in default.items()} == {
      "tiny": "none", "60m": "none", "130m": "none", "350m": "full", "1b": "full", "7b": "full"}
  chosen = trainer.model_config(trainer.TrainConfig(preset="7b", remat="none",
                                                    scan_layers=False), 32000)
  assert chosen.remat == "none" and not chosen.scan_layers
  with pytest.raises(trainer.ConfigError, match="use --scan-layers instead"):
    trainer.model_config(small_config(model_overrides={"scan_layers": False}), VOCAB)
  with pytest.raises(trainer.ConfigError, match="unknown --remat 'some'"):
    trainer.validate(small_config(remat="some"))
