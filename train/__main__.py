"""Command line: ``python -m train [flags]`` pretrains a LLaMA; ``--help`` lists every flag.

Exit status: 0 when the run ends or is stopped by SIGTERM (a preemption notice); 2 for bad input
(one ``error: ...`` line on stderr, also a run directory in use by another run); 3 after too many
non-finite steps in a row; 130 when stopped by SIGINT (Ctrl-C). SIGTERM and SIGINT both stop after
the current step, save a checkpoint and print the command that continues the run; a second Ctrl-C
stops at once without saving (exit 130).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import os
import re
import sys
from typing import Any

from train.config import TrainConfig
from train.run import rundir

_GROUPS = (
    ("model", "model"),
    ("optimizer", "optimizer and schedule"),
    ("training", "training"),
    ("data", "data"),
    ("logging", "evaluation and logging"),
    ("checkpoint", "checkpoints"),
    ("parallelism", "parallelism and multi-host"),
)

EXAMPLES = """\
examples:
  python -m train --preset tiny --optimizer osd_adamw --steps 300 --batch-size 16 \\
      --seq-len 128 --lr 3e-3 --projector-lr-ratio 2 --dtype float32      # CPU demo (rank 32)
  python -m train --preset 60m --optimizer osd_adamw --rank 128 --lr 1e-3 --batch-size 512 \\
      --data tfds:c4/en:3.1.0 --tfds-data-dir gs://BUCKET/tfds --tokenizer t5.model
  python -m train --config runs/my-run/config.json --resume                # continue a run
  python -m train --config runs/my-run/config.json --lr 3e-3   # repeat it (new run dir), new lr
  python -m train ... --run-dir runs/my-run --auto-resume                  # start, or continue
"""


EXIT_INTERRUPTED = 130  # stopped by SIGINT (Ctrl-C): 128 + the signal number, as shells report it


#: What argparse takes for a negative number rather than a flag: also exponents, so that
#: ``--lr -1e-3`` reaches the flag's own check (argparse's own pattern takes ``-1`` and ``-.5``
#: only, and ``-1e-3`` would be "expected one argument").
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (no usage dump) and that reads negative numbers
  in any float notation as values."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._negative_number_matcher = NEGATIVE_NUMBER

  def error(self, message: str):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def missing_module_error(module: str, e: ModuleNotFoundError) -> str:
  """The one error line for ``python -m MODULE`` run by a Python without the project's
  dependencies (typically the system one, not the virtual environment); ``e`` itself is raised
  again when the missing module is one of this project's (a bug, not a set-up problem)."""
  if (e.name or "").partition(".")[0] in ("train", "osd_jax"):
    raise e
  return (f"error: python -m {module} needs the package {e.name!r}, which {sys.executable} does "
          f"not have; run it with the project's environment: .venv/bin/python -m {module} ... "
          f"(or `source .venv/bin/activate` first; `make install` creates .venv)")


def _base_type(annotation: str) -> type:
  for name, typ in (("bool", bool), ("int", int), ("float", float), ("dict", dict)):
    if name in str(annotation).replace("None", ""):
      return typ
  return str


def _parse_override(text: str) -> tuple[str, Any]:
  key, eq, value = text.partition("=")
  if not eq or not key.strip():
    raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  return key.strip(), parsed


def build_parser() -> argparse.ArgumentParser:
  """The parser, generated from :class:`train.config.TrainConfig` (one flag per field)."""
  parser = _Parser(
      prog="python -m train",
      description="Pretrain a LLaMA-style model with Online Subspace Descent (osd_jax) or a "
                  "baseline optimizer, on CPU, GPU or TPU, from one process to a multi-host pod.",
      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", metavar="JSON", default=None,
                      help="Read defaults from a JSON file (e.g. RUN_DIR/config.json); flags given "
                           "on the command line win.")
  groups = {key: parser.add_argument_group(title) for key, title in _GROUPS}
  for f in dataclasses.fields(TrainConfig):
    meta = f.metadata
    group = groups[meta.get("group", "training")]
    flag = "--" + meta.get("flag", f.name.replace("_", "-"))
    typ = _base_type(f.type)
    default = f.default if f.default is not dataclasses.MISSING else None
    if typ is bool:
      group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                         default=default, help=meta["help"])
    elif typ is dict:
      group.add_argument(flag, dest=f.name, action="append", type=_parse_override,
                         metavar="KEY=VALUE", default=None, help=meta["help"])
    else:
      kwargs = {"choices": meta["choices"]} if "choices" in meta else {}
      shown = "" if default is None else f" (default: {default})"
      group.add_argument(flag, dest=f.name, type=typ, default=default,
                         metavar=f.name.upper() if "choices" not in meta else None,
                         help=meta["help"] + shown, **kwargs)
  return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
  """Parses command-line flags into a TrainConfig (exits with one error line on bad flags)."""
  parser = build_parser()
  args = parser.parse_args(argv)
  values = {}
  if args.config:
    try:
      with open(args.config, encoding="utf-8") as fh:
        values = json.load(fh)
      TrainConfig.from_dict(values)
    except (OSError, ValueError, TypeError) as e:
      parser.error(f"--config {args.config}: {e}")
    explicit_run_dir = args.run_dir
    # the file's values become defaults, so flags given explicitly override them
    parser.set_defaults(**{k: v for k, v in values.items() if k != "model_overrides"})
    args = parser.parse_args(argv)
    own_dir = rundir.run_dir_of_config(args.config, values)
    if own_dir is not None and explicit_run_dir is None:
      # a run's config.json: continuing (--resume/--auto-resume) uses the directory the file is
      # in now (a copy continues in the copy); otherwise the run is repeated in a new run dir
      args.run_dir = own_dir if (args.resume or args.auto_resume) else None
  out = {}
  for f in dataclasses.fields(TrainConfig):
    value = getattr(args, f.name)
    if f.name == "model_overrides":
      value = dict(values.get("model_overrides", {}), **dict(value or []))
    out[f.name] = value
  return TrainConfig(**out)


