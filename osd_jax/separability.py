"""Is an optax update separable by layer? A check on its jaxpr, before anything runs.

Running a transformation one layer at a time (:mod:`osd_jax.layerwise`) gives the same result as
running it on the whole tree only if, in the whole-tree update,

* every output at a stacked leaf (its update, its optimizer state) at layer i depends on the
  inputs at layer i alone (and on values that depend on no parameter, such as step counts);
* every output at another leaf depends on no stacked input;
* every shared state leaf (a step count) depends on neither.

:func:`check_layer_separable` traces ``tx.update`` on abstract inputs (no array is allocated,
whatever the model's size) and follows each value through the program: for every value it keeps
whether it depends on the other leaves, and where the layer axis is (an axis index, "every
layer" when a reduction, a contraction or an unknown primitive mixed layers, or nothing). A
global-norm clip, ``optax.apply_if_finite`` or a per-leaf norm over a stacked leaf mix layers, and
the check names the output and the primitive where the layers met. It is conservative: a
primitive it does not know mixes the layers of whatever it reads, so a false alarm is possible
but a silent wrong answer is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.extend import core as jex_core

MIXED = "mixed"


class _Iter:
  """Inside a loop over the layer axis (one per loop): the value belongs to one layer."""

  __slots__ = ()

  def __repr__(self):
    return "iter"


def _is_iter(layer) -> bool:
  return isinstance(layer, _Iter)


def _is_axis(layer) -> bool:
  return isinstance(layer, int)


class Dep:
  """What a value depends on: the other leaves (``rest``), and where the layer axis is."""

  __slots__ = ("rest", "layer", "why")

  def __init__(self, rest: bool = False, layer: Any = None, why: str | None = None):
    self.rest, self.layer, self.why = rest, layer, why

  def __eq__(self, other):
    return (self.rest, self.layer) == (other.rest, other.layer)

  def __repr__(self):
    return f"Dep(rest={self.rest}, layer={self.layer})"


NONE = Dep()


def _join_layers(layers: Sequence[Any]) -> Any:
  found = None
  for layer in layers:
    if layer is None:
      continue
    if layer == MIXED:
      return MIXED
    if found is None:
      found = layer
    elif found != layer:
      return MIXED
  return found


def _join(deps: Sequence[Dep], why: str) -> Dep:
  layer = _join_layers([d.layer for d in deps])
  prior = next((d.why for d in deps if d.layer == MIXED and d.why), None)
  return Dep(any(d.rest for d in deps), layer, prior or (why if layer == MIXED else None))


def _mixed(deps: Sequence[Dep], why: str) -> Dep:
  """The layers meet here (if any input carries one)."""
  prior = next((d.why for d in deps if d.layer == MIXED and d.why), None)
  if all(d.layer is None for d in deps):
    return Dep(any(d.rest for d in deps))
  return Dep(any(d.rest for d in deps), MIXED, prior or why)


def _axis_map(dep: Dep, fn, why: str) -> Dep:
  """``dep`` with its layer axis moved by ``fn(axis) -> new axis | None (mixed)``."""
  if not _is_axis(dep.layer):
    return dep
  new = fn(dep.layer)
  if new is None:
    return Dep(dep.rest, MIXED, why)
  return Dep(dep.rest, new, dep.why)


ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type copy
copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma imag
integer_pow is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow
real reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
tanh xor shift_left shift_right_logical shift_right_arithmetic population_count
le_to lt_to ge_to gt_to eq_to ne_to bitcast_convert_type
""".split())
REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                       "reduce_xor argmax argmin".split())
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
LINALG = frozenset("svd eigh qr householder_product geqrf cholesky lu triangular_solve "
                   "schur eig tridiagonal hessenberg".split())
PASSTHROUGH = frozenset("optimization_barrier sharding_constraint device_put".split())
# random keys made from seeds and counts; they read no parameter
RANDOM = frozenset("random_seed random_fold_in random_split random_bits random_wrap "
                   "random_unwrap threefry2x32".split())


def _ndim(var) -> int:
  return len(getattr(var.aval, "shape", ()))


def _sub_jaxpr(params: dict, *names: str):
  for name in names:
    value = params.get(name)
    if value is None:
      continue
    return value.jaxpr if hasattr(value, "jaxpr") and hasattr(value, "consts") else value
  return None


