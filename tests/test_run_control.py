"""Run directories and interrupts, as processes see them: a locked run directory, default names
that cannot collide, ``--config RUN_DIR/config.json`` following a copied run, and SIGTERM/SIGINT
stopping after the current step with a checkpoint and the command that continues the run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train_utils import cli_args, committed_steps
from train.__main__ import parse_config
from train.config import TrainConfig
from train.run import rundir

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _popen(args, cwd=None):
  return subprocess.Popen([sys.executable, "-m", "train", *args], env=_env(), cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run_dir):
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _stop_lines(out, err):
  """The lines of a run's output that say it stopped."""
  return [line for line in (out + err).splitlines() if "stopped" in line]


def _wait_for(predicate, proc, timeout=180):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    if predicate():
      return
    time.sleep(0.1)
  _, err = proc.communicate(timeout=10) if proc.poll() is not None else ("", "")
  raise AssertionError(f"timed out or exited early ({proc.returncode}): {err[-2000:]}")


def test_default_run_dirs_are_unique_and_absolute():
  """Processes running at the same time have distinct pids (and hosts sharing runs/ are kept
  apart by 24 random bits); the full name is checked against the documented pattern."""
  cfg = TrainConfig(preset="60m", optimizer="adamw")
  name = rundir.default_run_dir(cfg)
  assert os.path.isabs(name) and os.path.dirname(name) == os.path.abspath("runs")
  assert re.fullmatch(rf"60m-adamw-\d{{8}}-\d{{6}}-{os.getpid()}-[0-9a-f]{{6}}",
                      os.path.basename(name)), name
  code = ("import os; from train import config; from train.run import rundir; "
          "print(os.getpid(), rundir.default_run_dir(config.TrainConfig()))")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                       timeout=60, check=True)
  pid, other = out.stdout.split()
  assert pid != str(os.getpid()) and f"-{pid}-" in other and other != name


def test_run_dir_lock_is_exclusive_and_released(tmp_path):
  run_dir = str(tmp_path / "run")
  first = rundir.RunDirLock(run_dir)
  # flock locks belong to open file descriptions: a second open in this process conflicts too
  with pytest.raises(rundir.ConfigError, match=r"is in use by another run \(pid \d+"):
    rundir.RunDirLock(run_dir)
  first.release(clean=True)  # created by the lock and empty but for it: removed
  assert not os.path.exists(run_dir)
  os.makedirs(run_dir)
  (tmp_path / "run" / "keep.txt").write_text("x")
  lock = rundir.RunDirLock(run_dir)
  lock.release(clean=True)  # not created by the lock: kept
  assert os.path.isfile(tmp_path / "run" / "keep.txt")
  rundir.RunDirLock(run_dir).release()


def test_the_config_is_resolved_once_and_frozen(tmp_path, monkeypatch):
  """startup.resolve: validated, directories absolute, rank filled in, --auto-resume decided,
  the run directory locked; the config it returns cannot be changed in place. A failed resolve
  (--resume without a checkpoint) releases the lock."""
  import dataclasses

  from train.config import ConfigError
  from train.run import startup

  monkeypatch.chdir(tmp_path)
  cfg = TrainConfig(preset="tiny", run_dir="runs/a", ckpt_dir="ckpts", auto_resume=True)
  resolved, lock = startup.resolve(cfg)
  try:
    assert resolved.run_dir == str(tmp_path / "runs" / "a")
    assert resolved.checkpoint_dir == str(tmp_path / "ckpts")
    assert resolved.rank == cfg.resolved_rank and cfg.rank is None
    assert resolved.resume is False  # no checkpoint yet
    with pytest.raises(rundir.ConfigError, match="in use by another run"):
      startup.resolve(cfg)
  finally:
    lock.release(clean=True)
  with pytest.raises(dataclasses.FrozenInstanceError):
    resolved.lr = 1.0
  with pytest.raises(ConfigError, match="--resume: no checkpoints in"):
    startup.resolve(cfg.replace(auto_resume=False, resume=True))
  startup.resolve(cfg)[1].release(clean=True)  # the failed one let go of the directory
  with pytest.raises(ConfigError, match="--lr"):
    startup.resolve(cfg.replace(lr=-1.0))


