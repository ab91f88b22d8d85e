"""Starting and running a training run, around the loop in :mod:`train.trainer`.

- :mod:`train.run.build`: ``build(cfg, vocab_size) -> Setup``: mesh, model definition, optimizer,
  shardings and the jitted steps, before any array is allocated; ``model_config``;
- :mod:`train.run.startup`: the resolved config, the run directory and its files, ``start``
  (fresh, resumed or ``--init-from``);
- :mod:`train.run.launch` (``jax.distributed``), :mod:`train.run.preemption` (SIGTERM/SIGINT),
  :mod:`train.run.preflight` (the memory check), :mod:`train.run.rundir` (names and the lock);
- :mod:`train.run.metrics` (JSONL, TensorBoard, MFU) and :mod:`train.run.health` (divergence).
"""