def _eval(jaxpr, in_deps: list[Dep]) -> list[Dep]:
  """The dependencies of ``jaxpr``'s outputs given its inputs'."""
  env: dict = {}

  def read(v) -> Dep:
    if isinstance(v, jex_core.Literal):
      return NONE
    return env.get(v, NONE)

  for v, d in zip(jaxpr.invars, in_deps):
    env[v] = d
  for v in jaxpr.constvars:
    env[v] = NONE
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    outs = _rule(eqn, ins)
    for v, d in zip(eqn.outvars, outs):
      env[v] = d
  return [read(v) for v in jaxpr.outvars]


# long on purpose: one case per primitive family, each a few lines
def _rule(eqn, ins: list[Dep]) -> list[Dep]:  # noqa: C901
  name = eqn.primitive.name
  params = eqn.params
  n_out = len(eqn.outvars)
  why = f"{name}"
  if not ins:
    return [NONE] * n_out
  if name in ELEMENTWISE:
    return [_join(ins, why)] * n_out
  if name in PASSTHROUGH and len(ins) == n_out:
    return list(ins)
  if name in RANDOM:
    return [_mixed(ins, why)] * n_out
  if name == "broadcast_in_dim":
    dims = params["broadcast_dimensions"]
    return [_axis_map(ins[0], lambda k: dims[k], why)]
  if name == "transpose":
    perm = tuple(params["permutation"])
    return [_axis_map(ins[0], lambda k: perm.index(k), why)]
  if name == "reshape":
    old = tuple(eqn.invars[0].aval.shape)
    new = tuple(params["new_sizes"])
    if params.get("dimensions") is not None:
      return [_mixed(ins[:1], why)]

    def moved(k):
      prefix = math.prod(old[:k])
      for j in range(len(new)):
        if math.prod(new[:j]) == prefix and new[j] == old[k]:
          return j
      return None

    return [_axis_map(ins[0], moved, why)]
  if name in REDUCTIONS:
    axes = tuple(params["axes"])
    return [_axis_map(ins[0], lambda k: None if k in axes else k - sum(a < k for a in axes),
                      why)] * n_out
  if name in CUMULATIVE:
    axis = params["axis"]
    return [_axis_map(ins[0], lambda k: None if k == axis else k, why)]
  if name in ("sort",):
    dim = params["dimension"]
    joined = _join(ins, why)
    return [_axis_map(joined, lambda k: None if k == dim else k, why)] * n_out
  if name == "squeeze":
    dims = tuple(params["dimensions"])
    return [_axis_map(ins[0], lambda k: None if k in dims else k - sum(d < k for d in dims),
                      why)]
  if name == "rev":
    dims = tuple(params["dimensions"])
    return [_axis_map(ins[0], lambda k: None if k in dims else k, why)]
  if name in ("concatenate", "split"):
    dim = params.get("dimension", params.get("axis"))
    joined = _join(ins, why)
    return [_axis_map(joined, lambda k: None if k == dim else k, why)] * n_out
  if name == "pad":
    config = params["padding_config"]
    joined = _join(ins, why)
    return [_axis_map(joined, lambda k: k if tuple(config[k]) == (0, 0, 0) else None, why)]
  if name == "slice":
    shape = eqn.invars[0].aval.shape
    start, limit = params["start_indices"], params["limit_indices"]
    strides = params.get("strides") or (1,) * len(shape)

    def kept(k):
      whole = start[k] == 0 and limit[k] == shape[k] and strides[k] == 1
      return k if whole else None

    return [_axis_map(ins[0], kept, why)]
  if name == "dot_general":
    return [_dot_general(eqn, ins, why)]
  if name == "gather" and ins[0].layer is None and _is_axis(ins[1].layer):
    # a lookup in a layer-free table (e.g. a quantization table) by per-layer indices: the
    # output's non-offset dims are the indices' batch dims, in order
    dn = params["dimension_numbers"]
    out_nd = _ndim(eqn.outvars[0])
    batch_positions = [d for d in range(out_nd) if d not in tuple(dn.offset_dims)]
    k = ins[1].layer
    if k < len(batch_positions) and k != _ndim(eqn.invars[1]) - 1:
      return [Dep(ins[0].rest or ins[1].rest, batch_positions[k])]
    return [Dep(True, MIXED, why)]
  if name in LINALG:
    # batched over the leading axes: the layer axis must not be one of the last two
    nd = max(_ndim(v) for v in eqn.invars)
    joined = _join(ins, why)
    return [_axis_map(joined, lambda k: k if k < nd - 2 else None, why)] * n_out
  if name in ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
              "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"):
    sub = _sub_jaxpr(params, "jaxpr", "call_jaxpr", "fun_jaxpr")
    if sub is not None and len(sub.invars) == len(ins):
      return _eval(sub, ins)
    return [_mixed(ins, why)] * n_out
  if name == "cond":
    return _cond(params, ins, why, n_out)
  if name == "scan":
    return _scan(eqn, ins, why)
  if name == "while":
    return _while(params, ins, why, n_out)
  if all(d.layer is None for d in ins):  # reads no layer: only the rest flag travels
    return [Dep(any(d.rest for d in ins))] * n_out
  iters = {d.layer for d in ins if _is_iter(d.layer)}
  if len(iters) == 1 and all(d.layer is None or _is_iter(d.layer) for d in ins):
    # one layer's values (inside a loop over the layers), whatever the primitive does
    return [Dep(any(d.rest for d in ins), iters.pop())] * n_out
  return [_mixed(ins, f"{name} (a primitive this check does not know)")] * n_out


