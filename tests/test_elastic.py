"""Elastic restore: params-only loading, checkpoint format versions, resuming on another mesh,
device count or process count, and ``python -m train.eval``."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train_utils import assert_trees_equal, host, one_device, small_config
from train import checkpoint as ckpt_lib
from train import optimizers, trainer
from train import sharding as shd
from train.model import params_layout

needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, train_tokenizer):
  """A tiny osd_adamw run on one device with checkpoints at steps 2 and 3, in the unrolled layout
  (one subtree per layer), so that the layout conversions below start from per-layer params; the
  topology tests further down use the default scanned layout."""
  run_dir = tmp_path_factory.mktemp("elastic") / "run"
  cfg = small_config(run_dir, steps=3, ckpt_every=2, scan_layers=False, model_overrides={
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
  monkeypatch.setattr(optimizers, "make_optimizer", lambda *a, **k: 1 / 0)
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
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(cfg.replace(run_dir=str(run_dir)).to_json())
  with monkeypatch.context() if monkeypatch else _nothing() as m:
    if metadata is not None:
      from train.checkpoint import checkpointer  # where Checkpointer.save looks it up

      m.setattr(checkpointer, "checkpoint_metadata", lambda mesh=None: metadata)
    with ckpt_lib.Checkpointer(os.path.join(run_dir, "checkpoints")) as ck:
      ck.save(step, state, config=cfg.to_dict(), wait=True)


def _nothing():
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
  assert params_layout(scanned) == "scanned"
  got = ckpt_lib.load_params(str(tmp_path / "scanned"), mesh=mesh)
  assert params_layout(got) == "unrolled"
  assert_trees_equal(got, unrolled)

  from train.checkpoint import loading

  abstract_params = loading.abstract_params

  def scanned_model(model_config, mesh):
    graphdef, target = abstract_params(model_config, mesh)
    # No public API builds the other layout's abstract target (the restore does it internally).
    return graphdef, loading._as_saved_layout(target, "scanned", mesh)  # noqa: SLF001

  monkeypatch.setattr(loading, "abstract_params", scanned_model)
  got = ckpt_lib.load_params(run_dir, mesh=mesh)
  assert params_layout(got) == "scanned"
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


# ----------------------------------------------------------------------------- train.eval


def test_eval_matches_the_trainer_and_a_float64_reference(saved_run, tmp_path):
  """train.eval on the run's data gives the trainer's final eval (same mesh: bitwise); on a text
  corpus its loss is the float64 mean token cross-entropy of the model's logits."""
  from train import eval as eval_lib
  from train.data import pipeline
  from train.data import tokenizer as tok_lib

  run_dir, result = saved_run
  got = eval_lib.evaluate_checkpoint(run_dir, mesh="data=-1", devices=one_device())
  assert got["step"] == 3 and got["eval_loss"] == result.final_eval["eval_loss"]

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(30):
    (corpus / f"{i}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps. " * (i + 3))
  got = eval_lib.evaluate_checkpoint(run_dir, data=f"text:{corpus}", batches=2, batch_size=4,
                                     step=2, mesh="data=-1", devices=one_device())
  tokenizer = tok_lib.load_tokenizer(f"{run_dir}/tokenizer.model")
  ds = pipeline.make_dataset(f"text:{corpus}", tokenizer, split="eval", seq_len=32,
                             batch_size=4)
  loaded = ckpt_lib.load_model(run_dir, step=2, mesh=shd.make_mesh("data=-1", one_device()))
  model = nnx.merge(loaded.graphdef, loaded.params)
  nll = []
  it = iter(ds)
  for batch in (next(it), next(it)):
    logits = np.asarray(model(batch["inputs"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll.append(-np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0])
  want = float(np.mean(np.concatenate(nll)))
  assert got["step"] == 2 and got["batches"] == 2
  np.testing.assert_allclose(got["eval_loss"], want, rtol=1e-6)
  np.testing.assert_allclose(got["eval_perplexity"], np.exp(want), rtol=1e-5)


def test_eval_command_line(saved_run):
  run_dir, result = saved_run
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run([sys.executable, "-m", "train.eval", run_dir, "--batches", "1"],
                        env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.startswith(f"step 3: eval loss {result.final_eval['eval_loss']:.4f}, "
                                f"perplexity {result.final_eval['eval_perplexity']:.2f}")
  bad = subprocess.run([sys.executable, "-m", "train.eval", run_dir, "--step", "7"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines() == [
      f"error: no checkpoint of step 7 in {run_dir}/checkpoints; it holds steps [2, 3]"]


# ----------------------------------------------------------------------------- data position


def test_seek_moves_to_a_global_batch_for_any_row_split():
  from train.data import pipeline
  from train.data import text as text_lib

  tokens = np.arange(4000) % 251
  whole = iter(text_lib.make_token_dataset(tokens, seq_len=8, batch_size=8, seed=3))
  batches = [next(whole)["inputs"] for _ in range(7)]
  for count in (1, 2, 4):
    for index in range(count):
      it = iter(text_lib.make_token_dataset(tokens, seq_len=8, batch_size=8 // count, seed=3,
                                            process_index=index, process_count=count))
      pipeline.seek(it, 5, "embedded")
      rows = slice(index * 8 // count, (index + 1) * 8 // count)
      np.testing.assert_array_equal(next(it)["inputs"], batches[5][rows])
      np.testing.assert_array_equal(next(it)["inputs"], batches[6][rows])
  with pytest.raises(ValueError, match="tfds:c4 is packed per process.*resume with the process"):
    pipeline.seek(None, 5, "tfds:c4")


# ----------------------------------------------------------------------------- elastic resume

ELASTIC_MODEL = {"dim": 32, "hidden_dim": 64, "n_layers": 1, "n_heads": 4}
# Relative loss difference allowed after a resume on another layout, for float32 reduction
# order: about 12 ulps at these losses (~6.2, ulp 4.8e-7). Measured on a 2-core CPU with fake
# devices: 0 (bitwise) for each single-process change, 7.7e-8 (1 ulp) for 2 -> 1 -> 2 processes;
# uninterrupted runs on two of these layouts differ by up to 7.8e-8 (train/README.md).
LAYOUT_RTOL = 1e-6


def _losses(history):
  return {r["step"]: r["loss"] for r in history if "loss" in r}


def _recording_batches():
  """Hooks that record the batch (inputs) of every train and eval step of this process."""
  seen = []

  def record(split, step, batch):
    seen.append(np.asarray(batch["inputs"]).copy())

  return trainer.TrainHooks(on_batch=record), seen


@pytest.fixture(scope="module")
def fsdp8_checkpoint(tmp_path_factory, train_tokenizer):
  """4 steps on 8 devices (fsdp=8), stopped at step 2 (checkpoint), and the same run
  uninterrupted."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices")
  root = tmp_path_factory.mktemp("fsdp8")
  cfg = small_config(root / "part", steps=4, ckpt_every=2, mesh="fsdp=8",
                     model_overrides=dict(ELASTIC_MODEL))
  first = trainer.train(cfg, devices=jax.devices()[:8], tokenizer=train_tokenizer, stop_at=2)
  assert first.preempted and int(first.state.step) == 2
  full = trainer.train(cfg.replace(run_dir=str(root / "full")), devices=jax.devices()[:8],
                       tokenizer=train_tokenizer)
  return cfg, host(first.state), _losses(full.history)


@pytest.mark.parametrize("mesh, n_devices", [
    pytest.param("data=2,fsdp=2", 4, marks=pytest.mark.slow),
    ("data=-1", 1),
    pytest.param("data=2,tensor=2", 4, marks=pytest.mark.slow),
])
def test_resume_on_another_mesh_or_device_count(mesh, n_devices, fsdp8_checkpoint, tmp_path,
                                                train_tokenizer, monkeypatch, caplog):
  """Saved on 8 devices (fsdp=8) at step 2, resumed on another layout: the restored params and
  optimizer state are bitwise those saved, now in the new layout's shardings; steps 3 and 4 read
  the global batches an uninterrupted run reads; their losses match an uninterrupted run on the
  new layout to float32 reduction order."""
  cfg, saved, source_losses = fsdp8_checkpoint
  devices = jax.devices()[:n_devices]
  run = tmp_path / "run"
  shutil.copytree(cfg.run_dir, run)
  resumed_cfg = cfg.replace(run_dir=str(run), mesh=mesh, resume=True)

  setup = trainer.build(resumed_cfg, train_tokenizer.vocab_size, devices=devices)
  with ckpt_lib.Checkpointer(str(run / "checkpoints")) as ck:
    restored, _, _ = ck.restore(setup.abstract_state, config=resumed_cfg.to_dict())
  assert_trees_equal(restored, saved)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(setup.abstract_state)):
    assert got.sharding == want.sharding

  hooks, seen = _recording_batches()
  with caplog.at_level("INFO", logger="train"):
    resumed = trainer.train(resumed_cfg, devices=devices, tokenizer=train_tokenizer, hooks=hooks)
  assert f"resuming at step 2 on mesh {dict(setup.mesh.shape)} ({n_devices} devices, 1 " \
         f"process) (saved on mesh {{'data': 1, 'fsdp': 8, 'tensor': 1}} (8 devices, 1 " \
         f"process)): params and optimizer state resharded" in caplog.text
  resumed_batches = list(seen)
  seen.clear()
  reference = trainer.train(cfg.replace(run_dir=str(tmp_path / "ref"), mesh=mesh),
                            devices=devices, tokenizer=train_tokenizer, hooks=hooks)
  # reference: [eval@0, train 1..4, eval@4]; resumed: [train 3, train 4, eval@4]
  for got, want in zip(resumed_batches, seen[3:]):
    np.testing.assert_array_equal(got, want)
  assert len(resumed_batches) == 3

  got, want = _losses(resumed.history), _losses(reference.history)
  assert sorted(got) == [3, 4]
  rel = max(abs(got[s] - want[s]) / abs(want[s]) for s in got)
  layout_rel = max(abs(source_losses[s] - want[s]) / abs(want[s]) for s in want)
  print(f"{mesh} on {n_devices} devices: resumed vs uninterrupted {rel:.2e}, fsdp=8 vs this "
        f"layout uninterrupted {layout_rel:.2e}")
  assert rel <= LAYOUT_RTOL
  np.testing.assert_allclose(resumed.final_eval["eval_loss"], reference.final_eval["eval_loss"],
                             rtol=LAYOUT_RTOL)


# Runs trainer.train(parse_config(argv), stop_at=STOP) in a process of a jax.distributed job and
# writes, for the test: the local batches it read, the run's history, and (process 0) the whole
# state right after a restore and at the end, gathered from every process, as .npz.
_WORKER = r"""
import json, logging, sys
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(message)s")
out, stop_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
import jax
from jax.experimental import multihost_utils
from train import checkpoint as ckpt_lib
from train import trainer
from train.__main__ import parse_config

def gathered(tree):
  return [np.asarray(x) for x in multihost_utils.process_allgather(jax.tree.leaves(tree),
                                                                    tiled=True)]

batches, restored = [], []
def record(split, step, batch):
  batches.append(np.asarray(batch["inputs"]).tolist())
restore = ckpt_lib.Checkpointer.restore
def restore_and_keep(self, *args, **kwargs):
  result = restore(self, *args, **kwargs)
  restored.extend(gathered(result[0]))
  return result
ckpt_lib.Checkpointer.restore = restore_and_keep
result = trainer.train(parse_config(argv), stop_at=stop_at or None,
                       hooks=trainer.TrainHooks(on_batch=record))
final = gathered(result.state)
if jax.process_index() == 0:
  np.savez(out + "-final.npz", *final)
  if restored:
    np.savez(out + "-restored.npz", *restored)
with open(out + f"-{jax.process_index()}.json", "w") as f:
  json.dump({"batches": batches, "history": result.history}, f)
"""


def _npz_leaves(path):
  with np.load(path) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


@pytest.mark.slow
def test_two_processes_to_one_and_back(tmp_path, train_tokenizer, monkeypatch):
  """A run saved by 2 processes (2 devices each) at step 2 resumes in 1 process (4 devices) to
  step 4, which 2 processes resume to step 6: every restore is bitwise the saved state, every
  step reads the global batch an uninterrupted run reads, and the losses match that run (one
  process, same mesh) to float32 reduction order."""
  from tests.train_utils import cli_args
  from train.__main__ import parse_config

  run_dir = tmp_path / "run"
  flags = ["--steps", "6", "--log-every", "1", "--ckpt-every", "2", "--eval-every", "0",
           "--mesh", "data=2,fsdp=2", "--model-override", "n_layers=1"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def two_processes(phase, stop_at, *extra):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    out = str(tmp_path / phase)
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, out, str(stop_at),
         *cli_args(train_tokenizer.model_path, run_dir, *flags, *extra),
         "--num-processes", "2", "--process-id", str(i), "--coordinator-address",
         f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for p, err in zip(procs, errs):
      assert p.returncode == 0, err[-3000:]
    logs = []
    for i in range(2):
      with open(f"{out}-{i}.json", encoding="utf-8") as f:
        logs.append(json.load(f))
    # global batches: process 0's rows, then process 1's
    batches = [np.asarray(a + b) for a, b in zip(logs[0]["batches"], logs[1]["batches"])]
    return batches, logs[0]["history"], errs[0]

  first_batches, first_history, _ = two_processes("first", 2)  # [eval@0, train 1, train 2]
  saved_at_2 = _npz_leaves(str(tmp_path / "first-final.npz"))

  hooks, seen = _recording_batches()
  kept = []
  restore = ckpt_lib.Checkpointer.restore

  def restore_and_keep(self, *args, **kwargs):
    result = restore(self, *args, **kwargs)
    kept.append(host(result[0]))
    return result

  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", restore_and_keep)
  one = trainer.train(parse_config(cli_args(train_tokenizer.model_path, run_dir, *flags,
                                            "--resume")),
                      devices=jax.devices()[:4], stop_at=4, hooks=hooks)
  assert one.preempted and int(one.state.step) == 4
  for got, want in zip(jax.tree.leaves(kept[0]), saved_at_2, strict=True):
    np.testing.assert_array_equal(got, want)
  middle_batches = list(seen)  # [train 3, train 4]
  saved_at_4 = jax.tree.leaves(host(one.state))

  last_batches, last_history, log_text = two_processes("last", 0, "--resume")
  assert "resuming at step 4 on mesh {'data': 2, 'fsdp': 2, 'tensor': 1} (4 devices, 2 " \
         "processes) (saved on mesh {'data': 2, 'fsdp': 2, 'tensor': 1} (4 devices, 1 " \
         "process))" in log_text
  for got, want in zip(_npz_leaves(str(tmp_path / "last-restored.npz")), saved_at_4,
                       strict=True):
    np.testing.assert_array_equal(got, want)

  seen.clear()
  reference = trainer.train(parse_config(cli_args(train_tokenizer.model_path,
                                                  tmp_path / "reference", *flags)),
                            devices=jax.devices()[:4], hooks=hooks)
  # reference: [eval@0, train 1..6, eval@6]
  got = first_batches + middle_batches + last_batches
  assert len(got) == len(seen) == 8
  for g, w in zip(got, seen):
    np.testing.assert_array_equal(g, w)

  losses = {**_losses(first_history), **_losses(one.history), **_losses(last_history)}
  want = _losses(reference.history)
  assert sorted(losses) == sorted(want) == [1, 2, 3, 4, 5, 6]
  rel = max(abs(losses[s] - want[s]) / abs(want[s]) for s in want)
  print(f"2 -> 1 -> 2 processes: resumed vs uninterrupted {rel:.2e}")
  assert rel <= LAYOUT_RTOL
