"""Input pipelines over a prepared split: seeded training batches and eval streams.

Caption records are joined with image records through the (noisy) `t2i` index
at read time. Training: batch number `s` (global count) belongs to epoch
`s // steps_per_epoch`, whose order is a seeded permutation of every caption
depending on (seed, epoch) only, so a batch is a pure function of `s` and the
iterator state is just the next `s`. Each process reads its own contiguous
slice of every global batch. Evaluation streams visit every example exactly
once and pad the last batch (mask False) instead of dropping it. Training
and selection batches are padded to the bucket of their global batch's
longest caption (`srem_jax.padding`, given as `buckets`), or to the static
length.

    split = prepared_split.load_prepared("data/prepared", "f30k_precomp", "train")
    loader = train_loader(split, t2i, clean, global_batch_size=128,
                          caption_len=caption_length(split, 0), seed=0)
    batch = next(iter(loader))  # images, tokens, lengths, cap_index, ...

With `with_images=False` the batches carry only `img_index` for the images,
and `split.all_images(dtype)` gives the whole split for device memory.
"""

import dataclasses
from typing import Iterator

import grain
import jax
import numpy as np

from srem_jax import padding
from srem_jax.data import prepared_split
from srem_jax.data.prepared_split import PreparedSplit, caption_length
from srem_jax.errors import UserError

# The training source is "endless": this many epochs ahead of any start.
_EPOCHS_AHEAD = 1_000_000
# Whole batches are read ahead by a few threads, overlapping the train step.
_READ_THREADS = 2
_PREFETCH_BATCHES = 4


def _process_slice(batch_size, process_index, process_count) -> tuple[int, int]:
  """(first row, rows) of this process's slice of a global batch."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size % count:
    raise UserError(
      f"batch size {batch_size} is not divisible by the {count} processes"
    )
  rows = batch_size // count
  return index * rows, rows


def _batch_length(split, pieces, cap_index, global_index, buckets) -> int:
  """The bucket of the global batch's longest caption: the same on every process."""
  if len(buckets) == 1:
    return buckets[0]
  if len(global_index) == len(cap_index):  # this process reads the whole batch
    longest = max(map(len, pieces))
  else:
    longest = max(map(len, split.caption_tokens(global_index)))
  return padding.padded_length(longest, buckets)


def _pair_batch(
  split, t2i, clean, cap_index, buckets, with_images=True, global_index=None
) -> dict[str, np.ndarray]:
  """The pairs `cap_index` (this process's rows of the batch `global_index`)."""
  img_index = t2i[cap_index]
  pieces = split.caption_tokens(cap_index)
  global_index = cap_index if global_index is None else global_index
  caption_len = _batch_length(split, pieces, cap_index, global_index, buckets)
  tokens, lengths = prepared_split.pad_tokens(pieces, caption_len)
  batch = {
    "tokens": tokens,
    "lengths": lengths,
    "cap_index": cap_index.astype(np.int32),
    "img_index": img_index.astype(np.int32),
    "truly_clean": clean[cap_index],
  }
  if with_images:
    batch["images"] = split.images(img_index)
  return batch