def _dot_general(eqn, ins: list[Dep], why: str) -> Dep:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = ins[0], ins[1]
  rest = lhs.rest or rhs.rest
  kl, kr = lhs.layer, rhs.layer
  for d in (lhs, rhs):
    if d.layer == MIXED:
      return Dep(rest, MIXED, d.why or why)
  if _is_iter(kl) or _is_iter(kr):
    if _is_axis(kl) or _is_axis(kr) or (_is_iter(kl) and _is_iter(kr) and kl is not kr):
      return Dep(rest, MIXED, why)
    return Dep(rest, kl if _is_iter(kl) else kr)
  nl, nr = _ndim(eqn.invars[0]), _ndim(eqn.invars[1])
  free_l = [a for a in range(nl) if a not in lc and a not in lb]
  free_r = [a for a in range(nr) if a not in rc and a not in rb]
  if kl in lc or kr in rc:
    return Dep(rest, MIXED, f"{why} (contracts the layer axis)")
  if kl is not None and kl in lb:
    idx = list(lb).index(kl)
    if kr is not None and kr != rb[idx]:
      return Dep(rest, MIXED, why)
    return Dep(rest, idx)
  if kr is not None and kr in rb:
    if kl is not None:
      return Dep(rest, MIXED, why)
    return Dep(rest, list(rb).index(kr))
  if kl is not None and kr is not None:
    return Dep(rest, MIXED, f"{why} (an outer product of two layers' values)")
  if kl is not None:
    return Dep(rest, len(lb) + free_l.index(kl))
  if kr is not None:
    return Dep(rest, len(lb) + len(free_l) + free_r.index(kr))
  return Dep(rest)


def _cond(params, ins: list[Dep], why: str, n_out: int) -> list[Dep]:
  index, ops = ins[0], ins[1:]
  outs = [NONE] * n_out
  for branch in params["branches"]:
    got = _eval(branch.jaxpr, ops)
    outs = [_join([a, b], why) for a, b in zip(outs, got)]
  if index.layer is not None:  # one branch for every layer, chosen by layer data
    return [Dep(True if index.rest else o.rest, MIXED, index.why or f"{why} (its predicate)")
            for o in outs]
  return [Dep(o.rest or index.rest, o.layer, o.why) for o in outs]


def _carried(d: Dep, why: str) -> Dep:
  """A loop carry at the next iteration: one iteration's layer is another's mix."""
  if _is_iter(d.layer):
    return Dep(d.rest, MIXED, f"{why} (carries one layer's values into the next)")
  return d


def _fixed_point(body, consts: list[Dep], carry: list[Dep], extra: list[Dep], why: str):
  """Iterates a loop body's dependencies until the carry's stop changing."""
  for _ in range(64):
    outs = body(consts, carry, extra)
    new = [_carried(_join([a, b], why), why) for a, b in zip(carry, outs[:len(carry)])]
    if new == carry:
      return new, outs
    carry = new
  return [Dep(True, MIXED, why) for _ in carry], body(consts, carry, extra)


