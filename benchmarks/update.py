"""Optimizer update cost alone (no forward/backward) on a LLaMA preset's parameter tree.

Each case is one ``jax.jit``-compiled call of ``tx.update`` + ``optax.apply_updates``, with params
and optimizer state donated, on fixed random float32 gradients. The paper's projection rule is used
(attention and MLP matrices projected; embeddings, head and norms get full-rank AdamW), the same for
every subspace optimizer, including ``optax.contrib.galore`` (``--project all`` projects every 2-D
leaf instead, as in ANCHORS.md's JAX row).

Steps that behave differently are timed separately by giving the call the step count t as a traced
argument (every ``count`` field of the state is set to it inside the jitted call, so no branch is
constant-folded):

* ``galore_adamw`` / ``optax.contrib.galore``: the SVD step (t = 200, a refresh) and a plain step
  (t = 201);
* ``osd_adamw`` / ``osd_lion``: a steady-state step (t ≥ 1: projection, inner Adam/Lion,
  back-projection and one online-PCA step on P); optionally the first step (t = 0: the projector is
  initialised from the gradient by SVD, or by the randomized range finder).

Example::

  python -m benchmarks.update --preset 60m --repeats 10
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import osd_jax
from benchmarks import common
from osd_jax.dimension_numbers import is_dimension_numbers_leaf

#: case name -> (optimizer family, step count t it is timed at)
CASES = {
    "optax.adamw": ("adamw", 1),
    "osd_adamw": ("osd_adamw", 1),
    "osd_lion": ("osd_lion", 1),
    "galore_adamw (SVD step)": ("galore_adamw", 200),
    "galore_adamw (plain step)": ("galore_adamw", 201),
    "optax.contrib.galore (SVD step)": ("optax_galore", 200),
    "optax.contrib.galore (plain step)": ("optax_galore", 201),
    "osd_adamw (t=0: SVD init)": ("osd_adamw", 0),
    "osd_adamw (t=0: randomized init)": ("osd_adamw_randomized", 0),
    # compact state (train --state-dtype): the moments in bf16 or 8 bits, P in bf16
    "osd_adamw (bf16 state)": ("osd_adamw:bfloat16", 1),
    "osd_adamw (float8 state)": ("osd_adamw:float8", 1),
    "osd_adamw (int8 state)": ("osd_adamw:int8", 1),
    "optax.adamw (float8 state)": ("adamw:float8", 1),
}
#: Lower bounds of osd_adamw's step (not optimizers): only its three s×L×r matmuls per projected
#: matrix (Ĝ = PᵀG', B = G'Ĝᵀ, U = PN), and only the full-rank AdamW of the unprojected leaves.
FLOOR_CASES = ("floor: 3 rank-r matmuls per projected matrix",
               "floor: adamw on the unprojected leaves")
DEFAULT_CASES = tuple(c for c in CASES if not c.startswith("osd_adamw (t=0")
                      and not c.endswith(" state)"))
SVD_CASES = {"galore_adamw (SVD step)", "optax.contrib.galore (SVD step)",
             "osd_adamw (t=0: SVD init)"}
BASELINE = "optax.adamw"
GALORE_SVD = "optax.contrib.galore (SVD step)"


def projection_specs(params: Any, project: str) -> Any:
  """Params-shaped tree of ``osd_jax.DimensionNumbers`` / None (the trainer's rule)."""
  from train.optimizers import projection_rule

  return projection_rule(params, project)


def make_optimizer(family: str, params: Any, rank: int, *, project: str = "attn_mlp",
                   learning_rate: float = 1e-3, weight_decay: float = 0.1,
                   update_proj_gap: int = 200) -> optax.GradientTransformation:
  """The optimizer of one case, configured as the trainer configures it."""
  from train.optimizers import decay_mask

  mask = decay_mask(params)
  specs = projection_specs(params, project)
  family, _, state_dtype = family.partition(":")
  if state_dtype:  # compact: the trainer's building blocks with --state-dtype
    if family == "adamw":
      return osd_jax.skipping.chain(
          osd_jax.transforms.scale_by_adam(state_dtype=state_dtype),
          optax.add_decayed_weights(weight_decay, mask),
          optax.scale_by_learning_rate(learning_rate))
    return osd_jax.osd_adamw(learning_rate, rank, weight_decay=weight_decay, mask=mask,
                             weight_dimension_numbers=specs, state_dtype=state_dtype,
                             projector=osd_jax.ProjectorOptions(dtype="bfloat16"))
  if family == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay, mask=mask)
  if family == "osd_adamw":
    return osd_jax.osd_adamw(learning_rate, rank, weight_decay=weight_decay, mask=mask,
                             weight_dimension_numbers=specs)
  if family == "osd_adamw_randomized":
    return osd_jax.osd_adamw(learning_rate, rank, weight_decay=weight_decay, mask=mask,
        weight_dimension_numbers=specs, projector=osd_jax.ProjectorOptions(init="randomized"))
  if family == "osd_lion":
    return osd_jax.osd_lion(learning_rate / 10, rank, weight_decay=weight_decay, mask=mask,
                            weight_dimension_numbers=specs)
  if family == "galore_adamw":
    return osd_jax.galore_adamw(learning_rate, rank, update_proj_gap=update_proj_gap,
                                weight_decay=weight_decay, mask=mask,
                                weight_dimension_numbers=specs)
  if family == "optax_galore":
    galore_specs = jax.tree.map(
        lambda s: None if s is None else optax.contrib.GaLoreDimensionNumbers(
            reduction_axis=s.reduction_axis, output_axis=s.output_axis),
        specs, is_leaf=is_dimension_numbers_leaf)
    return optax.contrib.galore(learning_rate, rank=rank, update_proj_gap=update_proj_gap,
                                scale=0.25, weight_decay=weight_decay, mask=mask,
                                weight_dimension_numbers=galore_specs)
  raise ValueError(f"unknown optimizer family {family!r}")


