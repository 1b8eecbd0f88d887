"""All-pairs retrieval scoring on the devices: embed once, score in place.

`embed_split` embeds the first `num_images` images of a split and their
captions exactly once; the embeddings stay on the devices:

- images as (blocks, img_tile, ...) arrays whose rows are split over the
  mesh ("data" axis), one block per scoring call;
- captions sorted by length once and cut into tiles of `cap_tile`; the tiles
  of each caption-length bucket (`srem_jax.padding`) form one replicated
  (tiles, cap_tile, bucket length, ...) array, so a tile is padded only to
  its own bucket.

`score_embedded` makes one jitted call per image block against every caption
tile (`lax.map` over each bucket's tiles), which returns the block's row of
the matrix, columns back in the original caption order. Block k+1 is enqueued
before block k is fetched (dispatch is asynchronous), so the one transfer
per block overlaps the next block's compute. Device memory holds the
embeddings and two blocks' rows; the host holds only the matrix. The
evaluator (`srem_jax.eval.evaluator`) ranks what these return.

    emb = embed_split(model, variables, split, mesh, caption_len=40,
                      num_images=1000, batch_size=128, img_tile=128,
                      cap_tile=256, buckets=(40,), plan=plan)
    sims = score_embedded(model, variables, emb, mesh, plan=plan)  # (1000, 5000)
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from srem_jax import execution, sharding
from srem_jax.data import pipeline
from srem_jax.models import tiling
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Functions(NamedTuple):
  encode_images: callable
  encode_captions: callable
  score_block: callable


@functools.lru_cache(maxsize=8)
def eval_functions(model, mesh, plan=None) -> Functions:
  """Jitted encoders and block scorer, built once per (model, mesh, plan)
  with the execution `plan`'s compiler options (None: XLA's).

  Validation runs every epoch; fresh functions each time would recompile
  every epoch. Linen modules hash by their fields.
  """
  rows = sharding.data_sharding(mesh)
  full = sharding.replicated(mesh)
  options = execution.compiler_options(plan)
  encode_images = jax.jit(
    lambda v, x: model.apply(v, x, train=False, method=SGRAF.encode_images),
    compiler_options=options,
  )
  encode_captions = jax.jit(
    lambda v, t, n: model.apply(v, t, n, train=False, method=SGRAF.encode_captions),
    compiler_options=options,
  )

  def score_block(v, images, k, buckets, columns):
    img = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, 0, False), images)
    img = jax.lax.with_sharding_constraint(img, rows)

    def tile(cap):
      return model.apply(v, img, cap, train=False, method=SGRAF.score)

    parts = []
    for cap_tiles in buckets:  # one bucket's tiles: (tiles, cap_tile, length, E)
      block = jax.lax.map(tile, cap_tiles)  # (tiles, img_tile, cap_tile)
      parts.append(jnp.swapaxes(block, 0, 1).reshape(block.shape[1], -1))
    # Columns in length order (padding of the last tile at the end) -> original.
    return jnp.concatenate(parts, axis=1)[:, columns].astype(jnp.float32)

  return Functions(
    encode_images,
    encode_captions,
    jax.jit(score_block, out_shardings=full, compiler_options=options),
  )


# The layout below only concatenates, pads, gathers and reshapes embeddings
# (no products): it compiles in little time at XLA's default effort, so it
# keeps one module-level jit rather than one per plan.
@functools.partial(jax.jit, static_argnames=("count", "img_tile", "where"))
def _image_blocks(parts, *, count, img_tile, where):
  """Encoder batches -> (blocks, img_tile, ...), the last block edge-padded."""

  def blocks(*xs):
    x = jnp.concatenate(xs)[:count]
    short = _round_up(count, img_tile) - count
    x = jnp.concatenate([x, jnp.repeat(x[-1:], short, axis=0)]) if short else x
    x = x.reshape((-1, img_tile) + x.shape[1:])
    return jax.lax.with_sharding_constraint(x, where)

  return jax.tree.map(blocks, *parts)


@functools.partial(jax.jit, static_argnames=("lengths", "cap_tile", "where"))
def _caption_buckets(parts, rows, *, lengths, cap_tile, where):
  """Encoder batches -> per bucket (tiles, cap_tile, length, ...) of rows `rows`."""
  cap = CaptionEmbedding(*(jnp.concatenate(xs) for xs in zip(*parts)))
  out = []
  for index, length in zip(rows, lengths):
    tiles = CaptionEmbedding(
      cap.words[index, :length], cap.glob[index], cap.mask[index, :length]
    )
    tiles = jax.tree.map(lambda x: x.reshape((-1, cap_tile) + x.shape[1:]), tiles)
    out.append(jax.lax.with_sharding_constraint(tiles, where))
  return tuple(out)


class Embedded(NamedTuple):
  """A split's embeddings on the devices, laid out for scoring."""

  images: ImageEmbedding  # (blocks, img_tile, ...), rows over the mesh
  buckets: tuple[CaptionEmbedding, ...]  # per bucket (tiles, cap_tile, ...)
  columns: jax.Array  # (captions,) column of each caption in length order
  num_images: int
  tiles: int  # caption tiles in all
  cap_to_img: np.ndarray  # (captions,) the clean image of each caption


