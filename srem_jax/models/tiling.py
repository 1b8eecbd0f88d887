"""All-pairs scoring of many images against many captions, block by block.

Owns `score_all`: it cuts the embeddings into fixed-shape tiles (the last
tile of each side padded by repeating its final row, then cropped), so a
jitted block scorer compiles once and memory is bounded by one tile. Given
each caption's length and bucket lengths (`srem_jax.padding`), captions are
visited in order of length and each caption tile keeps only the word
positions of its bucket: one compiled shape per bucket, and a tile of short
captions costs what its captions need. The matrix keeps the original order.

    score_fn = jax.jit(lambda i, c: model.apply(variables, i, c, train=False,
                                                method=SGRAF.score))
    sims = score_all(score_fn, img, cap, img_tile=128, cap_tile=256)  # (N, M)
    sims = score_all(score_fn, img, cap, img_tile=128, cap_tile=256,
                     cap_lengths=cap.mask.sum(1), buckets=(8, 16, 32, 77))
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from srem_jax import padding


def _tile(embedding: NamedTuple, start: int, size: int) -> NamedTuple:
  """Rows [start, start + size) of every field, edge-padded to `size` rows."""

  def take(x):
    block = x[start : start + size]
    short = size - block.shape[0]
    if short:
      # Stay where the data lives: host arrays on the host, device arrays on device.
      xp = np if isinstance(x, np.ndarray) else jnp
      block = xp.concatenate([block, xp.repeat(block[-1:], short, axis=0)], axis=0)
    return block

  return type(embedding)(*(take(x) for x in embedding))


def _gather_tile(embedding: NamedTuple, rows: np.ndarray, size: int) -> NamedTuple:
  """Rows `rows` of every field, padded to `size` rows by repeating the last."""
  rows = np.concatenate([rows, np.full(size - len(rows), rows[-1])])
  return type(embedding)(*(x[rows] for x in embedding))


def _trim_words(cap: NamedTuple, length: int) -> NamedTuple:
  """The first `length` word positions of a caption tile (words and mask)."""
  return cap._replace(words=cap.words[:, :length], mask=cap.mask[:, :length])


def caption_tiles(cap_lengths, cap_tile: int, buckets):
  """[(caption indices, padded length)] of each tile, shortest captions first.

  A stable sort, so equal lengths keep their order; every index once.
  """
  order = np.argsort(np.asarray(cap_lengths), kind="stable")
  tiles = padding.tile_lengths(np.asarray(cap_lengths)[order], cap_tile, buckets)
  return [
    (order[start : start + cap_tile], int(length))
    for start, length in zip(range(0, len(order), cap_tile), tiles)
  ]


def score_all(
  score_fn: Callable,
  img: NamedTuple,
  cap: NamedTuple,
  *,
  img_tile: int,
  cap_tile: int,
  progress: Optional[Callable[[int, int], None]] = None,
  cap_lengths: Optional[np.ndarray] = None,
  buckets: Optional[tuple[int, ...]] = None,
) -> np.ndarray:
  """Full (N_img, N_cap) float32 matrix from `score_fn(img_block, cap_block)`.

  Tiles are min(tile, count) rows, so small inputs are not padded beyond
  their size. Without `buckets` every call sees one shape; with them (and
  `cap_lengths`, each caption's real words) caption tiles follow the order
  of length and hold the words of their bucket only (`caption_tiles`), one
  shape per bucket used. `progress(done, total)` is called after each tile.
  """
  num_img, num_cap = img[0].shape[0], cap[0].shape[0]
  img_tile, cap_tile = min(img_tile, num_img), min(cap_tile, num_cap)
  img_starts = range(0, num_img, img_tile)
  if buckets is None:
    tiles = [(slice(j, min(j + cap_tile, num_cap)), None)
             for j in range(0, num_cap, cap_tile)]  # fmt: skip
  else:
    tiles = caption_tiles(cap_lengths, cap_tile, buckets)
  total = len(img_starts) * len(tiles)
  sims = np.empty((num_img, num_cap), np.float32)
  done = 0
  for i in img_starts:
    img_block = _tile(img, i, img_tile)
    for columns, length in tiles:
      if length is None:
        cap_block = _tile(cap, columns.start, cap_tile)
        cols = columns.stop - columns.start
      else:
        cap_block = _trim_words(_gather_tile(cap, columns, cap_tile), length)
        cols = len(columns)
      block = np.asarray(jax.device_get(score_fn(img_block, cap_block)))
      rows = min(img_tile, num_img - i)
      sims[i : i + rows, columns] = block[:rows, :cols]
      done += 1
      if progress is not None:
        progress(done, total)
  return sims
