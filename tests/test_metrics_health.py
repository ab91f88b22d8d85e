"""What a run reports: the logged loss is the mean since the last log step, tokens seen and epochs,
divergence warnings (and --stop-on-divergence), one-line errors, and train.plot's figure."""

import json
import logging
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train_utils import (
  TOKENIZER_VOCAB,
  cli_args,
  committed_steps,
  one_device,
  random_batch,
  small_config,
)
from train import plot, trainer
from train import sharding as shd
from train.data import pipeline
from train.run import health

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args, cwd=None):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run([sys.executable, "-m", "train", *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=300, check=False)


def _lines(text):
  return [line for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- loss mean


def test_loss_mean_since_the_last_log_step_is_accumulated_in_the_step():
  """--log-every 3: the step's loss_mean at steps 3 and 6 is the float64 mean of the per-step
  losses of steps 1-3 and 4-6 (the accumulators reset after each log step), with no host read in
  between; a non-finite loss is left out of the mean."""
  setup = trainer.build(small_config(optimizer="adamw", log_every=3, steps=6), TOKENIZER_VOCAB,
                        devices=one_device())
  sharding = shd.batch_sharding(setup.mesh)
  state = setup.init_state()
  losses, means = [], {}
  for i in range(1, 7):
    batch = {k: jax.device_put(v, sharding)
             for k, v in random_batch(i, 8, 32, TOKENIZER_VOCAB).items()}
    state, m = setup.train_step(state, batch)
    losses.append(float(m["loss"]))
    means[i] = float(m["loss_mean"])
  np.testing.assert_allclose(means[3], np.mean(np.float64(losses[:3])), rtol=1e-6)
  np.testing.assert_allclose(means[6], np.mean(np.float64(losses[3:])), rtol=1e-6)
  np.testing.assert_allclose(means[1], losses[0], rtol=1e-6)  # mid-window: the running mean
  np.testing.assert_allclose(means[5], np.mean(np.float64(losses[3:5])), rtol=1e-6)
  assert float(state.loss_sum) == 0.0 and int(state.loss_count) == 0  # reset at step 6


def test_records_hold_tokens_seen_and_epochs_and_warn_about_repeated_data(tmp_path, caplog,
                                                                          train_tokenizer):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"{i}.txt").write_text(f"document {i}: " + "the quick brown fox " * 40)
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=12, log_every=6,
                     data=f"text:{corpus}", eval_batches=1, batch_size=8, seq_len=16)
  # the windows of one epoch of the train split, counted independently of the trainer
  ds = pipeline.make_dataset(cfg.data, train_tokenizer, seq_len=16, batch_size=1, split="train",
                             num_epochs=1, shuffle=False)
  windows = sum(1 for _ in ds)
  with caplog.at_level(logging.WARNING, logger="train"):
    result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  records = [r for r in result.history if "loss" in r]
  assert [r["step"] for r in records] == [6, 12]
  for r in records:
    assert r["tokens_seen"] == r["step"] * 8 * 16
    assert r["epochs"] == pytest.approx(r["step"] * 8 / windows)
  assert windows < 12 * 8  # the 12 steps of 8 sequences read more than one epoch ...
  (warning,) = [m for m in caplog.messages if "epochs of the training data" in m]
  assert f"{12 * 8 / windows:.2f} epochs" in warning and f"({windows} windows" in warning
  assert records[-1]["epochs"] > 1  # ... and the records say so


# ----------------------------------------------------------------------------- divergence


