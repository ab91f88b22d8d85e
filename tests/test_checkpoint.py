"""Checkpoints: round trip into fresh shardings, exact resume, mismatches, crashes, preemption."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import osd_jax
from tests.train_utils import (
  assert_trees_equal,
  cli_args,
  committed_steps,
  host,
  one_device,
  random_batch,
  small_config,
)
from train import checkpoint as ckpt_lib
from train import sharding as shd
from train import trainer

VOCAB = 256
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def _put(setup, batch):
  sharding = shd.batch_sharding(setup.mesh)
  return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def _trained_state(cfg, steps=3, devices=None):
  devices = devices or one_device()
  setup = trainer.build(cfg, VOCAB, devices=devices)
  state = setup.init_state()
  for i in range(steps):
    state, _ = setup.train_step(state, _put(setup, random_batch(i, 8, 32, VOCAB)))
  return setup, state


@needs_8
def test_round_trip_into_fresh_sharded_state(tmp_path):
  cfg = small_config(optimizer="osd_adamw", mesh="data=2,fsdp=4")
  setup, state = _trained_state(cfg, devices=jax.devices()[:8])
  saved = host(state)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(3, state, data_state={"pos": 3}, config=cfg.to_dict(), wait=True)
  ck.close()

  fresh = trainer.build(cfg, VOCAB)  # a new setup: nothing shared but the config
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    restored, data_state, saved_cfg = ck.restore(fresh.abstract_state, config=cfg.to_dict())
  assert data_state == {"pos": 3} and saved_cfg["rank"] == 4
  assert_trees_equal(restored, saved)
  projectors = osd_jax.projectors_of(restored.opt_state)  # 7 matrices per layer, 2 layers stacked
  assert len(projectors) == 7 and all(p.shape[0] == 2 for p in projectors)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh.abstract_state)):
    assert got.sharding == want.sharding
  batch = random_batch(3, 8, 32, VOCAB)
  _, m_orig = setup.train_step(state, _put(setup, batch))
  _, m_rest = fresh.train_step(restored, _put(fresh, batch))
  assert float(m_orig["loss"]) == float(m_rest["loss"])


def test_mismatched_checkpoint_is_refused(tmp_path):
  cfg = small_config(optimizer="osd_adamw")
  _, state = _trained_state(cfg, steps=1)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, state, config=cfg.to_dict(), wait=True)
  other = small_config(optimizer="osd_adamw", rank=8)
  with pytest.raises(ckpt_lib.CheckpointError, match="rank: 4 in the checkpoint, 8 now"):
    ck.restore(trainer.build(other, VOCAB).abstract_state, config=other.to_dict())
  # without the config check, the shapes tell what differs (scanned: [layers, r, L] states)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"checkpoint \(2, 4, 32\) float32 vs this run \(2, 8, 32\) float32"):
    ck.restore(trainer.build(other, VOCAB).abstract_state)
  bigger = small_config(model_overrides={"dim": 64, "hidden_dim": 64, "n_layers": 2,
                                         "n_heads": 4})
  with pytest.raises(ckpt_lib.CheckpointError, match="model_overrides"):
    ck.restore(trainer.build(bigger, VOCAB).abstract_state, config=bigger.to_dict())
  # resuming with a tokenizer of another vocabulary: the same flags, other embedding/head shapes
  with pytest.raises(ckpt_lib.CheckpointError, match=r"\['embed'\]\['embedding'\]: checkpoint "
                     r"\(256, 32\) float32 vs this run \(320, 32\) float32"):
    ck.restore(trainer.build(cfg, VOCAB + 64).abstract_state, config=cfg.to_dict())
  ck.close()


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
  cfg = small_config(optimizer="adamw")
  setup, state = _trained_state(cfg, steps=1)
  with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
    ck.save(1, state, config=cfg.to_dict(), wait=True)
  # truncate every array-data file (which ones orbax reads depends on how it merged them)
  for d, _, names in os.walk(tmp_path / "ck" / "1" / "state"):
    if os.path.basename(d) == "d":
      for name in names:
        path = os.path.join(d, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match="unreadable .*its files are damaged: delete it to resume from an "
                           "earlier one"):
    with ckpt_lib.Checkpointer(str(tmp_path / "ck")) as ck:
      ck.restore(setup.abstract_state)


def test_only_damaged_files_are_called_a_reason_to_delete_a_checkpoint():
  """An error in how a checkpoint was asked for (here orbax's, for the relative path that the
  read-only loaders once passed) never tells the user to delete the checkpoint; missing,
  truncated or unparseable files do."""
  ours = ckpt_lib.unreadable_error("runs/x/checkpoints/4", ValueError(
      "Checkpoint path should be absolute. Got runs/x/checkpoints/4"))
  assert "delete" not in str(ours) and "keep it" in str(ours)
  assert str(ours).startswith("checkpoint runs/x/checkpoints/4 could not be read (ValueError: "
                              "Checkpoint path should be absolute.")
  wrapped = RuntimeError("restore failed")
  wrapped.__cause__ = ValueError('OUT_OF_RANGE: Error reading "b/.zarray" in OCDBT database')
  damaged = [FileNotFoundError(2, "No such file or directory"), EOFError("truncated"),
             json.JSONDecodeError("Expecting value", "{", 1), wrapped,
             ValueError('DATA_LOSS: Error reading local file "d/abc"')]
  for e in damaged:
    assert "its files are damaged: delete it" in str(ckpt_lib.unreadable_error("c/1", e)), e
  for e in (PermissionError(13, "Permission denied"), TypeError("unexpected keyword"),
            ValueError("INVALID_ARGUMENT: dtype mismatch")):
    assert "delete" not in str(ckpt_lib.unreadable_error("c/1", e)), e


def test_partial_save_is_ignored_and_cleaned(tmp_path):
  """A step directory left by a process killed mid-save is never listed or loaded."""
  cfg = small_config(optimizer="adamw")
  setup, state = _trained_state(cfg, steps=1)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  ck.save(1, state, config=cfg.to_dict(), wait=True)
  ck.close()
  partial = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\0" * 10)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
  assert ck.latest_step() == 1 and ck.all_steps() == [1]
  restored, _, _ = ck.restore(setup.abstract_state)
  ck.close()
  assert_trees_equal(restored, host(state))
  assert not partial.exists()


def _train_losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize("optimizer, n_devices", [
    ("adamw", 1), ("osd_adamw", 1),
    pytest.param("osd_adamw", 8, marks=needs_8),
    pytest.param("adamw", 8, marks=[needs_8, pytest.mark.slow]),
])
def test_resume_is_bitwise_identical(optimizer, n_devices, tmp_path, train_tokenizer):
  devices = jax.devices()[:n_devices]
  mesh = "data=2,fsdp=4" if n_devices == 8 else "data=-1"
  cfg = small_config(optimizer=optimizer, steps=6, mesh=mesh, ckpt_every=2)
  full = trainer.train(cfg.replace(run_dir=str(tmp_path / "full")), devices=devices,
                       tokenizer=train_tokenizer)
  part = cfg.replace(run_dir=str(tmp_path / "part"))
  first = trainer.train(part, devices=devices, tokenizer=train_tokenizer, stop_at=3)
  assert first.preempted and int(first.state.step) == 3
  resumed = trainer.train(part.replace(resume=True), devices=devices, tokenizer=train_tokenizer)
  assert not resumed.preempted and int(resumed.state.step) == 6
  assert _train_losses(tmp_path / "part") == _train_losses(tmp_path / "full")
  assert_trees_equal(resumed.state, full.state)


def test_fresh_run_refuses_a_run_dir_with_checkpoints(tmp_path, train_tokenizer):
  cfg = small_config(tmp_path / "run", steps=2, optimizer="adamw")
  trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  with pytest.raises(trainer.ConfigError, match="--resume"):
    trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path, train_tokenizer):
  run_dir = tmp_path / "run"
  args = [sys.executable, "-m", "train", *cli_args(
      train_tokenizer.model_path, run_dir, "--log-every", "1", "--eval-every", "0",
      "--ckpt-every", "0", "--mesh", "data=-1")]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(args + ["--steps", "100000"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    if metrics.exists() and len(_train_losses(run_dir)) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err
  assert "stopped at step" in out
  steps = committed_steps(str(run_dir / "checkpoints"))
  assert len(steps) == 1 and steps[0] >= 3
  stopped = steps[0]
  done = subprocess.run(args + ["--steps", str(stopped + 2), "--resume"], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert [s for s, _ in _train_losses(run_dir)] == list(range(1, stopped + 3))


@pytest.mark.slow
def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path, train_tokenizer):
  """Killed (SIGKILL) while saving every step: the newest complete checkpoint restores, a partial
  one is never listed, and the run resumes from the command line."""
  run_dir = tmp_path / "run"
  args = [sys.executable, "-m", "train", *cli_args(
      train_tokenizer.model_path, run_dir, "--log-every", "1", "--eval-every", "0",
      "--ckpt-every", "1", "--keep-checkpoints", "2", "--mesh", "data=-1")]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(args + ["--steps", "100000"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = run_dir / "checkpoints"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and proc.poll() is None:
    if ckpt_dir.is_dir() and len([d for d in os.listdir(ckpt_dir) if d.isdigit()]) >= 2:
      break
    time.sleep(0.05)
  time.sleep(0.3)  # let it be somewhere inside the next saves
  proc.kill()
  proc.wait(timeout=30)
  setup = trainer.build(small_config(optimizer="osd_adamw"), train_tokenizer.vocab_size,
                        devices=one_device())
  with ckpt_lib.Checkpointer(str(ckpt_dir)) as ck:
    latest = ck.latest_step()
    assert latest is not None and latest >= 2
    state, data_state, _ = ck.restore(setup.abstract_state)
  assert int(state.step) == latest and data_state is not None
  assert not [d for d in os.listdir(ckpt_dir) if "tmp" in d]  # partial saves were cleaned
  done = subprocess.run(args + ["--steps", str(latest + 1), "--resume"], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert f"done: steps {latest} -> {latest + 1} (1 this run) in " in done.stdout


def _last_logged_step(run_dir) -> int:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return 0
  from train.run.metrics import read_jsonl

  return max((r["step"] for r in read_jsonl(str(path)) if "loss" in r), default=0)


@pytest.mark.slow
def test_soak_two_kills_then_resume_ends_with_the_uninterrupted_params(tmp_path, train_tokenizer):
  """300 tiny steps with a checkpoint every 25, stopped twice at arbitrary points — SIGKILL (no
  chance to save; possibly mid-save) and SIGTERM (saves and exits 0) — and resumed each time with
  --resume: the losses and the final params and optimizer state (projectors included) are
  bitwise those of an uninterrupted run."""
  steps, run_dir = 300, tmp_path / "run"
  flags = cli_args(train_tokenizer.model_path, run_dir, "--steps", str(steps), "--batch-size", "4",
                   "--seq-len", "32", "--log-every", "10", "--ckpt-every", "25",
                   "--keep-checkpoints", "2", "--eval-every", "0", "--mesh", "data=-1")
  # the uninterrupted run, in this process on one device (it also caches the tokenized corpus)
  from train.__main__ import parse_config

  reference = trainer.train(parse_config(flags).replace(run_dir=str(tmp_path / "reference")),
                            devices=one_device())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = [sys.executable, "-m", "train", *flags]
  rng = np.random.default_rng(8)

  def interrupt(sig, after_step, resume):
    proc = subprocess.Popen(command + (["--resume"] if resume else []), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
      if _last_logged_step(run_dir) >= after_step:
        break
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.05))  # somewhere between log steps (and saves)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err

  rc, _, err = interrupt(signal.SIGKILL, int(rng.integers(60, 120)), resume=False)
  assert rc == -signal.SIGKILL, err[-2000:]
  killed_at = _last_logged_step(run_dir)
  latest = max(committed_steps(str(run_dir / "checkpoints")), default=None)
  assert latest is not None and 25 <= latest <= killed_at + 10 and latest % 25 == 0

  rc, out, err = interrupt(signal.SIGTERM, int(rng.integers(170, 230)), resume=True)
  assert rc == 0 and "stopped at step" in out, err[-2000:]
  stopped = int(out.split("stopped at step ")[1].split()[0].rstrip(";"))
  assert stopped < steps
  assert stopped in committed_steps(str(run_dir / "checkpoints"))
  print(f"SIGKILL after logged step {killed_at} (resumed from {latest}); SIGTERM at {stopped}")

  done = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True,
                        timeout=180, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"done: steps {stopped} -> {steps} ({steps - stopped} this run) in " in done.stdout

  assert _train_losses(run_dir) == _train_losses(tmp_path / "reference")
  assert [s for s, _ in _train_losses(run_dir)] == list(range(10, steps + 1, 10))
  with ckpt_lib.Checkpointer(str(run_dir / "checkpoints")) as ck:
    assert ck.latest_step() == steps
    restored, _, _ = ck.restore(reference.setup.abstract_state)
  assert_trees_equal(restored, reference.state)


def _free_port():
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Runs ``python -m train`` (argv after the log path) recording, for the test: every local batch the
# process hands to ``jax.make_array_from_process_local_data`` and every file it writes (Python
# opens for writing, renames, mkdirs) under the run directory. Array data that orbax writes through
# tensorstore (C++) is not seen; checkpoint metadata, JSON items and metrics are.
_WORKER = r"""
import json, os, sys
import numpy as np
log_path, argv = sys.argv[1], sys.argv[2:]
run_dir = os.path.realpath(argv[argv.index("--run-dir") + 1])
writes, batches = [], []

