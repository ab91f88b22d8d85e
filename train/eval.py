"""``python -m train.eval RUN_DIR``: the eval loss and perplexity of a run's checkpoint.

Reads the params alone (:func:`train.checkpoint.load_params`: no optimizer state) of the latest
checkpoint (or ``--step``) onto this machine's devices, and evaluates them on the run's data or
any other ``--data`` source the trainer accepts, with the run's tokenizer (``RUN_DIR/
tokenizer.model``), batch size and sequence length, through the trainer's own data pipeline and
eval step. Prints one line::

  step 300: eval loss 4.1234, perplexity 61.80 (8 batches of 16 x 128 tokens, --data embedded)

Examples::

  python -m train.eval runs/my-run
  python -m train.eval runs/my-run --data text:~/notes --batches 20 --step 200
"""

from __future__ import annotations

import argparse
import os
import sys
import types


def _parser() -> argparse.ArgumentParser:
  from train.__main__ import _Parser

  parser = _Parser(prog="python -m train.eval",
                   description="Eval loss and perplexity of a checkpoint of a python -m train run.")
  parser.add_argument("run_dir", metavar="RUN_DIR", help="The run directory (with config.json).")
  parser.add_argument("--data", default=None,
                      help="Data to evaluate on: embedded, text:GLOB or tfds:NAME[:VERSION] "
                           "(default: the run's --data).")
  parser.add_argument("--split", default="eval", choices=("eval", "train"),
                      help="Which split of --data (default: eval, the held-out documents).")
  parser.add_argument("--batches", type=int, default=None,
                      help="Number of batches (default: the run's --eval-batches).")
  parser.add_argument("--step", type=int, default=None,
                      help="The checkpoint's step (default: the latest).")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="Sequences per batch (default: the run's --batch-size).")
  parser.add_argument("--mesh", default="fsdp=-1",
                      help="Device mesh for the params and batches (default: fsdp=-1, every "
                           "device).")
  parser.add_argument("--tfds-data-dir", default=None, help="tensorflow-datasets data dir.")
  return parser


def evaluate_checkpoint(run_dir: str, *, data: str | None = None, split: str = "eval",
                        batches: int | None = None, step: int | None = None,
                        batch_size: int | None = None, mesh: str = "fsdp=-1",
                        tfds_data_dir: str | None = None, devices=None) -> dict:
  """``{"step", "eval_loss", "eval_perplexity", "batches", ...}`` of a run's checkpoint.

  Raises ConfigError / CheckpointError with a message naming the flag to fix.
  """
  import jax

  from train import checkpoint as ckpt_lib
  from train import sharding as shd
  from train import train_step as step_lib
  from train import trainer
  from train.config import ConfigError, validate
  from train.data import tokenizer as tok_lib
  from train.data.inputs import make_datasets

  run_dir = os.path.abspath(run_dir)  # RUN_DIR relative to the working directory
  cfg = ckpt_lib.load_run_config(run_dir)
  tokenizer_path = os.path.join(run_dir, "tokenizer.model")
  cfg = cfg.replace(
      data=data or cfg.data, eval_batches=batches or cfg.eval_batches,
      batch_size=batch_size or cfg.batch_size, tokenizer=tokenizer_path,
      tfds_data_dir=tfds_data_dir or cfg.tfds_data_dir, run_dir=run_dir, resume=False,
      auto_resume=False, grad_accum=1 if batch_size else cfg.grad_accum)
  if batches is not None and batches <= 0:
    raise ConfigError(f"--batches must be positive, got {batches}")
  validate(cfg)
  try:
    tokenizer = tok_lib.load_tokenizer(tokenizer_path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{tokenizer_path}: {e}") from None
  device_mesh = shd.make_mesh(mesh, devices)
  if cfg.batch_size % shd.data_parallel_size(device_mesh):
    raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the mesh's data x fsdp "
                      f"= {shd.data_parallel_size(device_mesh)} devices; give --batch-size or "
                      f"--mesh")
  loaded = ckpt_lib.load_model(run_dir, step=step, mesh=device_mesh)
  shardings = jax.tree.map(lambda x: x.sharding, loaded.params)
  eval_step = step_lib.make_eval_step(loaded.graphdef, device_mesh, shardings,
                                      grad_accum=cfg.grad_accum)
  train_ds, eval_ds = make_datasets(cfg, tokenizer, device_mesh)
  ds = eval_ds if split == "eval" else train_ds
  setup = types.SimpleNamespace(mesh=device_mesh, eval_step=eval_step, cfg=cfg)
  result = trainer.evaluate(setup, loaded.params, ds, cfg.eval_batches)
  return dict(result, step=loaded.step, batches=cfg.eval_batches, batch_size=cfg.batch_size,
              seq_len=cfg.seq_len, data=cfg.data, split=split)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  from train.__main__ import _quiet_libraries, missing_module_error

  _quiet_libraries()
  try:
    from train.checkpoint import CheckpointError
  except ModuleNotFoundError as e:  # e.g. the system Python, not the project's environment
    print(missing_module_error("train.eval", e), file=sys.stderr)
    return 2
  from train.config import ConfigError

  try:
    r = evaluate_checkpoint(args.run_dir, data=args.data, split=args.split,
                            batches=args.batches, step=args.step, batch_size=args.batch_size,
                            mesh=args.mesh, tfds_data_dir=args.tfds_data_dir)
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"step {r['step']}: eval loss {r['eval_loss']:.4f}, perplexity "
        f"{r['eval_perplexity']:.2f} ({r['batches']} batches of {r['batch_size']} x "
        f"{r['seq_len']} tokens, --data {r['data']} {r['split']} split)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
