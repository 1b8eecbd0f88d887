"""The SGRAF similarity network (docs/method.md §Network): encoders plus an
SGR or SAF head.

Owns `SGRAF`, the embeddings it passes between its stages
(`ImageEmbedding`, `CaptionEmbedding`) and `build_model` from
`config.model`. Embedding and scoring are separate methods so evaluation can
embed every image and caption once and score them tile by tile
(`srem_jax.models.tiling.score_all`).

    model = build_model(config.model, 8481, execution.resolve(config.execution))
    variables = model.init(key, images, tokens, lengths, train=False)
    sims = model.apply(variables, images, tokens, lengths, train=False)  # (N, M)
    img = model.apply(variables, images, train=False, method=SGRAF.encode_images)
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from srem_jax.models.attention import TextSA, VisualSA
from srem_jax.models.encoders import ImageEncoder, TextEncoder
from srem_jax.models.heads import SimilarityHead

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ImageEmbedding(NamedTuple):
  local: jax.Array  # (N, R, E) l2-normalised regions
  glob: jax.Array  # (N, E) VisualSA vector


class CaptionEmbedding(NamedTuple):
  words: jax.Array  # (M, L, E) l2-normalised words, padded positions exactly 0
  glob: jax.Array  # (M, E) TextSA vector
  mask: jax.Array  # (M, L) True at real words


class SGRAF(nn.Module):
  """Image regions and caption tokens -> (N, M) similarities in (0, 1)."""

  vocab_size: int
  head: str = "sgr"
  img_dim: int = 2048
  embed_dim: int = 1024
  word_dim: int = 300
  sim_dim: int = 256
  sgr_steps: int = 3
  dropout: float = 0.4
  smooth: float = 9.0
  dtype: Any = jnp.float32
  # Execution sizes (`srem_jax.execution`): they change how the work is cut
  # into scan steps, not what is computed.
  cap_chunk: int = 4  # captions per scan step (scoring, SAF training)
  remat: str = "dots"  # what a chunk keeps for backward: none | full | dots
  img_chunk: int = 4  # images per device per scan step (SGR training)
  precision: str = "highest"  # matmul precision: highest | high | default
  # Captions per length group in SGR training (`SimilarityHead`); 0 scores
  # every caption at the batch's padded length.
  length_group: int = 32
  # The data axis of the context mesh, set by the train step: the head and
  # the text GRU then run per device under shard_map (SAF's train-mode
  # statistics are summed over the axis).
  axis_name: str | None = None

  def setup(self):
    numerics = dict(dtype=self.dtype, precision=self.precision)
    self.img_enc = ImageEncoder(self.embed_dim, **numerics)
    self.txt_enc = TextEncoder(
      self.vocab_size,
      self.word_dim,
      self.embed_dim,
      self.dropout,
      axis_name=self.axis_name,
      **numerics,
    )
    self.v_global_w = VisualSA(self.embed_dim, self.dropout, **numerics)
    self.t_global_w = TextSA(self.embed_dim, self.dropout, **numerics)
    self.sim_enc = SimilarityHead(
      self.head,
      self.sim_dim,
      self.sgr_steps,
      self.smooth,
      cap_chunk=self.cap_chunk,
      remat=self.remat,
      img_chunk=self.img_chunk,
      axis_name=self.axis_name,
      length_group=self.length_group,
      **numerics,
    )

  def encode_images(self, images: jax.Array, *, train: bool) -> ImageEmbedding:
    local = self.img_enc(images)
    return ImageEmbedding(local, self.v_global_w(local, train=train))

  def encode_captions(self, tokens, lengths, *, train: bool) -> CaptionEmbedding:
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    words = self.txt_enc(tokens, lengths, train=train)
    return CaptionEmbedding(words, self.t_global_w(words, mask, train=train), mask)

  def score(self, img: ImageEmbedding, cap: CaptionEmbedding, *, train: bool):
    return self.sim_enc(img.local, img.glob, cap.words, cap.glob, cap.mask, train=train)

  def __call__(self, images, tokens, lengths, *, train: bool) -> jax.Array:
    img = self.encode_images(images, train=train)
    cap = self.encode_captions(tokens, lengths, train=train)
    return self.score(img, cap, train=train)


def build_model(model_cfg, vocab_size: int, plan) -> SGRAF:
  """SGRAF from a checked `config.model`, cut into pieces as the resolved
  execution `plan` says (`execution.resolve`: its `model_kwargs`)."""
  return SGRAF(
    vocab_size=vocab_size,
    head=model_cfg.head,
    img_dim=model_cfg.img_dim,
    embed_dim=model_cfg.embed_dim,
    word_dim=model_cfg.word_dim,
    sim_dim=model_cfg.sim_dim,
    sgr_steps=model_cfg.sgr_steps,
    dropout=model_cfg.dropout,
    smooth=model_cfg.smooth,
    dtype=DTYPES[model_cfg.dtype],
    **plan.model_kwargs(),
  )