def with_count(state: Any, count: jax.Array) -> Any:
  """``state`` with every integer leaf named ``count`` set to ``count`` (broadcast)."""

  def set_count(path, x):
    last = path[-1] if path else None
    name = getattr(last, "name", getattr(last, "key", None))
    if name == "count" and jnp.issubdtype(x.dtype, jnp.integer):
      return jnp.broadcast_to(count.astype(x.dtype), x.shape)
    return x

  return jax.tree_util.tree_map_with_path(set_count, state)


def make_step(tx: optax.GradientTransformation) -> Callable:
  """``step(params, state, grads, count) -> (params, state)``: one jitted, donated update."""

  def step(params, state, grads, count):
    state = with_count(state, count)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


class FloorCase:
  """A lower bound of osd_adamw's update: one part of its work alone (see ``FLOOR_CASES``)."""

  def __init__(self, name: str, abstract: Any, grads: Any, rank: int, project: str, seed: int):
    from osd_jax.dimension_numbers import resolve_layouts, to_matrix

    self.name, self.family = name, "floor"
    specs = projection_specs(abstract, project)
    layouts, treedef = resolve_layouts(abstract, specs, rank)
    self.grads = grads
    self.count = jnp.asarray(0, jnp.int32)
    self.state_bytes = 0
    leaves = treedef.flatten_up_to(abstract)
    if name == FLOOR_CASES[0]:
      keys = jax.random.split(jax.random.key(seed), len(leaves))
      self.state = [None if lay is None else
                    jax.random.normal(k, lay.projector_shape, jnp.float32) / lay.s ** 0.5
                    for k, lay in zip(keys, layouts)]

      def fn(grads, ps):
        out = []
        for g, p, lay in zip(treedef.flatten_up_to(grads), ps, layouts):
          if lay is None:
            continue
          g2 = to_matrix(g, lay)
          pt = jnp.swapaxes(p, -1, -2)
          g_hat = pt @ g2  # Ĝ = PᵀG'
          out.append((g2 @ jnp.swapaxes(g_hat, -1, -2), p @ g_hat))  # B = G'Ĝᵀ, U = PĜ
        return out

      self.compiled = jax.jit(fn).lower(grads, self.state).compile()
      self.params = None
    else:
      from train.optimizers import decay_mask

      keep = [lay is None for lay in layouts]

      def sub(tree):
        return [x for x, k in zip(treedef.flatten_up_to(tree), keep) if k]

      tx = optax.adamw(1e-3, weight_decay=0.1, mask=sub(decay_mask(abstract)))
      self.params = common.random_tree(sub(abstract), seed)
      self.state = jax.jit(tx.init)(self.params)
      self.grads = sub(grads)
      self.compiled = make_step(tx).lower(self.params, self.state, self.grads,
                                          self.count).compile()
    self.compile_s = 0.0

  def __call__(self) -> None:
    if self.params is None:
      jax.block_until_ready(self.compiled(self.grads, self.state))
    else:
      self.params, self.state = self.compiled(self.params, self.state, self.grads, self.count)
      jax.block_until_ready((self.params, self.state))


