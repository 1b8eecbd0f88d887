"""Matmul FLOPs of a program, counted from its jaxpr with every loop iteration.

XLA's cost analysis of a compiled program counts a loop body once, and every
train step and scorer here scans over chunks, so its FLOPs are lower bounds
by the trip counts. The jaxpr says the trip count of each `scan`: this counts
`2 * batch * free * free * contracted` FLOPs per `dot_general`, multiplies a
scan body's count by its length, takes the largest branch of a `cond` (an
upper bound where branches differ: `by_length`'s switch picks a caption
bucket at run time; `count_jaxpr(..., pick=)` chooses a branch instead),
multiplies a `shard_map` body (one device's share) by the devices it runs
on, and counts a `while` body once (trip count unknown; reported).
Elementwise work is left out: the matmuls dominate SGRAF, and they are what a
chip's peak rate speaks of. Differentiated programs hold their
backward pass and any rematerialised forward as ordinary equations, so both
are counted.

    count = matmul_flops(jax.jit(f), x, y)  # abstract or concrete arguments
    count.flops, count.while_loops
    count_jaxpr(jax.jit(f).trace(x, y).jaxpr, pick=lambda branches: branches[0])
"""

import dataclasses
import math

import jax
from jax.extend import core


@dataclasses.dataclass(frozen=True)
class Count:
  flops: float  # matmul FLOPs, every scan iteration counted
  while_loops: int  # `while` bodies counted once (unknown trip count)


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> float:
  """2 x batch x lhs-free x rhs-free x contracted, from the operands' shapes."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  batch = math.prod(lhs_shape[d] for d in lhs_batch)
  contract = math.prod(lhs_shape[d] for d in lhs_contract)
  lhs_free = math.prod(
    n for d, n in enumerate(lhs_shape) if d not in lhs_contract and d not in lhs_batch
  )
  rhs_free = math.prod(
    n for d, n in enumerate(rhs_shape) if d not in rhs_contract and d not in rhs_batch
  )
  return 2.0 * batch * lhs_free * rhs_free * contract


def _jaxprs(value):
  """The jaxprs an equation parameter holds (a branch tuple holds several)."""
  if isinstance(value, core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _jaxprs(v)]
  return []


def _count(jaxpr, pick=max) -> tuple[float, int]:
  flops, whiles = 0.0, 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
      flops += dot_general_flops(lhs, rhs, eqn.params["dimension_numbers"])
      continue
    if name == "cond":
      counts = [_count(j, pick) for j in _jaxprs(eqn.params["branches"])]
      flops += pick([c[0] for c in counts])
      whiles += max(c[1] for c in counts)
      continue
    if name == "while":
      inner = _count(eqn.params["body_jaxpr"].jaxpr, pick)
      flops, whiles = flops + inner[0], whiles + inner[1] + 1
      continue
    times = 1
    if name == "scan":
      times = eqn.params["length"]
    elif name == "shard_map":  # the body holds one device's share
      shape = eqn.params["mesh"].shape
      times = math.prod(shape[a] for a in eqn.params["newly_manual_axes"])
    for value in eqn.params.values():
      for sub in _jaxprs(value):
        inner = _count(sub, pick)
        flops, whiles = flops + times * inner[0], whiles + inner[1]
  return flops, whiles


def count_jaxpr(closed, pick=max) -> Count:
  """Matmul FLOPs of a (closed) jaxpr; a `cond` counts `pick(its branches'
  FLOPs)`, by default the largest."""
  flops, whiles = _count(getattr(closed, "jaxpr", closed), pick)
  return Count(flops, whiles)


def matmul_flops(fn, *args, **kwargs) -> Count:
  """Matmul FLOPs of `fn(*args, **kwargs)` over all devices (`Count`)."""
  if hasattr(fn, "trace"):
    # A jit traced at top level: `make_jaxpr` would trace it nested, which
    # jax refuses for a jit that carries compiler options.
    return count_jaxpr(fn.trace(*args, **kwargs).jaxpr)
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
