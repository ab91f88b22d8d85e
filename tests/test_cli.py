"""``python -m train``: --help documents every flag; bad input is one clear error line, exit 2."""

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys

import pytest

from tests.train_utils import cli_args
from train.__main__ import build_parser, main, parse_config
from train.config import TrainConfig

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                      "JAX_PROCESS_ID", "TPU_WORKER_")


def _run(*args, devices=8):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run([sys.executable, "-m", "train", *args], env=env, capture_output=True,
                        text=True, timeout=300)


def test_help_documents_every_flag():
  out = _run("--help")
  assert out.returncode == 0, out.stderr
  for f in dataclasses.fields(TrainConfig):
    flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
    assert flag in out.stdout, flag
  assert "examples:" in out.stdout
  from train.data import tokenizer as tok_lib

  vocab_help = {f.name: f for f in dataclasses.fields(TrainConfig)}["vocab_size"].metadata["help"]
  assert f"default: {tok_lib.DEFAULT_VOCAB_SIZE}," in vocab_help  # what load_tokenizer uses


def test_flags_map_onto_the_config(tmp_path):
  cfg = parse_config(["--preset", "60m", "--optimizer", "galore_adamw", "--rank", "64",
                      "--no-tensorboard", "--model-override", "n_layers=2",
                      "--model-override", "dtype=float32", "--warmup-steps", "5"])
  assert (cfg.preset, cfg.optimizer, cfg.rank, cfg.tensorboard) == ("60m", "galore_adamw", 64,
                                                                     False)
  assert cfg.model_overrides == {"n_layers": 2, "dtype": "float32"} and cfg.warmup_steps == 5
  saved = tmp_path / "config.json"
  saved.write_text(cfg.to_json())
  again = parse_config(["--config", str(saved), "--rank", "32"])
  assert again == cfg.replace(rank=32)
  assert build_parser().parse_args([]).optimizer == "osd_adamw"


def _small_args(tokenizer_path, run_dir):
  return cli_args(tokenizer_path, run_dir, "--steps", "2")


def test_optimizer_flags_are_flat_on_the_command_line_and_nested_in_code():
  """cfg.optim groups every "optimizer" flag (the projector's under .projector) and resolves
  the defaults each optimizer family takes; only the skip policy stays with the training loop."""
  from train.config import OptimizerConfig, ProjectorConfig

  flags = {f.name for f in dataclasses.fields(TrainConfig)
           if f.metadata.get("group") == "optimizer"}
  nested = {f.name for f in dataclasses.fields(OptimizerConfig)} - {"name", "projector"}
  projector = {f"projector_{f.name}" for f in dataclasses.fields(ProjectorConfig)}
  projector = projector - {"projector_orthogonality_weight"} | {"orthogonality_weight"}
  assert flags - nested - projector == {"optimizer", "loss_spike_factor", "max_consecutive_skips",
                                       "stop_on_divergence"}
  cfg = parse_config(["--optimizer", "osd_lion", "--projector-optimizer", "adafactor",
                      "--projector-lr-ratio", "2", "--lr", "3e-4", "--steps", "50"])
  opt = cfg.optim
  assert (opt.name, opt.lr, opt.b1, opt.b2, opt.eps, opt.warmup_steps) == (
      "osd_lion", 3e-4, 0.9, 0.99, 1e-8, 5)
  assert (opt.projector.optimizer, opt.projector.lr_ratio) == ("adafactor", 2.0)
  assert parse_config(["--optimizer", "adamw"]).optim.b2 == 0.999
  assert parse_config(["--reference-code"]).optim.eps is None  # the official code's
  assert opt.rank == cfg.resolved_rank and dataclasses.is_dataclass(opt)
  with pytest.raises(dataclasses.FrozenInstanceError):
    opt.lr = 1.0


@pytest.mark.parametrize("extra, message", [
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--mesh", "data=3"], "--mesh 'data=3' needs 3 devices but 8 are available"),
    (["--mesh", "fsdp=3,data=-1"], "do not divide"),
    (["--rank", "1000"], "--rank 1000 projects no matrix"),
    (["--data", "text:/nonexistent/dir/*.txt"], "no files match"),
    (["--data", "nonsense"], "bad --data 'nonsense'"),
    (["--tfds-data-dir", "/nonexistent/tfds"], "--tfds-data-dir is not a directory"),
    (["--batch-size", "12"], "--batch-size 12 must be divisible"),
    (["--resume"], "--resume: no checkpoints"),
    (["--model-override", "vocab_size=100"], "smaller than the tokenizer's vocabulary"),
    (["--model-override", "heads=3"], "unknown LlamaConfig field"),
    (["--lr", "-1"], "--lr must be positive"),
])
def test_bad_input_is_one_error_line(extra, message, tmp_path, capsys, train_tokenizer):
  rc = main(_small_args(train_tokenizer.model_path, tmp_path / "run") + extra)
  err = capsys.readouterr().err
  assert rc == 2
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith("error: ") and message in lines[-1], err
  assert "Traceback" not in err


