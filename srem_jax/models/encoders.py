"""SGRAF building blocks with PyTorch's exact semantics (docs/method.md §Network).

Owns the normalisations (`l2_normalize`, `l1_normalize`), the Xavier-uniform
`dense` layer the reference uses everywhere, `TorchBatchNorm` (PyTorch's
running-statistics convention), the image encoder and the bidirectional-GRU
text encoder. Parameter names follow the PyTorch modules (`fc`, `embed`,
`cap_rnn`) so a checkpoint maps onto them one to one.

    enc = TextEncoder(vocab_size=50, word_dim=8, embed_dim=16, dropout=0.4)
    variables = enc.init(key, tokens, lengths, train=False)
    words = enc.apply(variables, tokens, lengths, train=False)  # (M, L, 16)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from srem_jax.models.numerics import dot_general_for, lax_precision, matmul

NORM_EPS = 1e-8
TORCH_BN_MOMENTUM = 0.1  # PyTorch's convention: new = (1 - m) * old + m * batch
TORCH_BN_EPS = 1e-5


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / (||x||_2 + 1e-8), the reference's `l2norm` (eps outside the root).

  Zero vectors (padding) stay zero with a finite gradient: the square root is
  never differentiated at 0.
  """
  wide = x.astype(jnp.float32)  # bfloat16 inputs: the norm is summed in float32
  squares = jnp.sum(wide * wide, axis=axis, keepdims=True)
  nonzero = squares > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)
  return (wide / (norm + NORM_EPS)).astype(x.dtype)


def l1_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / (sum|x| + 1e-8), the reference's `l1norm`."""
  return x / (jnp.sum(jnp.abs(x), axis=axis, keepdims=True) + NORM_EPS)


def dense(features: int, dtype: Any, name: str, precision: str = "highest") -> nn.Dense:
  """Linear layer initialised like the reference: U(+-sqrt(6/(in+out))), bias 0.

  Inputs and kernel are cast to `dtype`; products accumulate and come out in
  float32 (see `numerics.dot_general_for` for the backward pass under bfloat16).
  """
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    precision=lax_precision(precision),
    dot_general=dot_general_for(dtype),
    kernel_init=nn.initializers.xavier_uniform(),
    bias_init=nn.initializers.zeros,
    name=name,
  )


def torch_running_update(running, batch_mean, batch_var, count):
  """One PyTorch running-statistics update; the variance is made unbiased."""
  unbiased = batch_var * count / jnp.maximum(count - 1, 1)
  mean = (1 - TORCH_BN_MOMENTUM) * running[0] + TORCH_BN_MOMENTUM * batch_mean
  var = (1 - TORCH_BN_MOMENTUM) * running[1] + TORCH_BN_MOMENTUM * unbiased
  return mean, var


class TorchBatchNorm(nn.Module):
  """`torch.nn.BatchNorm1d` on the channel axis `channel_axis` of x.

  Train mode normalises with the biased batch variance and updates the running
  statistics with the unbiased one (momentum 0.1, PyTorch's convention); eval
  mode uses the running statistics. Statistics are over every other axis.
  """

  channel_axis: int

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    axis = self.channel_axis % x.ndim
    channels = x.shape[axis]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    mean_var = self.variable("batch_stats", "mean", jnp.zeros, (channels,))
    var_var = self.variable("batch_stats", "var", jnp.ones, (channels,))
    shape = [1] * x.ndim
    shape[axis] = channels
    x = x.astype(jnp.float32)
    if train:
      reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
      mean = jnp.mean(x, axis=reduce_axes)
      var = jnp.mean(jnp.square(x - mean.reshape(shape)), axis=reduce_axes)
      if not self.is_initializing():
        count = x.size // channels
        mean_var.value, var_var.value = torch_running_update(
          (mean_var.value, var_var.value), mean, var, count
        )
    else:
      mean, var = mean_var.value, var_var.value
    inv = scale * jax.lax.rsqrt(var + TORCH_BN_EPS)
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