def _check_noise(split: PreparedSplit, t2i, clean) -> tuple[np.ndarray, np.ndarray]:
  t2i = np.asarray(t2i)
  if t2i.shape != (split.n_captions,) or not np.issubdtype(t2i.dtype, np.integer):
    raise UserError(
      f"t2i: expected {split.n_captions} integer image indices, got {t2i.dtype} {t2i.shape}"
    )
  if t2i.size and (t2i.min() < 0 or t2i.max() >= split.n_images):
    raise UserError(f"t2i: image indices must lie in [0, {split.n_images})")
  clean = t2i == split.cap_to_img if clean is None else np.asarray(clean, bool)
  if clean.shape != t2i.shape:
    raise UserError(f"clean: expected shape {t2i.shape}, got {clean.shape}")
  return t2i.astype(np.int64), clean


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The caption order of one training epoch: a function of (seed, epoch)."""
  return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


@dataclasses.dataclass
class _TrainBatches:
  """Random-access source: global batch number -> this process's batch."""

  split: PreparedSplit
  t2i: np.ndarray
  clean: np.ndarray
  global_batch_size: int
  buckets: tuple[int, ...]  # lengths a batch may be padded to (`padding`)
  seed: int
  steps_per_epoch: int
  first_row: int  # this process's rows of each global batch
  rows: int
  with_images: bool = True
  _order: tuple = (-1, None)  # (epoch, caption order) of the last epoch read

  def __len__(self) -> int:
    return self.steps_per_epoch * _EPOCHS_AHEAD

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    epoch, within = divmod(int(step), self.steps_per_epoch)
    cached_epoch, order = self._order  # one tuple read: safe across threads
    if cached_epoch != epoch:
      order = epoch_order(self.seed, epoch, self.split.n_captions)
      self._order = (epoch, order)
    first = within * self.global_batch_size
    global_index = order[first : first + self.global_batch_size]
    cap_index = global_index[self.first_row : self.first_row + self.rows]
    return _pair_batch(
      self.split,
      self.t2i,
      self.clean,
      cap_index,
      self.buckets,
      self.with_images,
      global_index,
    )


class TrainLoader:
  """Endless iterator of this process's training batches with exact resume."""

  def __init__(self, batches: _TrainBatches, num_workers: int):
    self._batches = batches
    self._num_workers = num_workers
    self.steps_per_epoch = batches.steps_per_epoch
    self._next_step = 0
    self._iterator = None

  def _start(self, step: int):
    dataset = grain.MapDataset.source(self._batches)[step:].to_iter_dataset(
      grain.ReadOptions(
        num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES
      )
    )
    if self._num_workers > 0:
      dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=self._num_workers, per_worker_buffer_size=2
        )
      )
    return iter(dataset)

  def __iter__(self) -> "TrainLoader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start(self._next_step)
    batch = next(self._iterator)
    self._next_step += 1
    return batch

  def get_state(self) -> dict:
    b = self._batches
    return {
      "next_step": self._next_step,
      "seed": b.seed,
      "global_batch_size": b.global_batch_size,
      "steps_per_epoch": b.steps_per_epoch,
    }

  def set_state(self, state: dict) -> None:
    """Continues from `state` (drawn with this loader's settings: the run
    checks that first, `srem_jax.train.run.check_resume`)."""
    self.close()
    self._next_step = int(state["next_step"])

  def close(self) -> None:
    """Stops prefetch threads and worker processes; iteration restarts lazily."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def train_loader(
  split: PreparedSplit,
  t2i: np.ndarray,
  clean: np.ndarray | None,
  *,
  global_batch_size: int,
  caption_len: int,
  seed: int,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  max_steps_per_epoch: int = 0,
  with_images: bool = True,
  buckets: tuple[int, ...] | None = None,
) -> TrainLoader:
  """Training batches; `max_steps_per_epoch` > 0 caps the epoch length.

  Each batch is padded to the smallest of `buckets` that holds its longest
  caption (default: to `caption_len`, resolved by `caption_length`).
  `with_images=False` leaves `images` out of every batch and reads no
  features: the step then gathers them by `img_index` from device memory.
  """
  t2i, clean = _check_noise(split, t2i, clean)
  buckets = _buckets(split, caption_len, buckets)
  # At least one: the batch fits the captions (`config_checks.check_batch_fits`).
  steps_per_epoch = split.n_captions // global_batch_size
  if max_steps_per_epoch > 0:
    steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
  first_row, rows = _process_slice(global_batch_size, process_index, process_count)
  batches = _TrainBatches(
    split=split,
    t2i=t2i,
    clean=clean,
    global_batch_size=global_batch_size,
    buckets=buckets,
    seed=seed,
    steps_per_epoch=steps_per_epoch,
    first_row=first_row,
    rows=rows,
    with_images=with_images,
  )
  return TrainLoader(batches, num_workers)


def _buckets(split, caption_len, buckets) -> tuple[int, ...]:
  static = caption_length(split, caption_len)
  if buckets is None:
    return (static,)
  if max(buckets) < split.max_caption_len:
    raise UserError(
      f"caption buckets {tuple(buckets)} are shorter than the longest caption "
      f"of {split.split} ({split.max_caption_len} tokens)"
    )
  return tuple(buckets)


def _padded_chunks(
  indices: np.ndarray, batch_size: int, process_index, process_count
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """This process's slice of each global batch of `indices`, padded with a mask.

  Padding rows repeat the last real index, so they are valid inputs that the
  mask then discards; every process yields the same number of batches.
  """
  first_row, rows = _process_slice(batch_size, process_index, process_count)
  for start in range(0, len(indices), batch_size):
    chunk = indices[start : start + batch_size]
    mask = np.arange(batch_size) < len(chunk)
    chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[-1])])
    yield chunk[first_row : first_row + rows], mask[first_row : first_row + rows]


def _num_images(split: PreparedSplit, num_images: int | None) -> int:
  n = num_images or split.n_images
  if n > split.n_images:
    raise UserError(
      f"asked for the first {n} images of {split.split}, which has only "
      f"{split.n_images} (config data.val_images)"
    )
  return n


def image_batches(
  split: PreparedSplit,
  batch_size: int,
  *,
  num_images: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Each of the first `num_images` images once, in order, last batch padded."""
  indices = np.arange(_num_images(split, num_images))
  for rows, mask in _padded_chunks(indices, batch_size, process_index, process_count):
    yield {
      "images": split.images(rows),
      "img_index": rows.astype(np.int32),
      "mask": mask,
    }