def _under_run_dir(path):
  try:
    path = os.path.realpath(os.fsdecode(path))
  except TypeError:  # a file descriptor
    return None
  return os.path.relpath(path, run_dir) if path.startswith(run_dir + os.sep) else None

def hook(event, args):
  if event == "open":
    path, mode, flags = args
    if mode is None:
      write = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    else:
      write = any(c in str(mode) for c in "wax+")
    rel = _under_run_dir(path) if write else None
  elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir"):
    rel = _under_run_dir(args[0])
  else:
    return
  if rel is not None:
    writes.append(rel)

sys.addaudithook(hook)
from train import trainer
from train.__main__ import main

def record(split, step, batch):
  batches.append(np.asarray(batch["inputs"]).tolist())

try:
  rc = main(argv, hooks=trainer.TrainHooks(on_batch=record))
finally:
  with open(log_path, "w") as f:
    json.dump({"writes": writes, "batches": batches}, f)
sys.exit(rc)
"""


@pytest.mark.slow
def test_two_processes_match_one_process_save_and_resume(tmp_path, train_tokenizer):
  """Two local processes (CPU collectives over a localhost coordinator, 2 devices each) train 2
  steps, save and resume to step 4. Each process reads its own rows of every global batch (disjoint
  from the other's), the losses equal those of one process with the same global batch and mesh,
  and only process 0 writes checkpoint metadata, metrics and run files."""
  run_dir = tmp_path / "run"
  common = cli_args(train_tokenizer.model_path, run_dir, "--log-every", "1", "--ckpt-every", "2",
                    "--eval-every", "0", "--mesh", "data=2,fsdp=2")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")

  def launch(phase, *extra):
    port = _free_port()
    logs = [tmp_path / f"{phase}-{i}.json" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(logs[i]), *common, *extra, "--num-processes", "2",
         "--process-id", str(i), "--coordinator-address", f"127.0.0.1:{port}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs], [json.loads(log.read_text()) for log in logs]

  outs, first = launch("first", "--steps", "2")
  assert "done: 2 steps" in outs[0] and "done:" not in outs[1]  # only process 0 reports
  _, second = launch("second", "--steps", "4", "--resume")
  assert committed_steps(str(run_dir / "checkpoints")) == [2, 4]
  multi = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

  # one process, the same global batch and mesh (4 of this test process's fake devices)
  from train.__main__ import parse_config

  single_batches = []

  def record(split, step, batch):
    single_batches.append(np.asarray(batch["inputs"]).tolist())

  cfg = parse_config(cli_args(train_tokenizer.model_path, tmp_path / "single", "--log-every", "1",
                              "--ckpt-every", "2", "--eval-every", "0", "--mesh", "data=2,fsdp=2",
                              "--steps", "4"))
  single = trainer.train(cfg, devices=jax.devices()[:4],
                         hooks=trainer.TrainHooks(on_batch=record)).history

  def series(records, key):
    return [(r["step"], r[key]) for r in records if key in r]

  assert [s for s, _ in series(multi, "loss")] == [1, 2, 3, 4]
  for key in ("loss", "grad_norm", "eval_loss"):  # eval: at 0 and 4 (and 2, the first run's end)
    got, want = dict(series(multi, key)), dict(series(single, key))
    assert set(want) <= set(got) and len(want) >= 2, key
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=2e-6,
                               err_msg=key)

  # local batches: [eval@0, train 1, train 2, eval@2] then [train 3, train 4, eval@4]
  train_rows = [first[i]["batches"][1:3] + second[i]["batches"][:2] for i in range(2)]
  single_train = single_batches[1:5]  # [eval@0, train 1..4, eval@4]
  for k in range(4):
    assert len(train_rows[0][k]) == len(train_rows[1][k]) == 4
    assert train_rows[0][k] + train_rows[1][k] == single_train[k]  # process 0 then process 1
  shards = [{tuple(r) for b in rows for r in b} for rows in train_rows]
  assert len(shards[0]) == len(shards[1]) == 16 and not shards[0] & shards[1]
  assert first[0]["batches"][0] + first[1]["batches"][0] == single_batches[0]  # eval rows too

  # only process 0 writes checkpoint metadata and run files; process 1 writes (through Python)
  # nothing but the metadata of its own array shards (.../array_metadatas/process_1)
  written = [{re.sub(r"\.orbax-checkpoint-tmp[^/]*", "", w)  # orbax's temporary names
              for w in first[i]["writes"] + second[i]["writes"]} for i in range(2)]
  assert {"config.json", "metrics.jsonl", "tokenizer.model"} <= written[0]
  for step in (2, 4):
    shared = {"_CHECKPOINT_METADATA", "state/_METADATA", "config/metadata", "data/metadata",
              "signature/metadata"}
    assert {f"checkpoints/{step}/{name}" for name in shared} <= written[0], sorted(written[0])
  assert written[1] and all("process_1" in w.split("/") for w in written[1]), sorted(written[1])


def test_auto_resume_starts_fresh_then_continues(tmp_path, train_tokenizer):
  """--auto-resume: the same command starts a fresh run, then continues it after a stop."""
  cfg = small_config(tmp_path / "run", optimizer="osd_adamw", steps=4, ckpt_every=2,
                     auto_resume=True)
  first = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer, stop_at=2)
  assert first.preempted and int(first.state.step) == 2 and first.initial_eval
  again = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer)
  assert not again.preempted and int(again.state.step) == 4
  assert not again.initial_eval  # resumed: the step-0 eval is not repeated
  assert [s for s, _ in _train_losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_sigterm_while_starting_up_stops_before_the_first_step(tmp_path, train_tokenizer):
  """SIGTERM before the first step (here: once the model, data and checkpointer are ready) stops
  cleanly with nothing saved; the same command then starts the run afresh, and metrics.jsonl
  holds one run."""
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=3, log_every=1, auto_resume=True)
  sigterm = trainer.TrainHooks(on_start=lambda: os.kill(os.getpid(), signal.SIGTERM))
  stopped = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer, hooks=sigterm)
  assert stopped.preempted and int(stopped.state.step) == 0
  assert committed_steps(str(tmp_path / "run" / "checkpoints")) == []
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
  done = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer)
  assert not done.preempted and int(done.state.step) == 3
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if "eval_loss" in r] == [0, 3]
  assert [s for s, _ in _train_losses(tmp_path / "run")] == [1, 2, 3]


def test_a_save_cut_short_before_any_checkpoint_is_not_resumed(tmp_path, train_tokenizer):
  """Killed during its first save, a run leaves only orbax's temporary directory: the same
  --auto-resume command starts afresh, and --resume says there is nothing to continue."""
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=2, auto_resume=True)
  partial = tmp_path / "run" / "checkpoints" / "2.orbax-checkpoint-tmp-1234" / "state"
  partial.mkdir(parents=True)
  (partial / "garbage").write_bytes(b"\0" * 10)
  with pytest.raises(trainer.ConfigError, match="--resume: no checkpoints"):
    trainer.train(cfg.replace(auto_resume=False, resume=True), devices=one_device(),
                  tokenizer=train_tokenizer)
  done = trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer)
  assert not done.preempted and int(done.state.step) == 2
  assert committed_steps(str(tmp_path / "run" / "checkpoints")) == [2]


def test_resume_refuses_another_data_stream_and_reports_schedule_changes(tmp_path, train_tokenizer,
                                                                         caplog):
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=4, ckpt_every=2)
  trainer.train(cfg, devices=one_device(), tokenizer=train_tokenizer, stop_at=2)
  resume = cfg.replace(resume=True)
  for change, message in ((dict(seed=5), "seed: 0 in the checkpoint, 5 now"),
                          (dict(seq_len=16), "seq_len: 32 in the checkpoint, 16 now"),
                          (dict(batch_size=4), "batch_size: 8 in the checkpoint, 4 now")):
    with pytest.raises(ckpt_lib.CheckpointError, match=f"another data stream: {message}.*--config"):
      trainer.train(resume.replace(**change), devices=one_device(), tokenizer=train_tokenizer)
  with caplog.at_level("WARNING", logger="train"):
    done = trainer.train(resume.replace(steps=5), devices=one_device(), tokenizer=train_tokenizer)
  assert int(done.state.step) == 5
  assert "resuming with changed settings" in caplog.text and "steps: 4 in the checkpoint, 5 now" \
      in caplog.text
  with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["resume"] is False and saved["steps"] == 5  # --config repeats the run's own flags
