"""All-pairs scoring of many images against many captions, block by block.

Owns `score_all`: it cuts the embeddings into fixed-shape tiles (the last
tile of each side padded by repeating its final row, then cropped), so a
jitted block scorer compiles once and memory is bounded by one tile.

    score_fn = jax.jit(lambda i, c: model.apply(variables, i, c, train=False,
                                                method=SGRAF.score))
    sims = score_all(score_fn, img, cap, img_tile=128, cap_tile=256)  # (N, M)
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


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


def score_all(
  score_fn: Callable,
  img: NamedTuple,
  cap: NamedTuple,
  *,
  img_tile: int,
  cap_tile: int,
  progress: Optional[Callable[[int, int], None]] = None,
) -> np.ndarray:
  """Full (N_img, N_cap) float32 matrix from `score_fn(img_block, cap_block)`.

  Tiles are min(tile, count) rows, so small inputs are not padded beyond
  their size; every call sees one shape. `progress(done, total)` is called
  after each tile.
  """
  num_img, num_cap = img[0].shape[0], cap[0].shape[0]
  img_tile, cap_tile = min(img_tile, num_img), min(cap_tile, num_cap)
  img_starts = range(0, num_img, img_tile)
  cap_starts = range(0, num_cap, cap_tile)
  total = len(img_starts) * len(cap_starts)
  sims = np.empty((num_img, num_cap), np.float32)
  done = 0
  for i in img_starts:
    img_block = _tile(img, i, img_tile)
    for j in cap_starts:
      block = np.asarray(jax.device_get(score_fn(img_block, _tile(cap, j, cap_tile))))
      rows, cols = min(img_tile, num_img - i), min(cap_tile, num_cap - j)
      sims[i : i + rows, j : j + cols] = block[:rows, :cols]
      done += 1
      if progress is not None:
        progress(done, total)
  return sims