def _tiles(lengths, cap_tile, buckets, static_len):
  """[(caption indices, padded length)] per tile: by length with buckets."""
  if len(buckets) > 1:
    return tiling.caption_tiles(lengths, cap_tile, buckets)
  order = np.arange(len(lengths))
  return [(order[j : j + cap_tile], static_len) for j in range(0, len(order), cap_tile)]


def embed_split(
  model, variables, split, mesh, *, caption_len, num_images, batch_size, img_tile,
  cap_tile, buckets, plan=None,
) -> Embedded:  # fmt: skip
  """Embeds the first `num_images` images and their captions, each once, in
  batches of `batch_size` (rounded up to the devices), with encoders
  compiled with the execution `plan`'s compiler options."""
  devices = mesh.devices.size
  batch_size = _round_up(batch_size, devices)
  pindex, pcount = jax.process_index(), jax.process_count()
  fns = eval_functions(model, mesh, plan)
  images = [
    fns.encode_images(variables, sharding.global_batch(batch, mesh)["images"])
    for batch in pipeline.image_batches(
      split, batch_size, num_images=num_images, process_index=pindex,
      process_count=pcount,
    )
  ]  # fmt: skip
  captions = [
    fns.encode_captions(variables, b["tokens"], b["lengths"])
    for b in (
      sharding.global_batch(batch, mesh)
      for batch in pipeline.caption_batches(
        split, batch_size, caption_len, num_images=num_images,
        process_index=pindex, process_count=pcount,
      )
    )
  ]  # fmt: skip
  cap_index = np.flatnonzero(split.cap_to_img < num_images)
  lengths = sharding.to_host(jnp.concatenate([c.mask.sum(axis=1) for c in captions]))
  # Global batches are the padded chunks of one index list in order, so
  # the real rows come first once the batches are concatenated.
  return lay_out(
    images,
    captions,
    num_images,
    lengths[: len(cap_index)],
    split.cap_to_img[cap_index],
    mesh=mesh,
    img_tile=img_tile,
    cap_tile=cap_tile,
    buckets=buckets,
  )


def lay_out(
  images, captions, num_images, lengths, cap_to_img, *, mesh, img_tile, cap_tile,
  buckets,
) -> Embedded:  # fmt: skip
  """Device embeddings in batches (lists of `ImageEmbedding`/`CaptionEmbedding`
  whose real rows come first) laid out for `score_embedded`.

  `lengths` are the captions' real words. With several `buckets` the caption
  tiles follow the order of length and keep their bucket's words only; with
  one, every tile keeps all `buckets[0]` positions, in the original order.
  """
  devices = mesh.devices.size
  img_tile = min(_round_up(img_tile, devices), _round_up(num_images, devices))
  blocks = _image_blocks(
    images,
    count=num_images,
    img_tile=img_tile,
    where=NamedSharding(mesh, PartitionSpec(None, sharding.DATA_AXIS)),
  )
  cap_tile = min(cap_tile, len(lengths))
  tiles = _tiles(lengths, cap_tile, buckets, buckets[-1])
  groups = {}  # padded length -> its tiles' rows, each tile padded to cap_tile
  for rows, length in tiles:
    rows = np.concatenate([rows, np.full(cap_tile - len(rows), rows[-1])])
    groups.setdefault(length, []).append(rows)
  full = sharding.replicated(mesh)
  order = np.concatenate([rows for rows, _ in tiles])
  caption_tiles = _caption_buckets(
    captions,
    tuple(
      sharding.place(np.concatenate(g).astype(np.int32), full) for g in groups.values()
    ),
    lengths=tuple(groups),
    cap_tile=cap_tile,
    where=full,
  )
  return Embedded(
    images=blocks,
    buckets=caption_tiles,
    columns=sharding.place(np.argsort(order).astype(np.int32), full),
    num_images=num_images,
    tiles=len(tiles),
    cap_to_img=np.asarray(cap_to_img),
  )


def score_embedded(
  model, variables, emb: Embedded, mesh, progress=None, *, plan=None
) -> np.ndarray:
  """The (images, captions) float32 matrix; one transfer per image block,
  scored by a jit compiled with the execution `plan`'s compiler options."""
  score_block = eval_functions(model, mesh, plan).score_block
  full = sharding.replicated(mesh)
  blocks, img_tile = emb.images.local.shape[:2]
  sims = np.empty((emb.num_images, len(emb.cap_to_img)), np.float32)

  def fetch(k, block):
    rows = min(img_tile, emb.num_images - k * img_tile)
    sims[k * img_tile : k * img_tile + rows] = sharding.to_host(block)[:rows]
    if progress is not None:
      for t in range(k * emb.tiles, (k + 1) * emb.tiles):
        progress(t + 1, blocks * emb.tiles)

  pending = None
  for k in range(blocks):
    index = sharding.place(np.int32(k), full)
    block = score_block(variables, emb.images, index, emb.buckets, emb.columns)
    if pending is not None:
      fetch(*pending)  # block k is already queued behind block k - 1
    pending = (k, block)
  fetch(*pending)
  return sims