def test_config_of_a_copied_run_dir_names_the_copy(tmp_path):
  original, copy = tmp_path / "A", tmp_path / "B"
  original.mkdir()
  cfg = TrainConfig(run_dir=str(original), steps=7)
  (original / "config.json").write_text(cfg.to_json())
  (original / "metrics.jsonl").write_text("")
  shutil.copytree(original, copy)
  cwd = os.getcwd()
  os.chdir(tmp_path)
  try:
    assert parse_config(["--config", "B/config.json", "--resume"]).run_dir == str(copy)
    assert parse_config(["--config", "B/config.json", "--auto-resume"]).run_dir == str(copy)
    # without --resume: the run is repeated in a new (default) run dir
    assert parse_config(["--config", "B/config.json"]).run_dir is None
    assert parse_config(["--config", "B/config.json", "--run-dir", "C"]).run_dir == "C"
    # a config file of one's own keeps its run_dir
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"run_dir": "runs/x", "steps": 3}))
    assert parse_config(["--config", str(own), "--resume"]).run_dir == "runs/x"
  finally:
    os.chdir(cwd)


@pytest.mark.slow
def test_lock_signals_and_config_resume_of_a_copied_run(tmp_path, train_tokenizer):
  """One run holds its run dir: a second run into it is refused with one line (exit 2). SIGTERM
  stops it after the current step, long before the next log step (exit 0); a copy of the run dir
  continues in the copy from another working directory with --config COPY/config.json --resume,
  and SIGINT stops that one with a checkpoint too (exit 130); --config alone repeats the run in a
  new run directory."""
  run_dir = tmp_path / "A"
  base = cli_args(train_tokenizer.model_path, run_dir, "--eval-every", "0", "--ckpt-every", "0",
                  "--mesh", "data=-1")
  first = _popen(base + ["--steps", "100000", "--log-every", "1000"])
  _wait_for(lambda: _records(run_dir), first)  # the step-0 eval: training starts now
  second = _popen(base + ["--steps", "3"])
  out, err = second.communicate(timeout=180)
  assert second.returncode == 2, err
  assert err.count("\n") == 1 and err.startswith(f"error: --run-dir {run_dir} is in use by "
                                                 f"another run (pid {first.pid}"), err
  time.sleep(3)
  first.send_signal(signal.SIGTERM)
  out, err = first.communicate(timeout=120)
  assert first.returncode == 0, err
  (stopped,) = committed_steps(str(run_dir / "checkpoints"))
  assert 1 <= stopped < 1000, stopped  # stopped after the current step, not at a log step
  config = run_dir / "config.json"
  assert _stop_lines(out, err) == [f"stopped at step {stopped} by SIGTERM; checkpoint in "
                                   f"{run_dir}; continue with: python -m train --config {config} "
                                   f"--resume"]
  saved = json.loads(config.read_text())
  assert saved["run_dir"] == str(run_dir) and saved["rank"] == 4

  copy, elsewhere = tmp_path / "B", tmp_path / "elsewhere"
  shutil.copytree(run_dir, copy)
  elsewhere.mkdir()
  metrics_before = (run_dir / "metrics.jsonl").read_text()
  resumed = _popen(["--config", os.path.join("..", "B", "config.json"), "--resume",
                    "--log-every", "1"], cwd=elsewhere)
  _wait_for(lambda: len(_records(copy)) >= len(metrics_before.splitlines()) + 2, resumed)
  resumed.send_signal(signal.SIGINT)
  out, err = resumed.communicate(timeout=120)
  assert resumed.returncode == 130, err
  *earlier, again = committed_steps(str(copy / "checkpoints"))
  assert earlier == [stopped] and again > stopped
  (line,) = _stop_lines(out, err)  # one line, not the trainer's as well
  assert line.startswith(f"stopped at step {again} by SIGINT; checkpoint in {copy}; continue with")
  assert "Traceback" not in err
  # the original is untouched
  assert committed_steps(str(run_dir / "checkpoints")) == [stopped]
  assert (run_dir / "metrics.jsonl").read_text() == metrics_before
  assert json.loads((copy / "config.json").read_text())["run_dir"] == str(copy)

  repeat = _popen(["--config", str(copy / "config.json"), "--steps", "2"], cwd=elsewhere)
  out, err = repeat.communicate(timeout=180)
  assert repeat.returncode == 0, err
  (new_dir,) = os.listdir(elsewhere / "runs")
  assert new_dir.startswith("tiny-osd_adamw-")
  assert committed_steps(str(elsewhere / "runs" / new_dir / "checkpoints")) == [2]
  assert committed_steps(str(copy / "checkpoints")) == [stopped, again]