class Case:
  """One optimizer at one step count, with its own params and state (donated call to call)."""

  def __init__(self, name: str, family: str, count: int, abstract: Any, grads: Any, rank: int,
               project: str, seed: int):
    self.name, self.family = name, family
    self.tx = make_optimizer(family, abstract, rank, project=project)
    self.params = common.random_tree(abstract, seed)
    self.state = jax.jit(self.tx.init)(self.params)
    self.state_bytes = osd_jax.state_bytes(self.state)
    self.grads = grads
    self.count = jnp.asarray(count, jnp.int32)
    t0 = time.perf_counter()
    self.compiled = make_step(self.tx).lower(self.params, self.state, grads, self.count).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> None:
    self.params, self.state = self.compiled(self.params, self.state, self.grads, self.count)
    jax.block_until_ready((self.params, self.state))


def expected_bytes(family: str, abstract: Any, rank: int, project: str) -> int | None:
  if family == "floor":
    return None
  name = {"adamw": "adamw", "osd_adamw": "osd_adamw", "osd_adamw_randomized": "osd_adamw",
          "osd_lion": "osd_lion", "galore_adamw": "galore_adamw"}.get(family)
  if name is None:
    return None
  return osd_jax.expected_state_bytes(abstract, rank, optimizer=name,
                                      weight_dimension_numbers=projection_specs(abstract, project))


def parse_args(argv):
  p = common.base_parser(__doc__.split("\n")[0], preset="60m", repeats=10, warmup=2)
  p.add_argument("--cases", default=",".join(DEFAULT_CASES),
                 help=f"Comma-separated cases, from: {', '.join(CASES)}; 'all' for every one.")
  p.add_argument("--floor", action="store_true",
                 help="Also time osd_adamw's lower bounds: " + "; ".join(FLOOR_CASES) + ".")
  p.add_argument("--svd-repeats", type=int, default=3,
                 help="Timed rounds of the SVD cases (capped by --repeats).")
  p.add_argument("--svd-warmup", type=int, default=1,
                 help="Untimed calls of the SVD cases after compilation (0 is fine: compilation is "
                      "done ahead of time and not timed).")
  p.add_argument("--project", default="attn_mlp", choices=("attn_mlp", "all"),
                 help="Which matrices the subspace optimizers project.")
  p.add_argument("--model-override", action="append", default=[], metavar="KEY=VALUE",
                 help="Override a model-config field, e.g. n_layers=2 (repeatable).")
  p.add_argument("--scan-layers", action="store_true",
                 help="The trainer's default stacked tree (one [n_layers, ...] leaf per matrix "
                      "kind, projected through the layer axis) instead of one leaf per layer.")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.cases = list(CASES) if args.cases == "all" else [c.strip() for c in args.cases.split(",")
                                                         if c.strip()]
  if args.floor:
    args.cases += [c for c in FLOOR_CASES if c not in args.cases]
  for c in args.cases:
    if c not in CASES and c not in FLOOR_CASES:
      p.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
  return args