def test_divergence_monitor_names_each_problem_once_with_its_knob():
  mon = health.DivergenceMonitor(lr=0.1, warmup_steps=10, rank=16, projector_lr_ratio=5.0,
                                 osd=True, patience=3)
  assert mon.check(10, {"loss": 8.0, "grad_norm": 1.0, "orthogonality_error": 0.1}) == []
  assert mon.check(20, {"loss": 7.0, "grad_norm": 1.0, "orthogonality_error": 3.9}) == []
  assert mon.check(30, {"loss": 8.5, "grad_norm": 1.0}) == []
  assert mon.check(40, {"loss": 9.0, "grad_norm": 1.0}) == []
  found = mon.check(50, {"loss": 12.0, "grad_norm": 1.0, "orthogonality_error": 4.1})
  assert [k for k, _ in found] == ["loss", "projector"]  # 3 log steps >= 8.0; 4.1 > sqrt(16)
  assert "--lr (now 0.1)" in found[0][1] and "alpha*lr = 0.5" in found[0][1]
  assert "--orthogonality-weight" in found[1][1]
  assert mon.check(60, {"loss": 12.0, "grad_norm": 1.0, "orthogonality_error": 9.0}) == []
  found = mon.check(70, {"loss": math.log(4096), "grad_norm": 0.0})
  assert [k for k, _ in found] == ["collapse"]
  # before warmup ends the loss may rise; a padding-only batch (loss 0, gradient 0) is no collapse
  mon = health.DivergenceMonitor(lr=1e-3, warmup_steps=100, patience=1)
  assert mon.check(10, {"loss": 8.0, "grad_norm": 1.0}) == []
  assert mon.check(20, {"loss": 9.0, "grad_norm": 1.0}) == []
  assert mon.check(30, {"loss": 0.0, "grad_norm": 0.0}) == []
  # adamw: no projector check, and no OSD knob in the message
  mon = health.DivergenceMonitor(lr=1e-3, warmup_steps=0, patience=1)
  mon.check(1, {"loss": 5.0, "orthogonality_error": 100.0})
  (kind, message), = mon.check(2, {"loss": 6.0, "orthogonality_error": 100.0})
  assert kind == "loss" and "projector-lr-ratio" not in message


def test_a_diverging_osd_run_warns_and_stop_on_divergence_stops_it(tmp_path, train_tokenizer,
                                                                   caplog):
  """lr 10 with OSD's alpha = 5: the projectors leave orthonormality within a few steps."""
  cfg = small_config(tmp_path / "run", optimizer="osd_adamw", lr=10.0, steps=8, log_every=1,
                     warmup_steps=0)
  with caplog.at_level(logging.WARNING, logger="train"):
    result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  warned = [m for m in caplog.messages if "warning: projector orthogonality error" in m]
  assert len(warned) == 1, caplog.messages  # once, although every later step is as bad
  assert "--projector-lr-ratio" in warned[0]
  orth = [r["orthogonality_error"] for r in result.history if r.get("orthogonality_error")]
  assert max(orth) > math.sqrt(cfg.rank)  # the warning is about a real value
  with pytest.raises(FloatingPointError, match=r"--stop-on-divergence") as e:
    trainer.train(cfg.replace(run_dir=str(tmp_path / "stop"), stop_on_divergence=True),
                  tokenizer=train_tokenizer, devices=one_device())
  stopped = int(str(e.value).split("step ")[1].split(":")[0])
  assert committed_steps(str(tmp_path / "stop" / "checkpoints")) == [stopped]
  assert stopped < cfg.steps


# ----------------------------------------------------------------------------- one-line errors


@pytest.mark.slow
def test_missing_dataset_and_huge_seq_len_are_one_line_and_leave_no_run_dir(tmp_path,
                                                                          train_tokenizer):
  tfds_dir = tmp_path / "tfds"
  tfds_dir.mkdir()
  cases = (
      (["--data", "tfds:c4x/en:3.1.0", "--tfds-data-dir", str(tfds_dir)],
       "could not open tfds dataset 'c4x/en:3.1.0'"),
      (["--seq-len", "100000", "--batch-size", "64"],
       "--seq-len 100000 with --batch-size 64 needs at least"),
  )
  for extra, message in cases:
    run_dir = tmp_path / "new" / "run"
    out = _run_cli(*cli_args(train_tokenizer.model_path, run_dir), *extra)
    assert out.returncode == 2, out.stderr
    assert len(_lines(out.stderr)) == 1 and out.stderr.startswith("error: "), out.stderr
    assert message in out.stderr
    assert not (tmp_path / "new").exists()  # neither the run dir nor its new parent
  # the default run dir (runs/...) under the working directory is not left behind either
  args = cli_args(train_tokenizer.model_path, "X", "--seq-len", "100000")
  i = args.index("--run-dir")
  out = _run_cli(*args[:i], *args[i + 2:], cwd=tmp_path)
  assert out.returncode == 2 and len(_lines(out.stderr)) == 1, out.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_from_the_command_line(tmp_path, train_tokenizer):
  run_dir = tmp_path / "run"
  args = cli_args(train_tokenizer.model_path, run_dir, "--optimizer", "adamw", "--mesh",
                  "data=-1", "--eval-every", "0")
  cfg_args = ["--steps", "1"]
  from train.__main__ import parse_config

  trainer.train(parse_config(args + cfg_args), devices=one_device())
  for d, _, names in os.walk(run_dir / "checkpoints" / "1" / "state"):
    if os.path.basename(d) == "d":
      for name in names:
        path = os.path.join(d, name)
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  out = _run_cli(*args, "--steps", "3", "--resume")
  assert out.returncode == 2
  assert len(_lines(out.stderr)) == 1, out.stderr
  assert out.stderr.startswith(f"error: checkpoint {run_dir}/checkpoints/1 is unreadable")