def _run_module(module, args, cwd):
  return subprocess.run([sys.executable, "-m", module, *args], env=_env(), cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_relative_run_and_checkpoint_dirs_evaluate_export_and_resume_elsewhere(
    tmp_path, train_tokenizer, monkeypatch):
  """A run started with a relative --run-dir and --ckpt-dir: train.eval, train.export and
  load_params read it by its relative run dir, and --config ABS/config.json --resume continues
  it from another working directory (config.json holds both directories absolute); the resumed
  run's last line says which steps it ran."""
  work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
  work.mkdir()
  elsewhere.mkdir()
  args = cli_args(train_tokenizer.model_path, os.path.join("runs", "x"), "--ckpt-dir",
                  os.path.join("ckpts", "x"), "--steps", "2", "--eval-every", "0")
  out = _run_module("train", args, cwd=work)
  assert out.returncode == 0 and "done: 2 steps" in out.stdout, out.stderr
  run_dir, ckpt_dir = work / "runs" / "x", work / "ckpts" / "x"
  saved = json.loads((run_dir / "config.json").read_text())
  assert (saved["run_dir"], saved["ckpt_dir"]) == (str(run_dir), str(ckpt_dir))
  assert committed_steps(str(ckpt_dir)) == [2] and not (run_dir / "checkpoints").exists()

  out = _run_module("train.eval", ["runs/x", "--batches", "1"], cwd=work)
  assert out.returncode == 0, out.stderr
  assert re.fullmatch(r"step 2: eval loss [\d.]+, perplexity [\d.]+ \(1 batches of 8 x 16 "
                      r"tokens, --data embedded eval split\)\n", out.stdout), out.stdout
  out = _run_module("train.export", ["runs/x", "hf/x"], cwd=work)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("exported the latest checkpoint of runs/x (float32) to hf/x: ")
  assert (work / "hf" / "x" / "model.safetensors").is_file()
  monkeypatch.chdir(work)
  from train import checkpoint as ckpt_lib

  params = ckpt_lib.load_params("runs/x")
  assert params["embed"]["embedding"].shape[0] == train_tokenizer.vocab_size
  monkeypatch.chdir(elsewhere)

  out = _run_module("train", ["--config", str(run_dir / "config.json"), "--resume",
                              "--steps", "4"], cwd=elsewhere)
  assert out.returncode == 0, out.stderr
  assert "done: steps 2 -> 4 (2 this run) in " in out.stdout, out.stdout
  assert committed_steps(str(ckpt_dir)) == [2, 4]
  assert os.listdir(elsewhere) == []  # nothing was written in the working directory


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_run_dirs(tmp_path, train_tokenizer):
  """The issue's sweep: two runs started in the same second without --run-dir."""
  args = [a for a in cli_args(train_tokenizer.model_path, "X", "--steps", "2", "--mesh", "data=-1",
                              "--ckpt-every", "1")]
  i = args.index("--run-dir")
  del args[i:i + 2]
  procs = [_popen(args + ["--lr", lr], cwd=tmp_path) for lr in ("1e-3", "3e-3")]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err
  dirs = sorted(os.listdir(tmp_path / "runs"))
  assert len(dirs) == 2
  lrs = sorted(json.loads((tmp_path / "runs" / d / "config.json").read_text())["lr"] for d in dirs)
  assert lrs == [1e-3, 3e-3]
  for d in dirs:
    assert committed_steps(str(tmp_path / "runs" / d / "checkpoints")) == [1, 2]
    assert not [n for n in os.listdir(tmp_path / "runs" / d / "checkpoints") if "tmp" in n]
