"""How far captions are padded: the one policy training, selection and evaluation use.

The all-pairs head costs per padded word position as much as per real one,
and real captions are short with a long tail (Flickr30K: median 14 tokens,
maximum 77). So a batch of captions is padded only to the smallest bucket
length that holds its longest caption, out of a few fixed ones (`BUCKETS`,
then the static length), which bounds the number of compiled shapes. The head
masks padded words (docs/method.md §Network), so a score does not depend on
the padded length beyond float32 summation order.

`data.caption_len` > 0 asks for one static length instead: every batch is
padded to it, one shape.

    static = static_length(longest=77, requested=0)  # 77 (a request < 77 raises)
    lengths = bucket_lengths(static_len=static, requested=0)  # (8, 12, ..., 48, 77)
    padded_length(41, lengths)  # 48

Also owns caption-length histograms (`read_histogram`, `draw_lengths`), the
format of `shared/data/f30k_caption_lengths.json`, for benchmarks and
synthetic data with realistic lengths.
"""

import json

import numpy as np

from srem_jax.errors import UserError

# Token counts (with <start>/<end>) a batch may be padded to below the static
# length: dense where Flickr30K/COCO captions are (10-20 tokens), sparse in
# the tail. With the static length this is at most 8 compiled shapes.
BUCKETS = (8, 12, 16, 20, 24, 32, 48)


def static_length(longest: int, requested: int = 0, where: str = "") -> int:
  """The static padded caption length: `requested` (`data.caption_len`), or
  `longest` (the longest caption, with <start>/<end>) when it is 0.

  A request shorter than the longest caption would cut captions: UserError.
  `where` names the split(s) the longest caption comes from, for the message.
  """
  if requested == 0:
    return longest
  if requested < longest:
    of = f" of {where}" if where else ""
    raise UserError(
      f"config data.caption_len={requested} is shorter than the longest caption"
      f"{of} ({longest} tokens with <start>/<end>); use 0 or >= {longest}"
    )
  return requested


def bucket_lengths(static_len: int, requested: int = 0) -> tuple[int, ...]:
  """The lengths a batch may be padded to, ascending; the last is `static_len`.

  `requested` > 0 (`data.caption_len`) means one static shape: (requested,).
  """
  if requested > 0:
    return (requested,)
  return tuple(b for b in BUCKETS if b < static_len) + (static_len,)


def padded_length(longest: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds a caption of `longest` tokens."""
  for length in buckets:
    if longest <= length:
      return length
  raise ValueError(f"a caption of {longest} tokens exceeds every bucket {buckets}")


def tile_lengths(lengths: np.ndarray, tile: int, buckets) -> np.ndarray:
  """Padded length of each run of `tile` consecutive entries of `lengths`."""
  return np.array(
    [
      padded_length(int(np.max(lengths[i : i + tile])), buckets)
      for i in range(0, len(lengths), tile)
    ],
    np.int64,
  )


# ---- length histograms ------------------------------------------------------


def read_histogram(path: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
  """(lengths, counts) of `{"splits": {split: {length: count}}}` in `path`."""
  try:
    with open(path) as f:
      table = json.load(f)["splits"][split]
    pairs = sorted((int(length), int(count)) for length, count in table.items())
  except FileNotFoundError:
    raise UserError(f"{path}: no such caption-length histogram") from None
  except (ValueError, KeyError, TypeError, AttributeError) as error:
    raise UserError(
      f'{path}: expected {{"splits": {{"{split}": {{length: count}}}}}} with '
      f"positive integer lengths and counts ({type(error).__name__}: {error})"
    ) from None
  lengths, counts = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else ([], [])
  if not len(lengths) or lengths.min() < 1 or counts.min() < 0 or counts.sum() < 1:
    raise UserError(f"{path}: split {split!r} holds no positive lengths and counts")
  return lengths, counts


def draw_lengths(histogram, n: int, rng: np.random.Generator) -> np.ndarray:
  """`n` int32 lengths drawn independently with the histogram's frequencies."""
  lengths, counts = histogram
  return rng.choice(lengths, size=n, p=counts / counts.sum()).astype(np.int32)
