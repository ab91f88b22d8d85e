"""Reading compiled XLA programs: conditionals, thunks, decompositions and collectives.

``jax.jit(f).lower(...).compile().as_text()`` is the optimized, partitioned HLO module that runs.
:func:`parse` splits it into computations; the helpers below count what one step executes:

* :func:`conditionals`: every ``conditional`` op with its branch computations;
* :func:`reachable`: the computations a step can enter from ENTRY, optionally without entering
  some conditional branches (e.g. the projector-refresh branch, to get the steady-state path);
* :func:`thunks`: non-trivial ops outside fusions (on XLA:CPU each becomes roughly one thunk: a
  fusion kernel, a dot, a copy, a conditional...);
* :func:`decompositions`: SVD/QR/eigh/Cholesky custom calls (LAPACK on CPU, cuSOLVER on GPU);
* :func:`collectives`: all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute
  ops with their result shapes and bytes.

Used by ``tests/test_hlo_structure.py`` and ``benchmarks/collectives.py``. Example::

  text = jax.jit(step).lower(*args).compile().as_text()
  module = hlo.parse(text)
  steady = hlo.reachable(module, skip=hlo.refresh_branches(module))
  print(hlo.collectives(module, steady))
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
#: Custom-call targets of matrix decompositions (LAPACK: gesdd/gesvd/geqrf/orgqr/syevd/potrf...;
#: cuSOLVER/hipSOLVER; JAX's own names).
DECOMPOSITION_PATTERN = re.compile(
    r"gesdd|gesvd|gesvj|geqrf|orgqr|ungqr|syevd|heevd|syev|heev|potrf|getrf|solver|"
    r"Qr|Eigh|Svd|Cholesky", re.IGNORECASE)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_TRIVIAL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
            "partition-id", "replica-id", "opt-barrier"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str  # the result shape text, e.g. "f32[512,128]{1,0}" or "(f32[2], s32[])"
  line: str
  called: tuple[str, ...]  # computations it calls (fusions, branches, bodies, reducers)

  @property
  def bytes(self) -> int:
    """Bytes of the result (all arrays of a tuple result)."""
    return shape_bytes(self.shape)

  @property
  def array_bytes(self) -> list[int]:
    """Bytes of each array of the result (one entry, or one per element of a tuple result)."""
    return [shape_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(self.shape) if d in _BYTES]

  @property
  def branches(self) -> tuple[str, ...]:
    """Branch computations of a conditional, in branch-index order (false, true for a pred)."""
    m = re.search(r"branch_computations=\{([^}]*)\}", self.line)
    if m:
      return tuple(b.strip().lstrip("%") for b in m.group(1).split(","))
    t = re.search(r"true_computation=%?([\w.\-]+)", self.line)
    f = re.search(r"false_computation=%?([\w.\-]+)", self.line)
    return (f.group(1), t.group(1)) if t and f else ()


@dataclasses.dataclass
class Module:
  computations: dict[str, list[Instruction]]
  entry: str
  fused: set[str]  # computations called by fusion ops (kernels, not thunks)
  reducers: set[str]  # computations used only as a reduction's ``to_apply`` (scalar code)


def shape_bytes(shape: str) -> int:
  """Bytes of every array in a shape text (``f32[8,128]{1,0}`` = 4096; tuples add up)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _split_result(rest: str) -> tuple[str, str]:
  """``'f32[2]{0} add(%a, %b), ...'`` -> (shape, opcode)."""
  rest = rest.strip()
  if rest.startswith("("):  # tuple shape: find the matching parenthesis
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        shape, tail = rest[:i + 1], rest[i + 1:]
        break
    else:
      return rest, ""
  else:
    shape, _, tail = rest.partition(" ")
  m = re.match(r"\s*([\w\-]+)\(", tail)
  return shape, (m.group(1) if m else "")


def _called(line: str) -> tuple[str, ...]:
  names = []
  for key in ("calls", "to_apply", "body", "condition", "true_computation", "false_computation"):
    names += re.findall(rf"\b{key}=%?([\w.\-]+)", line)
  for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
    names += [b.strip().lstrip("%") for b in group.split(",") if b.strip()]
  return tuple(names)


