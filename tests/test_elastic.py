"""Elastic restore: params-only loading, checkpoint format versions, resuming on another mesh,
device count or process count, and ``python -m train.eval``."""

import jax
import numpy as np
import pytest

from tests.train_utils import assert_trees_equal, host, one_device, small_config
from train import checkpoint as ckpt_lib
from train import sharding as shd
from train import trainer

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, train_tokenizer):
  """A tiny osd_adamw run on one device with checkpoints at steps 2 and 3."""
  run_dir = tmp_path_factory.mktemp("elastic") / "run"
  cfg = small_config(run_dir, steps=3, ckpt_every=2, model_overrides={
      "dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 4})
  result = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer)
  return str(run_dir), result


def _stacked(params):
  """The scanned layout of unrolled params: every layer leaf stacked on a leading axis."""
  layers = params["layers"]
  subs = [layers[k] for k in sorted(layers)]
  return dict(params, layers=jax.tree.map(lambda *xs: np.stack(xs), *subs))


@needs_8
def test_load_params_onto_any_mesh_without_the_optimizer(saved_run, monkeypatch):
  run_dir, result = saved_run
  # no optimizer is built: make_optimizer would fail
  monkeypatch.setattr(trainer.optimizers, "make_optimizer", lambda *a, **k: 1 / 0)
  want = host(result.state.params)
  default = ckpt_lib.load_params(run_dir)  # every device on fsdp
  assert_trees_equal(default, want)
  wq = default["layers"][0]["attention"]["wq"]["kernel"]
  assert wq.sharding.mesh.shape["fsdp"] == 8 and wq.sharding.spec == shd.logical_to_spec(
      ("embed", "heads"), wq.shape, wq.sharding.mesh)
  for spec, n in (("data=-1", 1), ("fsdp=2,tensor=2", 4)):
    mesh = shd.make_mesh(spec, jax.devices()[:n])
    params = ckpt_lib.load_params(run_dir, mesh=mesh)
    assert_trees_equal(params, want)
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(params))
  assert int(ckpt_lib.load_model_config(run_dir).vocab_size) == want["embed"]["embedding"].shape[0]
  assert ckpt_lib.load_run_config(run_dir).steps == 3


def test_load_params_of_an_earlier_step_and_bad_steps(saved_run, tmp_path):
  run_dir, result = saved_run
  mesh = shd.make_mesh("data=-1", one_device())
  at2 = ckpt_lib.load_params(run_dir, step=2, mesh=mesh)
  at3 = ckpt_lib.load_params(run_dir, step=3, mesh=mesh)
  assert_trees_equal(at3, result.state.params)
  assert not np.array_equal(host(at2)["head"]["kernel"], host(at3)["head"]["kernel"])
  with pytest.raises(ckpt_lib.CheckpointError, match=r"no checkpoint of step 1 .*\[2, 3\]"):
    ckpt_lib.load_params(run_dir, step=1, mesh=mesh)
  with pytest.raises(ckpt_lib.CheckpointError, match="config.json: cannot read"):
    ckpt_lib.load_params(str(tmp_path), mesh=mesh)


def _fake_run(run_dir, cfg, state, step=1, metadata=None, monkeypatch=None):
  """Writes ``state`` as the checkpoint of ``step`` of a run dir with ``cfg`` (and the step
  metadata ``metadata`` instead of this code's)."""
  import os

  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(cfg.replace(run_dir=str(run_dir)).to_json())
  with monkeypatch.context() if monkeypatch else _nothing() as m:
    if metadata is not None:
      m.setattr(ckpt_lib, "checkpoint_metadata", lambda mesh=None: metadata)
    with ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints")) as ck:
      ck.save(step, state, config=cfg.to_dict(), wait=True)


def _nothing():
  import contextlib

  return contextlib.nullcontext()


def test_load_params_reads_either_layer_layout(saved_run, tmp_path, monkeypatch):
  """A checkpoint with the layers stacked (scanned layout) loads into the unrolled model, and an
  unrolled one into a model whose params are scanned (simulated: the abstract target stacked)."""
  run_dir, result = saved_run
  cfg = ckpt_lib.load_run_config(run_dir)
  unrolled = host(result.state.params)
  scanned = _stacked(unrolled)
  mesh = shd.make_mesh("data=-1", one_device())
  _fake_run(tmp_path / "scanned", cfg, {"params": scanned, "step": np.int32(3)})
  assert ckpt_lib.params_layout(scanned) == "scanned"
  got = ckpt_lib.load_params(str(tmp_path / "scanned"), mesh=mesh)
  assert ckpt_lib.params_layout(got) == "unrolled"
  assert_trees_equal(got, unrolled)

  abstract_params = ckpt_lib.abstract_params

  def scanned_model(model_config, mesh):
    graphdef, target = abstract_params(model_config, mesh)
    return graphdef, ckpt_lib._as_saved_layout(target, "scanned", mesh)

  monkeypatch.setattr(ckpt_lib, "abstract_params", scanned_model)
  got = ckpt_lib.load_params(run_dir, mesh=mesh)
  assert ckpt_lib.params_layout(got) == "scanned"
  assert_trees_equal(got, scanned)


def test_format_version_newer_is_refused_older_is_read(saved_run, tmp_path, monkeypatch):
  run_dir, result = saved_run
  cfg = ckpt_lib.load_run_config(run_dir)
  mesh = shd.make_mesh("data=-1", one_device())
  with ckpt_lib.Checkpointer(str(tmp_path / "x")) as ck:  # this code writes the current version
    ck.save(1, {"params": host(result.state.params)}, wait=True)
    assert ck.metadata(1)["format_version"] == ckpt_lib.FORMAT_VERSION
  # version 1 (no metadata): read
  _fake_run(tmp_path / "v1", cfg, {"params": host(result.state.params)}, metadata={},
            monkeypatch=monkeypatch)
  assert_trees_equal(ckpt_lib.load_params(str(tmp_path / "v1"), mesh=mesh), result.state.params)
  # a newer version: refused by load_params and by the trainer's restore
  newer = ckpt_lib.FORMAT_VERSION + 1
  _fake_run(tmp_path / "v9", cfg, result.state, metadata={"format_version": newer},
            monkeypatch=monkeypatch)
  message = f"format version {newer}, newer than this code reads .*update osd_jax"
  with pytest.raises(ckpt_lib.CheckpointError, match=message):
    ckpt_lib.load_params(str(tmp_path / "v9"), mesh=mesh)
  with ckpt_lib.Checkpointer(str(tmp_path / "v9" / "checkpoints")) as ck, \
      pytest.raises(ckpt_lib.CheckpointError, match=message):
    ck.restore(result.setup.abstract_state)
