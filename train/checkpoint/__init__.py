"""Checkpoints with orbax: async, atomic, keep-last-K; restore into the current shardings.

A checkpoint ``RUN_DIR/checkpoints/<step>/`` holds four items:

- ``state``: the :class:`train.train_step.TrainState` (params, full optimizer state including
  projectors and their optimizer state, step, skip counters), written by every process for its
  shards;
- ``data``: every process's data-iterator state (grain ``get_state()``), as JSON;
- ``config``: the run's :class:`train.config.TrainConfig`, as JSON;
- ``signature``: ``{leaf path: "shape dtype"}`` of the state, to explain mismatches before
  restoring.

The step's orbax metadata (``_CHECKPOINT_METADATA``, ``custom_metadata``) holds
:func:`checkpoint_metadata`: the format version (:data:`FORMAT_VERSION`; a checkpoint without one
is version 1) and the topology that wrote it (mesh shape, device and process count).
:func:`load_params` reads the params alone (no optimizer state, no optimizer) onto any mesh, in
either parameter layout (one entry per layer, or the layers stacked on a leading axis).

Orbax writes each step to a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact and the partial one is never listed (and is removed
at the next start).

:mod:`train.checkpoint.checkpointer` saves and restores the train state during training,
:mod:`train.checkpoint.loading` reads a run's params alone, and :mod:`train.checkpoint.format`
holds what both share. Their public names are imported from here (``train.checkpoint.load_params``,
``train.checkpoint.Checkpointer``, ...): this is the stable import path.
"""

from train.checkpoint.checkpointer import (
    SCHEDULE_KEYS,
    STREAM_KEYS,
    STRUCTURAL_KEYS,
    Checkpointer,
    config_diff,
    decode_data_state,
    encode_data_state,
    layer_layout,
)
from train.checkpoint.format import (
    ADDED_FIELDS,
    FORMAT_VERSION,
    MIN_FORMAT_VERSION,
    CheckpointError,
    check_format_version,
    checkpoint_metadata,
    describe_topology,
    signature,
    unreadable_error,
)
from train.checkpoint.loading import (
    LoadedModel,
    abstract_params,
    load_model,
    load_model_config,
    load_params,
    load_run_config,
)

__all__ = [
    "ADDED_FIELDS", "FORMAT_VERSION", "MIN_FORMAT_VERSION", "SCHEDULE_KEYS", "STREAM_KEYS",
    "STRUCTURAL_KEYS", "CheckpointError", "Checkpointer", "LoadedModel", "abstract_params",
    "check_format_version", "checkpoint_metadata", "config_diff", "decode_data_state",
    "describe_topology", "encode_data_state", "layer_layout", "load_model", "load_model_config",
    "load_params", "load_run_config", "signature", "unreadable_error",
]