def parse(text: str) -> Module:
  """Splits an HLO module's text into computations of :class:`Instruction`."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line.startswith((" ", "\t", "}")):
      m = _HEADER.match(line)
      current = None
      if m and line.rstrip().endswith("{"):
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if current is None:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape, opcode = _split_result(m.group(2))
    computations[current].append(Instruction(m.group(1), opcode, shape, line.strip(),
                                             _called(line)))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  all_instrs = [i for instrs in computations.values() for i in instrs]
  fused = {c for i in all_instrs if i.opcode == "fusion" for c in i.called}
  applied = {c for i in all_instrs for c in re.findall(r"\bto_apply=%?([\w.\-]+)", i.line)}
  other = {c for i in all_instrs
           for c in set(i.called) - set(re.findall(r"\bto_apply=%?([\w.\-]+)", i.line))}
  return Module(computations, entry, fused, applied - other)


def instructions(module: Module, computations: Iterable[str] | None = None):
  """Every instruction of the given computations (default: all)."""
  names = module.computations if computations is None else computations
  for name in names:
    yield from module.computations.get(name, ())


def conditionals(module: Module, computations: Iterable[str] | None = None) -> list[Instruction]:
  return [i for i in instructions(module, computations) if i.opcode == "conditional"]


def reachable(module: Module, skip: Iterable[str] = ()) -> set[str]:
  """Computations reachable from ENTRY, not entering any computation named in ``skip``."""
  skip = set(skip)
  seen, todo = set(), [module.entry]
  while todo:
    name = todo.pop()
    if name in seen or name in skip or name not in module.computations:
      continue
    seen.add(name)
    for instr in module.computations[name]:
      todo.extend(instr.called)
  return seen


def branch_computations(module: Module, branch: int) -> list[str]:
  """Branch ``branch`` of every conditional (1 = the true branch of a ``lax.cond``)."""
  return [c.branches[branch] for c in conditionals(module) if len(c.branches) > branch]


def refresh_branches(module: Module) -> list[str]:
  """Conditional branches from which an SVD/QR/eigh/Cholesky custom call can be reached.

  In an optimizer step these are the projector refreshes (t = 0, or every T steps); leaving
  them out of :func:`reachable` gives the steady-state path.
  """
  out = []
  for cond in conditionals(module):
    for branch in cond.branches:
      if decompositions(module, reachable_from(module, branch)):
        out.append(branch)
  return out


def reachable_from(module: Module, start: str) -> set[str]:
  """Computations reachable from ``start`` (itself included)."""
  return reachable(dataclasses.replace(module, entry=start))


def decompositions(module: Module, computations: Iterable[str] | None = None) -> list[str]:
  """Custom-call targets of SVD/QR/eigh/Cholesky/LU ops in the given computations."""
  out = []
  for instr in instructions(module, computations):
    if instr.opcode != "custom-call":
      continue
    m = re.search(r'custom_call_target="([^"]+)"', instr.line)
    if m and DECOMPOSITION_PATTERN.search(m.group(1)):
      out.append(m.group(1))
  return out


def thunks(module: Module, computations: Iterable[str] | None = None) -> int:
  """Non-trivial ops in the non-fused computations given (default: all reachable from ENTRY)."""
  names = reachable(module) if computations is None else set(computations)
  names = names - module.fused - module.reducers
  return sum(1 for name in names for instr in module.computations.get(name, ())
             if instr.opcode and instr.opcode not in _TRIVIAL)


def collectives(module: Module, computations: Iterable[str] | None = None
                ) -> dict[str, list[Instruction]]:
  """Collective ops (async starts counted once) by kind, in the given computations."""
  out: dict[str, list[Instruction]] = {k: [] for k in COLLECTIVES}
  for instr in instructions(module, computations):
    op = instr.opcode.removesuffix("-start")
    if op in out and not instr.opcode.endswith("-done"):
      out[op].append(instr)
  return out


def collective_summary(module: Module, computations: Iterable[str] | None = None
                       ) -> dict[str, dict[str, int]]:
  """``{kind: {"count": n, "bytes": b}}`` for :func:`collectives`, plus a ``"total"`` row."""
  summary = {k: {"count": len(v), "bytes": sum(i.bytes for i in v)}
             for k, v in collectives(module, computations).items()}
  summary["total"] = {"count": sum(v["count"] for v in summary.values()),
                      "bytes": sum(v["bytes"] for v in summary.values())}
  return summary
