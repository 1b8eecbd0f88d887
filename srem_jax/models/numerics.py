"""Every matmul of the model: its operand dtype, precision and backward pass.

Owns `matmul` (an einsum with both operands cast to the model's dtype,
float32 output, an explicit precision), `dot_general_for` (the same for
`nn.Dense`), the bfloat16 product whose backward products also run in
bfloat16, and `on_cpu`, which picks a CPU-only formulation at lowering time.

Precision is one of `srem_jax.execution.PRECISIONS` ("highest" = exact
float32 products on GPU and TPU too). Operands in bfloat16 are multiplied
exactly under any precision, accumulated and returned in float32.

CPU-only formulations: XLA's CPU runtime (jaxlib 0.10) has a
bf16 x bf16 -> f32 kernel only for some operand layouts, so on the CPU the
backward products of a bf16 matmul are laid out as (batch, M, K) x
(batch, N, K) behind an optimisation barrier. GPUs and TPUs get the plain
`dot_general`, which their compilers lay out themselves; `on_cpu` makes the
choice when a program is lowered, so a program exported for `cuda` or `tpu`
holds no trace of the CPU path.

    y = matmul("nre,cle->nrcl", local, words, jnp.bfloat16, "highest")
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# "highest": exact float32 products on every platform (what the PyTorch
# reference computes: no TF32 on GPU, 6 bf16 passes on TPU). "high": TF32 on
# GPU, 3 bf16 passes on TPU. "default": the platform's fastest (TF32 on GPU,
# one bf16 pass on TPU), about 1e-3 relative error per product. On the CPU all
# three are exact float32.
PRECISIONS = {
  "highest": jax.lax.Precision.HIGHEST,
  "high": jax.lax.Precision.HIGH,
  "default": jax.lax.Precision.DEFAULT,
}


def lax_precision(precision: str) -> jax.lax.Precision:
  if precision not in PRECISIONS:
    raise ValueError(
      f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}"
    )
  return PRECISIONS[precision]


def on_cpu(cpu_fn: Callable, default_fn: Callable, *args):
  """`cpu_fn(*args)` in programs lowered for the CPU, `default_fn(*args)` in
  those lowered for any other platform. Both must return the same shapes and
  dtypes; only the chosen one is lowered."""
  return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=default_fn)


def _freeze(dims):
  return tuple(tuple(tuple(int(i) for i in axes) for axes in pair) for pair in dims)


def _plain_product(a, b, contract, batch, precision):
  """dot_general(a, b) with float32 output: batch axes, a's free, b's free."""
  return jax.lax.dot_general(
    a, b, (contract, batch), precision, preferred_element_type=jnp.float32
  )


def _canonical_product(a, b, contract, batch, precision):
  """`_plain_product` as one (batch, M, K) x (batch, N, K) product: the
  layout XLA's CPU runtime has a bf16 x bf16 -> f32 kernel for (it lacks one
  for e.g. xᵀ·g, the weight gradient). The optimisation barrier keeps XLA
  from folding the transposes back into the product."""
  (ac, bc), (ab, bb) = contract, batch
  a_free = [x for x in range(a.ndim) if x not in ac and x not in ab]
  b_free = [x for x in range(b.ndim) if x not in bc and x not in bb]
  size = lambda x, axes: int(np.prod([x.shape[i] for i in axes], dtype=np.int64))
  batch_shape = [a.shape[i] for i in ab]
  a3 = jnp.transpose(a, [*ab, *a_free, *ac]).reshape(
    size(a, ab), size(a, a_free), size(a, ac)
  )
  b3 = jnp.transpose(b, [*bb, *b_free, *bc]).reshape(
    size(b, bb), size(b, b_free), size(b, bc)
  )
  a3, b3 = jax.lax.optimization_barrier((a3, b3))
  out = _plain_product(a3, b3, ((2,), (2,)), ((0,), (0,)), precision)
  free_shape = [a.shape[i] for i in a_free] + [b.shape[i] for i in b_free]
  return out.reshape(batch_shape + free_shape)


def _transposed_product(g, target, other, dims, precision, target_is_lhs, product):
  """Cotangent of `target`, one operand of a dot_general with dimension numbers
  `dims` whose output cotangent is `g`: g contracted with `other` by
  `product`, float32, laid out like `target`."""
  (tc, oc), (tb, ob) = dims
  if not target_is_lhs:
    tc, oc, tb, ob = oc, tc, ob, tb
  target_kept = [a for a in range(target.ndim) if a not in tc and a not in tb]
  other_kept = [a for a in range(other.ndim) if a not in oc and a not in ob]
  # g's axes: batch, then the lhs's kept axes, then the rhs's kept axes.
  n_batch = len(tb)
  offset = n_batch + (len(target_kept) if target_is_lhs else 0)
  g_other_kept = tuple(offset + i for i in range(len(other_kept)))
  out = product(
    g,
    other,
    (g_other_kept, tuple(other_kept)),
    (tuple(range(n_batch)), tuple(ob)),
    precision,
  )
  # out's axes: batch, target's kept axes, then other's contracted axes in
  # ascending order, each standing for the target axis it was paired with.
  order = list(tb) + target_kept + [tc[list(oc).index(a)] for a in sorted(oc)]
  return jnp.transpose(out, [order.index(a) for a in range(target.ndim)])


def backward_products(g, lhs, rhs, dims, precision, path: str):
  """Both operands' cotangents of a bf16 dot_general, bf16 x bf16 products
  accumulated in float32: `path` "cpu" (the CPU runtime's layout) or "plain".
  The two are the same numbers; `low_precision_dot_general` picks by
  platform."""
  product = {"cpu": _canonical_product, "plain": _plain_product}[path]
  g = g.astype(lhs.dtype)
  d_lhs = _transposed_product(g, lhs, rhs, dims, precision, True, product)
  d_rhs = _transposed_product(g, rhs, lhs, dims, precision, False, product)
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_precision_dot(lhs, rhs, dims, precision):
  return _plain_product(lhs, rhs, dims[0], dims[1], precision)


def _low_precision_dot_fwd(lhs, rhs, dims, precision):
  return _low_precision_dot(lhs, rhs, dims, precision), (lhs, rhs)


def _low_precision_dot_bwd(dims, precision, residuals, g):
  # Plain autodiff would multiply the float32 cotangent with the bfloat16
  # operands, promoting both backward products to float32 (no bf16 units).
  # Rounding the cotangent to bf16 keeps them bf16 x bf16, accumulated in
  # float32, as mixed-precision training does.
  lhs, rhs = residuals
  path = lambda name: functools.partial(
    backward_products, dims=dims, precision=precision, path=name
  )
  return on_cpu(path("cpu"), path("plain"), g, lhs, rhs)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def low_precision_dot_general(
  lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_
):
  """`lax.dot_general` on bfloat16 operands with float32 output whose backward
  products also run in bfloat16 (the cotangent is rounded to bfloat16)."""
  return _low_precision_dot(lhs, rhs, _freeze(dimension_numbers), precision)


def dot_general_for(dtype: Any):
  """The dot_general every matmul of the model uses for matmul dtype `dtype`:
  float32 output always; bfloat16 backward products when `dtype` is bf16.
  The precision is the caller's argument."""
  if jnp.dtype(dtype) == jnp.float32:
    return functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
  return low_precision_dot_general


def matmul(
  spec: str, a: jax.Array, b: jax.Array, dtype: Any, precision: str = "highest"
) -> jax.Array:
  """`einsum(spec, a, b)` with both operands cast to `dtype`, float32 output."""
  return jnp.einsum(
    spec,
    a.astype(dtype),
    b.astype(dtype),
    precision=lax_precision(precision),
    preferred_element_type=jnp.float32,
    _dot_general=dot_general_for(dtype),
  )


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax over the entries where mask is True; masked entries get weight 0."""
  logits = jnp.asarray(logits)
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits, axis=axis) * mask