class _DropClosedLoopTracebacks:
  """A stderr wrapper that drops the lines of tracebacks ending in ``RuntimeError: Event loop is
  closed`` (orbax/tensorstore teardown noise after a failed read, printed by several threads at
  once, so their lines interleave) and passes everything else through. A ``Traceback`` header is
  held until the next line shows whether it starts such a traceback."""

  _NOISE = ("    self._check_closed()", "    raise RuntimeError('Event loop is closed')",
            "RuntimeError: Event loop is closed")
  _HEADER = "Traceback (most recent call last):"

  def __init__(self, stream):
    self._stream, self._headers, self._partial = stream, 0, ""

  @classmethod
  def _is_noise(cls, line: str) -> bool:
    return line in cls._NOISE or (line.startswith('  File "') and "asyncio/base_events.py" in line
                                  and line.endswith(("call_soon_threadsafe", "_check_closed")))

  def write(self, text: str) -> int:
    self._partial += text
    *lines, self._partial = self._partial.split("\n")
    for line in lines:
      if line == self._HEADER:
        self._headers += 1
        continue
      noise = self._is_noise(line)
      if not noise:
        self._stream.write((self._HEADER + "\n") * self._headers)
      self._headers = 0
      if not noise:
        self._stream.write(line + "\n")
    return len(text)

  def flush(self) -> None:
    if self._partial:
      self._stream.write(self._partial)
      self._partial = ""
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def _quiet_libraries() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for name in ("absl", "jax", "orbax", "tensorflow", "grain"):
    logging.getLogger(name).setLevel(logging.WARNING)
  # orbax leaves failed read futures unretrieved; the error itself is reported once
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  # ... and tensorstore's callbacks for them then find orbax's event loop closed, printing a
  # traceback each on sys.stderr
  if not isinstance(sys.stderr, _DropClosedLoopTracebacks):
    sys.stderr = _DropClosedLoopTracebacks(sys.stderr)
  try:
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)
  except ImportError:
    pass


def main(argv: list[str] | None = None, *, hooks: Any = None) -> int:
  """The command line; ``hooks`` (a :class:`train.trainer.TrainHooks`) watch the run."""
  cfg = parse_config(argv)
  _quiet_libraries()
  try:
    from train import trainer
    from train.checkpoint import CheckpointError
  except ModuleNotFoundError as e:  # e.g. the system Python, not the project's environment
    print(missing_module_error("train", e), file=sys.stderr)
    return 2
  from train.config import ConfigError

  try:
    # the stop is reported below, with the command that continues the run: one line
    result = trainer.train(cfg, hooks=hooks, announce_stop=False)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  except KeyboardInterrupt:  # a second Ctrl-C: nothing saved since the last checkpoint
    print("interrupted (second Ctrl-C): nothing saved since the last checkpoint", file=sys.stderr)
    return EXIT_INTERRUPTED
  import jax

  if jax.process_index() == 0:
    _print_outcome(result)
  return EXIT_INTERRUPTED if result.stop_signal == "SIGINT" else 0


def _print_outcome(result: Any) -> None:
  """The run's last line: where it stopped and how to continue it, or the eval it ended with."""
  ev = result.final_eval
  if result.preempted and int(result.state.step) == 0:
    print(f"stopped before the first step; nothing saved in {result.run_dir}")
  elif result.preempted:
    by = f" by {result.stop_signal}" if result.stop_signal else ""
    config = os.path.join(result.run_dir, "config.json")
    print(f"stopped at step {int(result.state.step)}{by}; checkpoint in {result.run_dir}; "
          f"continue with: python -m train --config {config} --resume")
  elif ev:
    first = result.initial_eval.get("eval_perplexity")
    start = f"{first:.2f} -> " if first is not None else ""
    end = int(result.state.step)
    steps = (f"steps {result.start_step} -> {end} ({end - result.start_step} this run)"
             if result.start_step else f"{end} steps")
    print(f"done: {steps} in {result.wall_time_s:.0f} s; eval perplexity "
          f"{start}{ev['eval_perplexity']:.2f}; run dir {result.run_dir}")


def _exit(code: int) -> None:
  """Exits with ``code``; after an error without the interpreter's teardown, in which orbax's and
  tensorstore's background threads print tracebacks about their closed event loop (the error
  itself has been reported in one line and checkpoints have been waited for)."""
  if code == 0:
    sys.exit(0)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


if __name__ == "__main__":
  _exit(main())