class ImageEncoder(nn.Module):
  """Regions (N, R, img_dim) -> l2-normalised local embeddings (N, R, E)."""

  embed_dim: int
  dtype: Any = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    regions = dense(self.embed_dim, self.dtype, "fc", self.precision)(images)
    return l2_normalize(regions.astype(jnp.float32))


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BiGRU(nn.Module):
  """One-layer bidirectional GRU over padded sequences, packed semantics.

  Gates are stacked (r, z, n) along the last kernel axis like PyTorch's
  `weight_ih_l0` rows. The backward direction reads each sequence from its
  last real step, and padding never touches either state. The input
  projections of every step and both directions are one matmul before the
  time scan. Returns (forward, backward) outputs, zero at padded steps.
  """

  hidden: int
  dtype: Any = jnp.float32
  precision: str = "highest"
  # Set when the captions' rows are split over this axis of the context mesh
  # (`jax.sharding.use_abstract_mesh`): the recurrence then runs per device under shard_map.
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array):
    in_dim, hidden = x.shape[-1], self.hidden
    init = _uniform(1.0 / hidden**0.5)

    def direction_params(name):
      shapes = {
        "input_kernel": (in_dim, 3 * hidden),
        "hidden_kernel": (hidden, 3 * hidden),
        "input_bias": (3 * hidden,),
        "hidden_bias": (3 * hidden,),
      }
      return {k: self.param(f"{name}_{k}", init, shape) for k, shape in shapes.items()}

    fwd, bwd = direction_params("forward"), direction_params("backward")
    lengths = jnp.sum(mask, axis=1)
    steps = jnp.arange(x.shape[1])
    # Backward reads position len-1-t at step t; the map is its own inverse.
    reverse_index = jnp.where(mask, lengths[:, None] - 1 - steps, steps)

    input_kernel = jnp.concatenate([fwd["input_kernel"], bwd["input_kernel"]], -1)
    input_bias = jnp.concatenate([fwd["input_bias"], bwd["input_bias"]])
    projected = matmul("mli,ig->mlg", x, input_kernel, self.dtype, self.precision)
    projected = projected + input_bias
    proj_fwd, proj_bwd = jnp.split(projected, 2, axis=-1)
    proj_bwd = jnp.take_along_axis(proj_bwd, reverse_index[..., None], axis=1)

    hidden_kernel = jnp.stack([fwd["hidden_kernel"], bwd["hidden_kernel"]])
    hidden_bias = jnp.stack([fwd["hidden_bias"], bwd["hidden_bias"]])

    def step(carry, inputs):
      h, hidden_kernel, hidden_bias = carry
      gates_x, valid = inputs  # (2, M, 3H), (M,)
      gates_h = (
        matmul("dmh,dhg->dmg", h, hidden_kernel, self.dtype, self.precision)
        + hidden_bias[:, None, :]
      )
      xr, xz, xn = jnp.split(gates_x, 3, axis=-1)
      hr, hz, hn = jnp.split(gates_h, 3, axis=-1)
      r = jax.nn.sigmoid(xr + hr)
      z = jax.nn.sigmoid(xz + hz)
      n = jnp.tanh(xn + r * hn)
      h_new = (1 - z) * n + z * h
      h = jnp.where(valid[None, :, None], h_new, h)
      return (h, hidden_kernel, hidden_bias), jnp.where(valid[None, :, None], h, 0.0)

    def recurrence(hidden_kernel, hidden_bias, gates, mask, vary=lambda x: x):
      h0 = jnp.zeros((2, gates.shape[2], hidden), jnp.float32)
      carry = tuple(map(vary, (h0, hidden_kernel, hidden_bias)))
      return jax.lax.scan(step, carry, (gates, mask))[1]

    gates = jnp.stack([proj_fwd, proj_bwd])  # (2, M, L, 3H)
    args = (hidden_kernel, hidden_bias, jnp.moveaxis(gates, 2, 0), mask.T)
    if self.axis_name is None:
      outputs = recurrence(*args)
    else:
      # Rows are independent: each device runs the recurrence on its own
      # captions. The weights enter as device-varying values, so their
      # gradient is summed over devices once, after the backward loop, instead
      # of in every time step (GSPMD keeps a replicated accumulator in it).
      vary = lambda x: jax.lax.pcast(x, self.axis_name, to="varying")
      rows = P(None, None, self.axis_name)
      outputs = jax.shard_map(
        lambda w, b, g, m: recurrence(w, b, g, m, vary),
        in_specs=(P(), P(), rows, P(None, self.axis_name)),
        out_specs=rows,
      )(*args)
    outputs = jnp.moveaxis(outputs, 0, 2)  # (2, M, L, H)
    out_bwd = jnp.take_along_axis(outputs[1], reverse_index[..., None], axis=1)
    return outputs[0], out_bwd


class TextEncoder(nn.Module):
  """Tokens (M, L) -> l2-normalised word embeddings (M, L, E), padding exactly 0.

  `lengths` counts <start> and <end>; positions at or past it are padding.
  """

  vocab_size: int
  word_dim: int
  embed_dim: int
  dropout: float
  dtype: Any = jnp.float32
  precision: str = "highest"
  axis_name: str | None = None  # see BiGRU

  @nn.compact
  def __call__(self, tokens, lengths, *, train: bool) -> jax.Array:
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    embed = nn.Embed(
      self.vocab_size,
      self.word_dim,
      embedding_init=_uniform(0.1),
      name="embed",
    )
    words = nn.Dropout(self.dropout)(embed(tokens), deterministic=not train)
    forward, backward = BiGRU(
      self.embed_dim, self.dtype, self.precision, self.axis_name, name="cap_rnn"
    )(words, mask)
    return jnp.where(mask[..., None], l2_normalize((forward + backward) / 2), 0.0)
