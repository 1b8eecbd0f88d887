"""Caption lengths for predictions without the data (`predict`): Flickr30K's
histogram, and the buckets that batches and tiles of such captions fall in.

Tokens per caption (words plus <start>/<end>) of the Karpathy-split dev and
test captions as shipped in the SCAN f30k_precomp files: length -> number of
captions. A copy of the "splits" of the histogram file `padding.read_histogram`
reads (shared/data/f30k_caption_lengths.json beside the repository), so that
the package predicts run times anywhere. Test: 5,000 captions, 5 to 77 tokens;
dev: 5,070 captions, 6 to 70.

    lengths, counts = histogram("test")  # as `padding.read_histogram` returns
    weights = bucket_weights((lengths, counts), 128, 32, padding.bucket_lengths(77))
"""

import math

import numpy as np

from srem_jax import padding

F30K_CAPTION_LENGTHS = {
  "test": {
    5: 2, 6: 6, 7: 30, 8: 98, 9: 228, 10: 355, 11: 427, 12: 445, 13: 485, 14: 459,
    15: 400, 16: 385, 17: 328, 18: 269, 19: 192, 20: 172, 21: 130, 22: 95, 23: 88,
    24: 74, 25: 69, 26: 37, 27: 33, 28: 35, 29: 26, 30: 23, 31: 22, 32: 15, 33: 13,
    34: 8, 35: 13, 36: 1, 37: 1, 38: 5, 39: 3, 40: 6, 41: 2, 42: 3, 43: 1, 44: 2, 45: 2,
    46: 1, 47: 3, 51: 1, 53: 2, 54: 1, 56: 1, 57: 1, 61: 1, 77: 1,
  },
  "dev": {
    6: 5, 7: 25, 8: 94, 9: 241, 10: 331, 11: 380, 12: 481, 13: 498, 14: 454, 15: 430,
    16: 390, 17: 319, 18: 250, 19: 228, 20: 186, 21: 132, 22: 118, 23: 89, 24: 74,
    25: 58, 26: 39, 27: 46, 28: 41, 29: 28, 30: 24, 31: 28, 32: 16, 33: 13, 34: 6,
    35: 6, 36: 8, 37: 3, 38: 6, 39: 4, 40: 4, 42: 2, 43: 2, 44: 1, 46: 1, 47: 3, 50: 1,
    53: 1, 54: 1, 57: 1, 64: 1, 70: 1,
  },
}


def histogram(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
  """(lengths, counts) of a split, ascending, as `padding.read_histogram`."""
  pairs = sorted(F30K_CAPTION_LENGTHS[split].items())
  return tuple(np.array(x, np.int64) for x in zip(*pairs))


def clipped(histogram, longest: int):
  """The histogram with lengths over `longest` counted at it."""
  lengths, counts = histogram
  return np.minimum(lengths, longest), counts


def sorted_lengths(histogram, n: int) -> np.ndarray:
  """`n` lengths, ascending, at evenly spaced quantiles of (lengths, counts):
  the histogram's own captions when `n` is their count."""
  lengths, counts = histogram
  cdf = np.cumsum(counts) / np.sum(counts)
  return lengths[np.searchsorted(cdf, (np.arange(n) + 0.5) / n, side="right")]


def group_branches(lengths, group: int, padded: int) -> list[int]:
  """The branch of `bucket_lengths(padded)` each run of `group` ascending
  `lengths` takes: its longest caption's bucket."""
  grid = padding.bucket_lengths(padded)
  return [grid.index(n) for n in padding.tile_lengths(lengths, group, grid)]


def bucket_weights(histogram, batch: int, group: int, grid) -> np.ndarray:
  """W[l, k]: for `batch` lengths drawn independently from (lengths, counts),
  P(the longest is in bucket grid[l]) times the mean over the groups of
  `group` (in length order) of P(the group's longest is in grid[k] | that)."""
  lengths, counts = histogram
  cdf = lambda x: counts[lengths <= x].sum() / counts.sum()

  def joint(rank, a, c):  # P(the rank-th smallest <= a and the largest <= c)
    fa, fc = cdf(a), cdf(c)
    if a >= c:
      return fc**batch
    return sum(
      math.comb(batch, j) * fa**j * (fc - fa) ** (batch - j)
      for j in range(rank, batch + 1)
    )

  edges = (0, *grid)
  ranks = [min(start + group, batch) for start in range(0, batch, group)]
  weights = np.zeros((len(grid), len(grid)))
  for rank in ranks:
    for l in range(len(grid)):
      for k in range(l + 1):
        box = (
          joint(rank, edges[k + 1], edges[l + 1]) - joint(rank, edges[k], edges[l + 1])
          - joint(rank, edges[k + 1], edges[l]) + joint(rank, edges[k], edges[l])
        )  # fmt: skip
        weights[l, k] += box / len(ranks)
  return weights