def test_bad_default_tokenizer_flags_are_one_error_line(tmp_path, capsys):
  """The default tokenizer (trained on the embedded corpus): a --vocab-size below what the corpus
  needs (its characters, besides the special and byte pieces) and a --cache-dir that cannot be
  created are one error line naming the flag, before anything is compiled."""
  not_a_dir = tmp_path / "a-file"
  not_a_dir.write_text("")
  for extra, message in (
      (["--vocab-size", "300", "--cache-dir", str(tmp_path / "cache")],
       r"--vocab-size 300.*too small for this corpus: it needs at least \d+ pieces"),
      (["--cache-dir", str(not_a_dir)], f"--cache-dir {not_a_dir}: cannot write")):
    rc = main(["--run-dir", str(tmp_path / "run"), "--no-progress", "--no-tensorboard", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), err
  assert not (tmp_path / "run").exists()


def test_missing_tokenizer_file(capsys):
  rc = main(["--tokenizer", "/nonexistent/t5.model"])
  assert rc == 2
  assert capsys.readouterr().err.strip() == ("error: --tokenizer file not found: "
                                             "/nonexistent/t5.model")


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--steps", "many"], "invalid int value: 'many'"),
    (["--vocab-size", "100"], "--vocab-size must be at least 261"),
    (["--vocab-size", "0"], "--vocab-size must be at least 261"),
    (["--num-processes", "2", "--process-id", "0"], "need --coordinator-address"),
    (["--num-processes", "2", "--process-id", "5", "--coordinator-address", "127.0.0.1:1234"],
     "--process-id must be in [0, --num-processes=2), got 5"),
    (["--coordinator-address", "localhost"], "--coordinator-address must be HOST:PORT"),
    # no launcher in the environment: jax.distributed.initialize has no coordinator
    (["--distributed"], "jax.distributed.initialize failed"),
    # negative numbers in any float notation reach the flag's own check (not argparse's
    # "expected one argument")
    (["--lr", "-1e-3"], "error: --lr must be positive, got -0.001\n"),
    (["--lr=-1e-3"], "error: --lr must be positive, got -0.001\n"),
    (["--weight-decay", "-1E-2"], "error: --weight-decay must be >= 0, got -0.01\n"),
])
def test_subprocess_bad_input_prints_exactly_one_line(args, message):
  out = _run(*args)
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
  assert message in out.stderr


def test_negative_numbers_are_values_not_flags():
  cfg = parse_config(["--lr", "-1e-3", "--min-lr-ratio", "-.5", "--eps", "-2", "--b1", "-1.5e+1"])
  assert (cfg.lr, cfg.min_lr_ratio, cfg.eps, cfg.b1) == (-1e-3, -0.5, -2.0, -15.0)
  with pytest.raises(SystemExit):  # a flag is still a flag
    parse_config(["--lr", "-x"])


def test_tiny_run_from_the_command_line(tmp_path, train_tokenizer):
  out = _run(*_small_args(train_tokenizer.model_path, tmp_path / "run"), "--eval-batches", "1",
             devices=1)
  assert out.returncode == 0, out.stderr
  assert "done: 2 steps in " in out.stdout and "eval perplexity" in out.stdout
  assert "Traceback" not in out.stderr
  assert "note: on CPU" not in out.stdout + out.stderr  # seconds, not worth a length estimate


def test_a_long_cpu_run_says_how_long_and_how_to_shorten_it(tmp_path, train_tokenizer, caplog,
                                                              monkeypatch):
  """On CPU, a run whose steps left take longer than trainer.LONG_CPU_RUN_S (10 min; 0 here, so
  that a short run shows the line) says so once, after its first timed steps."""
  from tests.train_utils import one_device, small_config
  from train import trainer

  monkeypatch.setattr(trainer, "LONG_CPU_RUN_S", 0.0)
  with caplog.at_level(logging.INFO, logger="train"):
    trainer.train(small_config(tmp_path / "run", steps=8, log_every=4), devices=one_device(),
                  tokenizer=train_tokenizer)
  notes = [r.getMessage() for r in caplog.records if "on CPU" in r.getMessage()]
  assert len(notes) == 1, caplog.text
  assert re.fullmatch(r"note: on CPU at [\d.e-]+ s/step, the 4 steps left take about 1 min; for "
                      r"a run of minutes use fewer or smaller steps, e\.g\. the CPU demo's "
                      + re.escape(trainer.CPU_DEMO_FLAGS) + r" \(make demo, about 3 min\)",
                      notes[0]), notes[0]
  demo, flags = _makefile_demo_command(), trainer.CPU_DEMO_FLAGS.split()
  for flag, value in zip(flags[::2], flags[1::2]):  # the flags are the demo's
    assert f" {flag} {value} " in demo, (flag, demo)


def _makefile_demo_command() -> str:
  with open(os.path.join(_REPO, "Makefile"), encoding="utf-8") as f:
    recipe = re.search(r"^demo: install\n((?:\t.*\n)+)", f.read(), re.M).group(1)
  return " ".join(recipe.replace("\\\n", " ").split())


