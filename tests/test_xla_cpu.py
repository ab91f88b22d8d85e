"""The XLA:CPU scheduler workaround (train/xla_cpu.py): when it sets XLA_FLAGS, when it leaves
them alone, and the train step it exists for — scanned layers, osd_adamw, projector metrics at
every step — finishing in a fresh process with one CPU device (it hung forever without it)."""

import os
import subprocess
import sys

from train import xla_cpu

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flag_is_appended_before_any_backend(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_backends_initialized", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert xla_cpu.apply()
  assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {xla_cpu.FLAG}"
  monkeypatch.delenv("XLA_FLAGS")
  assert xla_cpu.apply() and os.environ["XLA_FLAGS"] == xla_cpu.FLAG


def test_users_setting_wins_and_a_started_backend_is_left_alone(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_backends_initialized", lambda: False)
  mine = f"{xla_cpu.OPTION}=true"
  monkeypatch.setenv("XLA_FLAGS", mine)
  assert xla_cpu.apply() and os.environ["XLA_FLAGS"] == mine
  monkeypatch.setattr(xla_cpu, "_backends_initialized", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not xla_cpu.apply() and os.environ["XLA_FLAGS"] == ""


def test_warning_names_the_fix_only_on_cpu_without_the_flag(monkeypatch, caplog):
  import train

  monkeypatch.setattr(train, "XLA_CPU_WORKAROUND", False)
  monkeypatch.setattr(xla_cpu, "_warned", False)
  xla_cpu.warn_if_missing("gpu")
  assert not caplog.records
  xla_cpu.warn_if_missing("cpu")
  assert len(caplog.records) == 1 and xla_cpu.FLAG in caplog.records[0].getMessage()
  xla_cpu.warn_if_missing("cpu")  # a second trainer build in the same process: no repeat
  assert len(caplog.records) == 1


def test_scanned_osd_step_with_projector_metrics_finishes(tmp_path):
  """The regression: before the workaround this run never printed its second eval."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, no flag given
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  args = ["--preset", "tiny", "--optimizer", "osd_adamw", "--steps", "3", "--batch-size", "8",
          "--seq-len", "32", "--rank", "32", "--dtype", "float32", "--eval-every", "0",
          "--eval-batches", "1", "--log-every", "1", "--no-progress", "--scan-layers",
          "--no-tensorboard", "--run-dir", str(tmp_path / "run")]
  out = subprocess.run([sys.executable, "-m", "train", *args], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "done: 3 steps" in out.stdout + out.stderr
