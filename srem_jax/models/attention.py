"""SGRAF's attended global vectors: `VisualSA` over an image's regions and
`TextSA` over a caption's real words, named as the PyTorch modules
(`v_global_w`, `t_global_w`).

Train-mode BatchNorm and dropout against the reference:
- VisualSA's two BatchNorms see the same images as the reference (all images
  given to `VisualSA` at once), so statistics and updates are identical.
- Dropout in TextSA draws one mask per caption per call, like the reference,
  but from JAX's generator, so the draws themselves differ.

    glob = VisualSA(embed_dim=1024, dropout=0.2).apply(variables, local, train=False)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from srem_jax.models.encoders import TorchBatchNorm, dense, l2_normalize
from srem_jax.models.numerics import masked_softmax


class VisualSA(nn.Module):
  """Attended global image vector; BatchNorm channels are the regions, then E."""

  embed_dim: int
  dropout: float
  dtype: Any = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, local: jax.Array, *, train: bool) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    local_emb = dense(self.embed_dim, self.dtype, "embedding_local", self.precision)(
      local
    )
    local_emb = TorchBatchNorm(channel_axis=1, name="embedding_local_bn")(
      local_emb, train=train
    )
    local_emb = drop(jnp.tanh(local_emb))
    global_emb = dense(self.embed_dim, self.dtype, "embedding_global", self.precision)(
      jnp.mean(local, axis=1)
    )
    global_emb = TorchBatchNorm(channel_axis=-1, name="embedding_global_bn")(
      global_emb, train=train
    )
    global_emb = drop(jnp.tanh(global_emb))
    common = dense(1, self.dtype, "embedding_common", self.precision)(
      local_emb * global_emb[:, None]
    )
    weights = jax.nn.softmax(common[..., 0].astype(jnp.float32), axis=1)
    return l2_normalize(jnp.sum(weights[..., None] * local, axis=1))


class TextSA(nn.Module):
  """Attended global caption vector over real words only (no BatchNorm)."""

  embed_dim: int
  dropout: float
  dtype: Any = jnp.float32
  precision: str = "highest"

  @nn.compact
  def __call__(self, words: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    drop = nn.Dropout(self.dropout, deterministic=not train)
    real = mask[..., None].astype(jnp.float32)
    mean_word = jnp.sum(words * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)
    local_emb = drop(
      jnp.tanh(
        dense(self.embed_dim, self.dtype, "embedding_local", self.precision)(words)
      )
    )
    global_emb = drop(
      jnp.tanh(
        dense(self.embed_dim, self.dtype, "embedding_global", self.precision)(mean_word)
      )
    )
    common = dense(1, self.dtype, "embedding_common", self.precision)(
      local_emb * global_emb[:, None]
    )
    weights = masked_softmax(common[..., 0].astype(jnp.float32), mask, axis=1)
    return l2_normalize(jnp.sum(weights[..., None] * words, axis=1))
