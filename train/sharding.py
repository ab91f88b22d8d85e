"""Device mesh and logical-axis sharding rules.

The mesh has three named axes:

- ``data``: pure data parallelism (params replicated across it),
- ``fsdp``: data parallelism with parameters and optimizer state sharded over it (ZeRO-3 style),
- ``tensor``: tensor (model) parallelism over heads, MLP hidden units and the vocabulary.

Parameters carry *logical* axis names (``layers``, ``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``,
``norm``),
and so do the model's activations (``batch``, ``length``, ``activation_embed``, ``heads``, ``kv``,
``mlp``, ``vocab``; see :func:`activation_constraint`); :data:`LOGICAL_RULES` maps each to a mesh
axis (or none). Activations are split over ``data`` and ``fsdp`` along the batch and over
``tensor`` along heads, MLP units and the vocabulary; their model width stays whole. A dimension
that the mapped mesh axis does not divide is replicated instead, so odd-shaped small models still
run on any mesh.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),  # the stacked-blocks axis of scanned layers: every device holds all layers
    ("length", None),
    ("activation_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
)


def parse_mesh(spec: str) -> dict[str, int]:
  """Parses ``"data=-1,fsdp=2,tensor=1"`` into an ordered dict of axis sizes (-1 = the rest)."""
  sizes = {a: 1 for a in MESH_AXES}
  seen = set()
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in MESH_AXES:
      raise ConfigError(f"bad --mesh entry {part!r}; use AXIS=SIZE with AXIS in "
                        f"{', '.join(MESH_AXES)}, e.g. --mesh data=-1,fsdp=1,tensor=1")
    if name in seen:
      raise ConfigError(f"--mesh names axis {name!r} twice")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      raise ConfigError(f"--mesh size of {name!r} is not an integer: {value!r}") from None
    if size == 0 or size < -1:
      raise ConfigError(f"--mesh size of {name!r} must be positive or -1, got {size}")
    sizes[name] = size
  if sum(s == -1 for s in sizes.values()) > 1:
    raise ConfigError("--mesh may give -1 for one axis only")
  return sizes


def mesh_shape(spec: str, num_devices: int) -> dict[str, int]:
  """Resolves -1 and checks that the mesh uses exactly ``num_devices`` devices."""
  sizes = parse_mesh(spec)
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if num_devices % fixed:
      raise ConfigError(f"--mesh {spec!r}: the fixed axes ({fixed} devices) do not divide the "
                        f"{num_devices} available devices")
    sizes = {a: (num_devices // fixed if s == -1 else s) for a, s in sizes.items()}
  elif fixed != num_devices:
    raise ConfigError(f"--mesh {spec!r} needs {fixed} devices but {num_devices} are available; "
                      f"make the sizes multiply to {num_devices} or set one to -1")
  return sizes


def make_mesh(spec: str = "data=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # unusual topologies: fall back to the given order
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  if not batch_rows_contiguous(device_array):
    log.warning("--mesh %s: the topology-aware device order interleaves processes along the "
                "batch; ordering devices by process instead", spec)
    device_array = process_major(device_array)
  return Mesh(device_array, MESH_AXES)


def _batch_groups_by_process(device_array: np.ndarray) -> dict[int, set[int]]:
  """Process index -> the (data, fsdp) positions, flattened, that its devices hold."""
  groups: dict[int, set[int]] = {}
  n_tensor = device_array.shape[-1]
  for flat, device in enumerate(device_array.reshape(-1)):
    groups.setdefault(device.process_index, set()).add(flat // n_tensor)
  return groups


def batch_rows_contiguous(device_array: np.ndarray) -> bool:
  """True when every process's devices hold one contiguous block of batch rows, which is how
  each process reads its part of a global batch (:func:`process_batch_rows`)."""
  return all(max(g) - min(g) + 1 == len(g)
             for g in _batch_groups_by_process(device_array).values())


def process_major(device_array: np.ndarray) -> np.ndarray:
  """The same devices, reordered so that each process's devices are consecutive (a stable sort
  by process, so the topology-aware order within a process is kept)."""
  flat = sorted(device_array.reshape(-1), key=lambda d: d.process_index)
  return np.asarray(flat, dtype=object).reshape(device_array.shape)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """Maps logical axis names of an array of ``shape`` to a PartitionSpec on ``mesh``.

  Unknown names and ``None`` are replicated; a mesh axis is used at most once per array; a dimension
  that the mesh axis size does not divide is replicated.
  """
  if not names:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = table.get(name) if name is not None else None
    if axes is not None:
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      axes_t = tuple(a for a in axes_t if a not in used and mesh.shape.get(a, 1) > 1)
      if axes_t and dim % _axis_size(mesh, axes_t) == 0:
        used.update(axes_t)
        out.append(axes_t[0] if len(axes_t) == 1 else axes_t)
        continue
      if axes_t:
        log.info("dimension %s (%s) is not divisible by mesh axes %s; replicating it",
                 dim, name, axes_t)
    out.append(None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _logical_names(variable: Any) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if names:
      return tuple(names)
  return None


def param_specs(abstract_state: Any, mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """PartitionSpecs for an ``nnx.State`` of Variables, as a pure dict (``nnx.to_pure_dict``)."""
  from flax import nnx

  def spec(v):
    value = v.get_value() if hasattr(v, "get_value") else v.value
    return logical_to_spec(_logical_names(v), value.shape, mesh, rules)

  specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs: Any) -> Any:
  """Turns a tree of PartitionSpecs into NamedShardings on ``mesh``."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def activation_constraint(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
  """``constrain(x, names)`` for :func:`train.model.activation_sharding`: pins an activation whose
  dimensions carry logical ``names`` to ``mesh`` with ``jax.lax.with_sharding_constraint``."""

  def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return constrain


def batch_spec() -> P:
  """Batch arrays ``[B, T]`` are split over data and fsdp along B."""
  return P(BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def process_batch_rows(mesh: Mesh, batch_size: int,
                       process_index: int | None = None) -> tuple[int, int]:
  """Rows ``[start, stop)`` of a global batch of ``batch_size`` sequences that the devices of
  ``process_index`` (default: this process) hold under :func:`batch_sharding`.

  A process reads exactly these rows of every global batch and hands them to
  ``jax.make_array_from_process_local_data``. Raises ValueError when they are not one contiguous
  block (a mesh whose batch axes interleave the processes' devices).
  """
  me = jax.process_index() if process_index is None else process_index
  rows: set[int] = set()
  for device, index in batch_sharding(mesh).devices_indices_map((batch_size,)).items():
    if device.process_index == me:
      rows.update(range(*index[0].indices(batch_size)))
  if not rows:
    raise ValueError(f"process {me} holds no device of the mesh")
  start, stop = min(rows), max(rows) + 1
  if len(rows) != stop - start:
    raise ValueError(f"process {me} holds batch rows {sorted(rows)}, not one contiguous block; "
                     f"order the mesh's data/fsdp devices by process")
  return start, stop
