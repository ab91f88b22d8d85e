"""Command line: ``python -m train.export RUN_DIR OUT_DIR`` writes a Hugging Face LLaMA directory.

``OUT_DIR`` loads with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` as a
``LlamaForCausalLM`` (see :mod:`train.interop.hf` for the name/layout mapping). Only the params are
read from the checkpoint (no optimizer state), on whatever devices this machine has. Bad input ends
with one ``error: ...`` line and exit status 2.

Example::

  python -m train.export runs/my-run hf/my-run --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    self.exit(2, f"error: {message} (see python -m train.export --help)\n")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m train.export",
                   description="Export a training run's params as a Hugging Face "
                               "LlamaForCausalLM directory (config.json, safetensors, tokenizer).")
  parser.add_argument("run_dir", metavar="RUN_DIR", help="The run directory (holds config.json, "
                      "tokenizer.model and checkpoints/).")
  parser.add_argument("out_dir", metavar="OUT_DIR", help="Where to write the HF directory (new "
                      "or empty).")
  parser.add_argument("--step", type=int, default=None,
                      help="Checkpoint step to export (default: the latest).")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="Dtype of the exported weights (default: float32).")
  parser.add_argument("--max-shard-size", default="5GB",
                      help="Split the weights into shards of at most this size, with an index "
                           "(default: 5GB, as transformers does).")
  return parser


def load_run(run_dir: str, step: int | None = None):
  """(params, LlamaConfig, tokenizer path) of a run directory's checkpoint (default: latest)."""
  from train import checkpoint as ckpt_lib

  run_dir = os.path.abspath(run_dir)  # RUN_DIR relative to the working directory
  tokenizer_path = os.path.join(run_dir, "tokenizer.model")
  mcfg = ckpt_lib.load_model_config(run_dir, step)
  params = ckpt_lib.load_params(run_dir, step)  # the params alone, whatever saved them
  if not os.path.isfile(tokenizer_path):
    raise ckpt_lib.CheckpointError(f"{run_dir} has no tokenizer.model (the run's SentencePiece "
                                   "model, written when it started)")
  return params, mcfg, tokenizer_path


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from train.__main__ import missing_module_error

  try:
    from train.checkpoint import CheckpointError
    from train.interop import hf
  except ModuleNotFoundError as e:  # e.g. the system Python, not the project's environment
    print(missing_module_error("train.export", e), file=sys.stderr)
    return 2
  from train.config import ConfigError

  try:
    max_shard = hf.parse_size(args.max_shard_size)
  except ValueError as e:
    print(f"error: --max-shard-size: {e}", file=sys.stderr)
    return 2
  if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
    print(f"error: {args.out_dir} is not empty; export into a new or empty directory",
          file=sys.stderr)
    return 2
  from train.__main__ import _quiet_libraries

  _quiet_libraries()
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on the read-only checkpoints
  try:
    params, mcfg, tokenizer_path = load_run(args.run_dir, args.step)
    files = hf.export(params, mcfg, tokenizer_path, args.out_dir, dtype=args.dtype,
                      max_shard_size=max_shard)
  except (ConfigError, CheckpointError, hf.HFError, FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  which = "the latest checkpoint" if args.step is None else f"step {args.step}"
  print(f"exported {which} of {args.run_dir} ({args.dtype}) to {args.out_dir}: "
        f"{', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
