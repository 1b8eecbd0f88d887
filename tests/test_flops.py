"""Matmul FLOPs counted from a program's jaxpr, against hand counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from srem_jax.compile.flops import count_jaxpr, dot_general_flops, matmul_flops

X = jax.ShapeDtypeStruct((6, 5), jnp.float32)
W = jax.ShapeDtypeStruct((5, 7), jnp.float32)
MATMUL = 2 * 6 * 5 * 7  # (6, 5) x (5, 7)


def test_a_batched_contraction_counts_batch_free_and_contracted_sizes():
  # "bij,bjk->bik" with b=3, i=4, j=5, k=2: 2 * 3 * 4 * 2 * 5
  assert dot_general_flops((3, 4, 5), (3, 5, 2), (([2], [1]), ([0], [0]))) == 240
  a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 2))
  assert matmul_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b).flops == 240


def test_nested_jit_and_elementwise_work():
  inner = jax.jit(lambda x, w: jnp.tanh(x @ w))
  count = matmul_flops(jax.jit(lambda x, w: inner(x, w) + inner(x * 2, w)), X, W)
  assert count.flops == 2 * MATMUL and count.while_loops == 0


def test_a_scan_counts_every_iteration():
  def f(x, w):
    def body(carry, row):
      return carry + row @ w, None

    return jax.lax.scan(body, jnp.zeros(7), x)[0]

  # 6 iterations of a (5,) x (5, 7) product
  assert matmul_flops(f, X, W).flops == 6 * 2 * 5 * 7


def test_a_while_loop_counts_once_and_is_reported():
  def f(x, w):
    return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w @ w.T, c[1] + 1),
                              (x, 0))[0]  # fmt: skip

  count = matmul_flops(f, X, W)
  assert count.flops == 2 * MATMUL and count.while_loops == 1


def test_a_switch_counts_its_largest_branch():
  def f(i, x, w):
    return jax.lax.switch(i, [lambda x, w: x @ w, lambda x, w: (x @ w) @ w.T @ w], x, w)

  # branch 1: (6,5)x(5,7), (6,7)x(7,5), (6,5)x(5,7)
  count = matmul_flops(f, jnp.int32(0), X, W)
  assert count.flops == 3 * MATMUL


def test_count_jaxpr_counts_the_branch_picked():
  branches = [lambda x, w: x @ w, lambda x, w: x @ w @ w.T @ w]
  f = jax.jit(lambda i, x, w: jax.lax.switch(i, branches, x, w))
  closed = f.trace(jnp.int32(0), X, W).jaxpr
  assert count_jaxpr(closed, pick=lambda counts: counts[0]).flops == MATMUL
  assert count_jaxpr(closed).flops == 3 * MATMUL


def test_a_jit_with_compiler_options_is_counted():
  # make_jaxpr would trace it inside another trace, which jax refuses.
  f = jax.jit(lambda x, w: x @ w, compiler_options={"xla_embed_ir_in_executable": True})
  assert matmul_flops(f, X, W).flops == MATMUL


def test_the_gradient_holds_the_backward_products():
  loss = lambda x, w: jnp.sum(jnp.tanh(x @ w))
  # forward x @ w, backward dL/dx = g @ w.T and dL/dw = x.T @ g
  assert matmul_flops(jax.grad(loss, argnums=(0, 1)), X, W).flops == 3 * MATMUL
  remat = jax.checkpoint(lambda x, w: jnp.tanh(x @ w))
  f = jax.grad(lambda x, w: jnp.sum(jnp.tanh(remat(x, w) @ w.T)), argnums=1)
  # forward 2, the rematerialised product again, and the backward's three:
  # dh = g w and dw = g^T h for the outer product, dw = x^T dz inside
  assert matmul_flops(f, X, W).flops == 6 * MATMUL


@pytest.mark.skipif(
  len(jax.devices()) < 2, reason="needs 2 host devices (tests/conftest.py sets 8)"
)
def test_a_shard_map_body_counts_once_per_device():
  mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  f = jax.jit(
    jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
  )
  x = jax.ShapeDtypeStruct((6, 5), jnp.float32, sharding=NamedSharding(mesh, P("d")))
  w = jax.ShapeDtypeStruct((5, 7), jnp.float32, sharding=NamedSharding(mesh, P()))
  assert matmul_flops(f, x, w).flops == MATMUL


def test_counts_a_model_head_by_hand():
  """SGR's pair head at tiny sizes: the attention, context, node and graph
  products written out per pair (heads.PairHead, GraphReasoning)."""
  from srem_jax.models.heads import PairHead

  n, c, r, length, e, s, steps = 3, 2, 4, 5, 8, 6, 3
  head = PairHead("sgr", sim_dim=s, sgr_steps=steps, smooth=9.0, train=False)
  rng = np.random.default_rng(0)
  images = (jnp.asarray(rng.random((n, r, e)), jnp.float32),
            jnp.asarray(rng.random((n, e)), jnp.float32))  # fmt: skip
  mask = jnp.ones((c, length), bool)
  captions = (jnp.asarray(rng.random((c, length, e)), jnp.float32),
              jnp.asarray(rng.random((c, e)), jnp.float32), mask)  # fmt: skip
  variables = head.init(jax.random.key(0), None, images, captions, None)
  apply = lambda v, i, t: head.apply(v, None, i, t, None)
  counted = matmul_flops(apply, variables, images, captions).flops
  k = length + 1  # nodes: the global one and one per word
  per_pair = (
    r * length * e  # attention logits
    + r * length * e  # attended context
    + length * e * s  # local nodes
    + e * s  # global node
    + (steps - 1) * (k * s * 2 * s + 2 * k * k * s)  # full graph steps
    + (s * s + 2 * k * s + s * s)  # last step: node 0's row only
    + s  # the score
  )
  # Each step folds its query and key layers once per call: W_q W_k^T, W_k b_q.
  folding = steps * (s * s * s + s * s)
  assert counted == 2 * (n * c * per_pair + folding)