def test_sigint_prints_one_stop_line(tmp_path, train_tokenizer, capsys, caplog, monkeypatch):
  """Ctrl-C (SIGINT, sent here by the run itself at its third batch) stops after that step with
  one line, the command line's: the trainer's own stop message is left to library callers."""
  import functools

  from tests.train_utils import one_device
  from train import trainer

  def on_batch(split, step, batch):
    if split == "train" and step == 3:
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(trainer, "train", functools.partial(trainer.train, devices=one_device()))
  with caplog.at_level(logging.INFO, logger="train"):
    rc = main(cli_args(train_tokenizer.model_path, tmp_path / "run", "--steps", "50",
                       "--eval-every", "0"), hooks=trainer.TrainHooks(on_batch=on_batch))
  captured = capsys.readouterr()
  assert rc == 130
  everything = captured.out + captured.err + caplog.text
  stops = [line for line in everything.splitlines() if "stopped" in line]
  config = tmp_path / "run" / "config.json"
  assert stops == [f"stopped at step 3 by SIGINT; checkpoint in {tmp_path / 'run'}; continue "
                   f"with: python -m train --config {config} --resume"], everything


def test_without_the_packages_the_command_line_says_which_python_to_use(tmp_path):
  """A Python without jax (the system one, outside .venv): one line naming the package and the
  environment to use, for python -m train, train.eval and train.export."""
  for module, args in (("train", ["--steps", "1"]), ("train.eval", [str(tmp_path)]),
                       ("train.export", [str(tmp_path), str(tmp_path / "out")])):
    code = ("import runpy, sys; sys.modules['jax'] = None; "  # as if jax were not installed
            f"sys.argv = [{module!r}, *{args!r}]; runpy.run_module({module!r}, "
            "run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=_REPO)
    assert out.returncode == 2, out.stderr
    assert out.stderr == (
        f"error: python -m {module} needs the package 'jax', which {sys.executable} does not "
        f"have; run it with the project's environment: .venv/bin/python -m {module} ... (or "
        f"`source .venv/bin/activate` first; `make install` creates .venv)\n"), out.stderr


def test_plot_compares_runs(tmp_path):
  from train import plot

  for name, opt in (("a", "adamw"), ("b", "osd_adamw")):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(TrainConfig(optimizer=opt, rank=8).to_json())
    lines = [f'{{"step": {s}, "loss": {6 - s / 10}}}' for s in range(1, 6)]
    lines += ['{"step": 0, "eval_loss": 6.0, "eval_perplexity": 403.4}',
              '{"step": 5, "eval_loss": 5.5, "eval_perplexity": 244.7}', '{"step": 6, "lo']
    (run / "metrics.jsonl").write_text("\n".join(lines))  # last line torn, as after a crash
  out = tmp_path / "curves.png"
  assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
  assert out.stat().st_size > 1000
  assert plot.load_run(str(tmp_path / "b"))[0] == "osd_adamw (r=8)"
  assert plot.main([str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_bad_corpus_is_one_error_line(tmp_path, capsys, train_tokenizer):
  """An empty corpus and a corpus with fewer tokens than one window (seq_len + 1) stop before
  anything is compiled, with one error line and exit status 2."""
  empty, short = tmp_path / "empty", tmp_path / "short"
  empty.mkdir()
  short.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text("  \n\n")
  (short / "a.txt").write_text("tiny")
  for data, message in ((f"text:{empty}", "empty corpus (2 files, all empty)"),
                        (f"text:{short}/*.txt", "fewer than seq_len + 1 = 17")):
    rc = main(_small_args(train_tokenizer.model_path, tmp_path / "run") + ["--data", data])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --data text:") and message in lines[0], err


def test_non_utf8_text_is_decoded_with_replacement_and_trains(tmp_path, train_tokenizer):
  """Files that are not valid UTF-8 are decoded with U+FFFD replacement characters, counted in
  one warning, and the run trains to the end."""
  from tests.train_utils import one_device, small_config
  from train import trainer
  from train.data import corpus

  for i, doc in enumerate(corpus.embedded_documents()[:40]):
    (tmp_path / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 200)
  (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 20)
  cfg = small_config(tmp_path / "run", optimizer="adamw", steps=2, data=f"text:{tmp_path}/*.txt")
  with pytest.warns(UserWarning, match="2 of 42 files were not valid UTF-8"):
    result = trainer.train(cfg, tokenizer=train_tokenizer, devices=one_device())
  assert int(result.state.step) == 2 and int(result.state.skipped) == 0


def test_model_vocab_larger_than_the_tokenizer_is_allowed(train_tokenizer):
  """--model-override vocab_size above the tokenizer's vocabulary gives embedding/output rows
  that no token uses (allowed); below it is an error (test_bad_input_is_one_error_line)."""
  from tests.train_utils import small_config
  from train import trainer

  cfg = small_config(model_overrides={"vocab_size": 640, "n_layers": 1})
  assert trainer.model_config(cfg, train_tokenizer.vocab_size).vocab_size == 640
  assert trainer.model_config(small_config(), train_tokenizer.vocab_size).vocab_size == 512
