"""Command line: ``python -m train.export RUN_DIR OUT_DIR`` writes a Hugging Face LLaMA directory.

``OUT_DIR`` loads with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` as a
``LlamaForCausalLM`` (see :mod:`train.hf` for the name/layout mapping). Only the params are read
from the checkpoint (no optimizer state), on whatever devices this machine has. Bad input ends
with one ``error: ...`` line and exit status 2.

Example::

  python -m train.export runs/my-run exported/my-run --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
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
  """(params, LlamaConfig, tokenizer path, step) of a run directory's checkpoint."""
  from train import checkpoint as ckpt_lib
  from train import hf
  from train import tokenizer as tok_lib
  from train.config import ConfigError, TrainConfig
  from train.trainer import model_config

  path = os.path.join(run_dir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      cfg = TrainConfig.from_dict(json.load(f))
  except (OSError, ValueError, TypeError) as e:
    raise ConfigError(f"{path}: not a run's config ({e})") from None
  tokenizer_path = os.path.join(run_dir, "tokenizer.model")
  try:
    tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{run_dir}: {e}") from None
  mcfg = model_config(cfg, tokenizer.vocab_size)
  ckpt_dir = cfg.ckpt_dir or os.path.join(run_dir, "checkpoints")
  if "://" in ckpt_dir:
    raise ConfigError(f"the run's checkpoints are in {ckpt_dir}; copy them to a local directory "
                      "and point --ckpt-dir in RUN_DIR/config.json at it")
  load = getattr(ckpt_lib, "load_params", None)
  if load is not None:  # the checkpoint module's own params-only restore, when it has one
    params, step = load(run_dir, step=step)
  else:
    params, step = hf.restore_params(ckpt_dir, step)
  return params, mcfg, tokenizer_path, step


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from train import hf
  from train.checkpoint import CheckpointError
  from train.config import ConfigError

  try:
    max_shard = hf.parse_size(args.max_shard_size)
  except ValueError as e:
    print(f"error: --max-shard-size: {e}", file=sys.stderr)
    return 2
  try:
    params, mcfg, tokenizer_path, step = load_run(args.run_dir, args.step)
    files = hf.export(params, mcfg, tokenizer_path, args.out_dir, dtype=args.dtype,
                      max_shard_size=max_shard)
  except (ConfigError, CheckpointError, hf.HFError, FileExistsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"exported step {step} of {args.run_dir} ({args.dtype}) to {args.out_dir}: "
        f"{', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