def caption_batches(
  split: PreparedSplit,
  batch_size: int,
  caption_len: int,
  *,
  num_images: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Each caption of the first `num_images` images once, in order."""
  caption_len = caption_length(split, caption_len)
  indices = np.flatnonzero(split.cap_to_img < _num_images(split, num_images))
  for rows, mask in _padded_chunks(indices, batch_size, process_index, process_count):
    tokens, lengths = split.padded_tokens(rows, caption_len)
    yield {
      "tokens": tokens,
      "lengths": lengths,
      "cap_index": rows.astype(np.int32),
      "img_index": split.cap_to_img[rows].astype(np.int32),
      "mask": mask,
    }


def pair_batches(
  split: PreparedSplit,
  t2i: np.ndarray,
  batch_size: int,
  caption_len: int,
  *,
  seed: int,
  clean: np.ndarray | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  buckets: tuple[int, ...] | None = None,
  with_images: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Every training pair once in a seeded order, like `train_loader` plus mask.

  `clean` defaults to `t2i == split.cap_to_img`; `buckets` and `with_images`
  (False: image indices only, for features kept on the devices) as in
  `train_loader`.
  """
  t2i, clean = _check_noise(split, t2i, clean)
  buckets = _buckets(split, caption_len, buckets)
  order = np.random.default_rng(np.random.SeedSequence([seed])).permutation(
    split.n_captions
  )
  for start, (rows, mask) in zip(
    range(0, len(order), batch_size),
    _padded_chunks(order, batch_size, process_index, process_count),
  ):
    whole = order[start : start + batch_size]
    batch = _pair_batch(split, t2i, clean, rows, buckets, with_images, whole)
    yield {**batch, "mask": mask}


def ordered_batches(
  split: PreparedSplit,
  t2i: np.ndarray,
  clean: np.ndarray | None,
  order: np.ndarray,
  global_batch_size: int,
  caption_len: int,
  *,
  start: int = 0,
  buckets: tuple[int, ...] | None = None,
  with_images: bool = True,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of global batches `start, start + 1, ...` of the
  caption order `order` (any indices, repeats allowed); a last partial batch
  is dropped, as `train_loader` does. For methods that train on a subset of
  the pairs (NCR's labelled and unlabelled sets); the order is the caller's.
  """
  t2i, clean = _check_noise(split, t2i, clean)
  buckets = _buckets(split, caption_len, buckets)
  first_row, rows = _process_slice(global_batch_size, process_index, process_count)
  order = np.asarray(order, np.int64)
  for step in range(start, len(order) // global_batch_size):
    whole = order[step * global_batch_size : (step + 1) * global_batch_size]
    mine = whole[first_row : first_row + rows]
    yield _pair_batch(split, t2i, clean, mine, buckets, with_images, whole)