# ----------------------------------------------------------------------------- plot


def _fake_run(directory, records, **cfg):
  from train.config import TrainConfig

  directory.mkdir()
  (directory / "config.json").write_text(TrainConfig(**cfg).to_json())
  (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return str(directory)


def test_plot_labels_runs_by_what_differs_and_writes_what_it_says(tmp_path, capsys):
  records = [{"step": s, "loss": 6 - s / 10, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 6)]
  records.append({"step": 5, "eval_loss": 5.5, "eval_perplexity": 244.7})
  a = _fake_run(tmp_path / "a", records, optimizer="osd_adamw", rank=8, lr=1e-3, run_dir="x")
  b = _fake_run(tmp_path / "b", records, optimizer="osd_adamw", rank=8, lr=3e-3, run_dir="y")
  c = _fake_run(tmp_path / "c", records, optimizer="adamw", rank=8, lr=3e-3, run_dir="z")
  assert plot.labels_for([a, b, c]) == ["osd_adamw (r=8) lr=0.001", "osd_adamw (r=8) lr=0.003",
                                        "adamw lr=0.003"]
  same = _fake_run(tmp_path / "same", records, optimizer="osd_adamw", rank=8, lr=1e-3)
  assert plot.labels_for([a, same]) == ["osd_adamw (r=8) [a]", "osd_adamw (r=8) [same]"]
  assert plot.main([a, b, c, "--out", str(tmp_path / "p5")]) == 0
  assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p5.png'}"
  assert (tmp_path / "p5.png").stat().st_size > 1000 and not (tmp_path / "p5").exists()
  assert plot.main([a, "--out", str(tmp_path / "fig.svg")]) == 0
  assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
  # the smoothed loss: a bias-corrected EMA (the first value is the first point)
  np.testing.assert_allclose(plot.ema([1.0, 0.0], 0.5), [1.0, 0.5 * 0.5 / 0.75])


def test_plot_labels_only_what_changes_the_result_and_keeps_the_legend_off_the_curves(tmp_path):
  """`train.plot runs/*` over runs that also differ in how they were watched and stored
  (--eval-every, --log-every, --tokenizer path, --progress, --ckpt-every, directories): only the
  result-changing flags label them, each differing --model-override on its own; one legend for
  the four panels sits below them, overlapping none, and matplotlib warns of nothing."""
  import warnings

  import matplotlib.pyplot as plt

  records = [{"step": s, "loss": 6 - s / 10, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 6)]
  records.append({"step": 5, "eval_loss": 5.5, "eval_perplexity": 244.7})
  watched = [dict(eval_every=100, log_every=10, tokenizer="/a/tok.model", progress=True,
                  ckpt_every=500, run_dir="/runs/a", cache_dir="/c1", remat="none"),
             dict(eval_every=50, log_every=1, tokenizer="/b/other/tok.model", progress=False,
                  ckpt_every=0, run_dir="/runs/b", cache_dir="/c2", remat="full")]
  runs = [_fake_run(tmp_path / f"run{i}", records, optimizer="osd_adamw", rank=8, **watched[i % 2],
                    lr=lr, seed=seed, model_overrides={"n_layers": layers, "dim": 64})
          for i, (lr, seed, layers) in enumerate([(1e-3, 0, 2), (3e-3, 0, 4), (1e-3, 1, 4)])]
  assert plot.labels_for(runs) == ["osd_adamw (r=8) lr=0.001 seed=0 n_layers=2",
                                   "osd_adamw (r=8) lr=0.003 seed=0 n_layers=4",
                                   "osd_adamw (r=8) lr=0.001 seed=1 n_layers=4"]
  for key in ("eval_every", "log_every", "tokenizer", "progress", "ckpt_every", "run_dir",
              "remat", "grad_accum", "tensorboard"):
    assert key not in plot.RESULT_KEYS, key
  for key in ("preset", "model_overrides", "lr", "rank", "projector_lr_ratio", "steps",
              "batch_size", "seq_len", "seed", "data", "vocab_size"):
    assert key in plot.RESULT_KEYS, key
  # a long value (a path) keeps its end
  far = _fake_run(tmp_path / "far", records, optimizer="adamw", data="text:/a/very/long/path/"
                  "to/the/corpus/of/this/run/*.txt")
  near = _fake_run(tmp_path / "near", records, optimizer="adamw", data="embedded")
  assert plot.labels_for([far, near]) == ["adamw data=…to/the/corpus/of/this/run/*.txt",
                                          "adamw data=embedded"]

  many = runs + [far, near] + [_fake_run(tmp_path / f"x{i}", records, optimizer="lion", lr=i / 7)
                               for i in range(1, 4)]
  for run_dirs in (runs, many):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out = plot.plot(run_dirs, str(tmp_path / "curves.png"))
      fig = plot.figure(run_dirs)
      fig.canvas.draw()
    assert not caught, [str(w.message) for w in caught]
    assert os.path.getsize(out) > 1000
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == plot.labels_for(run_dirs)
    box = legend.get_window_extent()
    assert box.y0 >= fig.bbox.y0 and box.x0 >= fig.bbox.x0 and box.x1 <= fig.bbox.x1
    for ax in fig.axes:
      assert ax.get_legend() is None
      assert not box.overlaps(ax.get_tightbbox()), ax.get_title()
    plt.close(fig)


def test_stderr_filter_drops_interleaved_closed_loop_tracebacks_only():
  import io

  from train.__main__ import _DropClosedLoopTracebacks

  noise = ['Traceback (most recent call last):',
           '  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in call_soon_threadsafe',
           '    self._check_closed()',
           '  File "/usr/lib/python3.11/asyncio/base_events.py", line 519, in _check_closed',
           "    raise RuntimeError('Event loop is closed')",
           'RuntimeError: Event loop is closed']
  interleaved = [line for pair in zip(noise, noise) for line in pair]  # two threads at once
  real = ['Traceback (most recent call last):', '  File "/src/train/x.py", line 3, in f',
          'ValueError: boom']
  out = io.StringIO()
  stream = _DropClosedLoopTracebacks(out)
  for chunk in ("\n".join(interleaved) + "\nerror: one line\n", "\n".join(real) + "\n", "tail"):
    stream.write(chunk)
  stream.flush()
  assert out.getvalue() == "error: one line\n" + "\n".join(real) + "\ntail"


def test_energy_metric_default_by_preset():
  """--energy-metric auto logs the captured energy below 1b only (it keeps the gradients alive
  until after the update: +20 GiB on the 7B step estimate, benchmarks/RESULTS.md §7)."""
  from train.config import TrainConfig

  assert TrainConfig(preset="tiny").resolved_energy_metric
  assert TrainConfig(preset="350m").resolved_energy_metric
  assert not TrainConfig(preset="1b").resolved_energy_metric
  assert not TrainConfig(preset="7b").resolved_energy_metric
  assert TrainConfig(preset="7b", energy_metric="on").resolved_energy_metric
  assert not TrainConfig(preset="tiny", energy_metric="off").resolved_energy_metric