def run(args) -> dict:
  rank = common.resolve_rank(args.preset, args.rank)
  abstract = common.abstract_params(args.preset, scan_layers=args.scan_layers,
                                    **common.parse_overrides(args.model_override))
  grads = common.random_tree(abstract, args.seed + 1)
  n_params = common.tree_size(abstract)
  specs = projection_specs(abstract, args.project)
  # the projected leaves with the trainer's layouts (batch axes when scanned)
  flat_specs = jax.tree.leaves(specs, is_leaf=is_dimension_numbers_leaf)
  projected_pairs = [(x, s) for x, s in zip(jax.tree.leaves(abstract), flat_specs)
                     if s is not None]
  projected = sum(x.size for x, _ in projected_pairs)
  common.log(f"update: preset {args.preset} ({n_params / 1e6:.1f}M params, "
             f"{'scanned' if args.scan_layers else 'unrolled'} layers, "
             f"{projected / 1e6:.1f}M projected), rank {rank}, cases {args.cases}")
  cases = {}
  for name in args.cases:
    common.log(f"  compiling {name}")
    if name in FLOOR_CASES:
      cases[name] = FloorCase(name, abstract, grads, rank, args.project, args.seed)
      continue
    family, count = CASES[name]
    cases[name] = Case(name, family, count, abstract, grads, rank, args.project, args.seed)
  warmups = {n: (args.svd_warmup if n in SVD_CASES else args.warmup) for n in cases}
  for name, case in cases.items():  # warm up each on its own
    common.log(f"  warming up {name}")
    for _ in range(warmups[name]):
      case()
  results = common.interleaved(
      cases, args.repeats, warmup=0,
      repeats_for={n: min(args.svd_repeats, args.repeats) for n in cases if n in SVD_CASES})
  base = results.get(BASELINE, {}).get("median_s")
  galore_svd = results.get(GALORE_SVD, {}).get("median_s")
  base_bytes = cases[BASELINE].state_bytes if BASELINE in cases else None
  rows = []
  out_cases = {}
  for name, case in cases.items():
    r = results[name]
    exp = expected_bytes(case.family, abstract, rank, args.project)
    out_cases[name] = {
        **r,
        "family": case.family,
        "step_count": int(case.count),
        "compile_s": case.compile_s,
        "vs_adamw": common.ratio(r["median_s"], base),
        "vs_galore_svd_step": common.ratio(r["median_s"], galore_svd),
        "state_bytes": None if case.family == "floor" else case.state_bytes,
        "expected_state_bytes": exp,
        "state_bytes_vs_adamw": (None if case.family == "floor" else
                                 common.ratio(case.state_bytes, base_bytes)),
    }
    rows.append([name, common.fmt_seconds(r["median_s"]), common.fmt_seconds(r["min_s"]),
                 common.fmt_seconds(r["max_s"]), common.fmt_ratio(out_cases[name]["vs_adamw"]),
                 common.fmt_ratio(out_cases[name]["vs_galore_svd_step"]),
                 common.fmt_bytes(out_cases[name]["state_bytes"]),
                 common.fmt_ratio(out_cases[name]["state_bytes_vs_adamw"])])
  # Closed-form state bytes of the projected matrices alone (embeddings/head/norms excluded).
  proj_leaves = [x for x, _ in projected_pairs]
  proj_specs = [s for _, s in projected_pairs]
  projected_state = {
      name: osd_jax.expected_state_bytes(proj_leaves, rank, optimizer=name,
                                         weight_dimension_numbers=proj_specs)
      for name in ("adamw", "osd_adamw", "osd_lion", "galore_adamw")}
  floor = None
  if all(c in results for c in FLOOR_CASES):
    floor = sum(results[c]["median_s"] for c in FLOOR_CASES)
  osd = results.get("osd_adamw", {}).get("median_s")
  header = ["case", "median", "min", "max", "vs optax.adamw", "vs galore SVD step",
            "state", "state vs adamw"]
  return {
      "benchmark": "update",
      "preset": args.preset,
      "rank": rank,
      "project": args.project,
      "scan_layers": args.scan_layers,
      "model_overrides": common.parse_overrides(args.model_override),
      "params": n_params,
      "projected_params": projected,
      "repeats": args.repeats,
      "warmup": args.warmup,
      "cases": out_cases,
      "projected_matrices_state_bytes": projected_state,
      "projected_matrices_state_vs_adamw": {
          k: common.ratio(v, projected_state["adamw"]) for k, v in projected_state.items()},
      "osd_adamw_floor_s": floor,
      "osd_adamw_floor_vs_adamw": common.ratio(floor, base),
      "osd_adamw_vs_floor": common.ratio(osd, floor),
      "table": common.table(rows, header),
  }


def main(argv=None) -> dict:
  return common.cli_main(
      "update", argv, parse_args, lambda args, _: run(args), notes=_notes,
      heading=lambda args, result, env: (
          f"Optimizer update alone — preset {result['preset']}, rank {result['rank']}, "
          f"{common.describe_machine(env)}, jax {env['versions']['jax']}"))


def _notes(result: dict) -> list[str]:
  ps = result["projected_matrices_state_bytes"]
  lines = ["state of the projected matrices alone: " + ", ".join(
      f"{k} {common.fmt_bytes(v)} ({common.fmt_ratio(v / ps['adamw'])})" for k, v in ps.items())]
  if result["osd_adamw_floor_s"] is not None:
    lines.append(f"osd_adamw lower bound (sum of the floor cases): "
                 f"{common.fmt_seconds(result['osd_adamw_floor_s'])} = "
                 f"{common.fmt_ratio(result['osd_adamw_floor_vs_adamw'])} optax.adamw; osd_adamw "
                 f"is {common.fmt_ratio(result['osd_adamw_vs_floor'])} its bound")
  return lines


if __name__ == "__main__":
  main()