def _scan(eqn, ins: list[Dep], why: str) -> list[Dep]:
  p = eqn.params
  jaxpr = p["jaxpr"].jaxpr
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
  # a per-iteration slice of xs: the layer axis 0 is the loop, the others move down one
  tag = _Iter()
  sliced = []
  for d in xs:
    if d.layer == 0:
      sliced.append(Dep(d.rest, tag))
    elif _is_axis(d.layer):
      sliced.append(Dep(d.rest, d.layer - 1, d.why))
    else:
      sliced.append(d)

  def body(c, k, x):
    return _eval(jaxpr, list(c) + list(k) + list(x))

  carry, outs = _fixed_point(body, consts, carry, sliced, why)
  ys = []
  for d in outs[n_carry:]:
    if d.layer is tag:
      ys.append(Dep(d.rest, 0))
    elif _is_axis(d.layer):
      ys.append(Dep(d.rest, d.layer + 1, d.why))
    else:  # no layer, mixed, or an outer loop's layer (stacked over this loop: still one)
      ys.append(d)
  return carry + ys


def _while(params, ins: list[Dep], why: str, n_out: int) -> list[Dep]:
  cond_j, body_j = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
  nc, nb = params["cond_nconsts"], params["body_nconsts"]
  cond_consts, body_consts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]

  def body(c, k, _):
    return _eval(body_j, list(c) + list(k))

  carry, _ = _fixed_point(body, body_consts, carry, [], why)
  pred = _eval(cond_j, list(cond_consts) + list(carry))[0]
  if pred.layer is not None:
    return [Dep(True, MIXED, pred.why or f"{why} (its trip count)") for _ in carry]
  return [Dep(d.rest or pred.rest, d.layer, d.why) for d in carry]


class NotSeparableError(ValueError):
  """The transformation mixes layers (or a layer and the other leaves): it cannot run layer by
  layer without changing its result."""


def check_layer_separable(update_fn, inputs: Sequence[Any], input_kinds: Sequence[Any],
                          output_names: Sequence[str], output_kinds: Sequence[str]) -> None:
  """Raises :class:`NotSeparableError` unless ``update_fn`` is separable by layer.

  Args:
    update_fn: ``*inputs -> outputs`` (a pytree), traced abstractly.
    inputs: its arguments (``jax.ShapeDtypeStruct`` trees).
    input_kinds: per argument, a tree of the same structure with ``"layer"`` (a stacked leaf:
      axis 0 is the layer axis), ``"rest"`` (another leaf) or ``"shared"`` (e.g. a step count)
      at each leaf.
    output_names: a name per flattened output leaf, for the error message.
    output_kinds: per flattened output leaf, ``"layer"``, ``"rest"`` or ``"shared"``.
  """
  closed = jax.make_jaxpr(update_fn)(*inputs)
  kinds = jax.tree.leaves(list(input_kinds))
  if len(kinds) != len(closed.jaxpr.invars):
    raise ValueError("check_layer_separable: input_kinds do not match the inputs")
  deps = [Dep(rest=k == "rest", layer=0 if k == "layer" else None) for k in kinds]
  outs = _eval(closed.jaxpr, deps)
  for name, kind, d in zip(output_names, output_kinds, outs):
    if kind == "layer" and (d.rest or d.layer not in (None, 0)):
      what = ("the other (unstacked) leaves" if d.rest and d.layer in (None, 0)
              else f"every layer (they meet in {d.why or 'an unknown primitive'})")
      raise NotSeparableError(
          f"{name} at a stacked leaf depends on {what}: this transformation is not separable "
          f"by layer (e.g. a global-norm clip or a norm over the whole stack), so it cannot run "
          f"one layer at a time. Apply it to the whole tree, or leave it out of the layerwise "
          f"update (the trainer clips the fused update with the previous step's norm).")
    if kind in ("rest", "shared") and d.layer is not None:
      what = "a step count or other shared state" if kind == "shared" else "an unstacked leaf"
      raise NotSeparableError(
          f"{name} ({what}) depends on the stacked layers (they meet in "
          f"{d.why or 'an unknown primitive'}): this transformation is not separable by layer "
          f"(e.g. optax.clip_by_global_norm or optax.apply_if_finite), so it cannot run one "
          f"layer at a time.")
    if kind == "shared" and d.rest:
      raise NotSeparableError(
          f"{name} (a step count or other shared state) depends on the gradients or params: "
          f"this transformation is not separable by layer (e.g. optax.apply_if_finite), so it "
          f"cannot run one layer at a time.")
