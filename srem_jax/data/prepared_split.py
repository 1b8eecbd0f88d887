"""A prepared split, read: `PreparedSplit` (captions, images, noise-free
index and the lengths the pipelines pad to) from the ArrayRecord files that
`srem_jax.data.prepare` writes.

    split = load_prepared("data/prepared", "f30k_precomp", "train")
    tokens, lengths = split.padded_tokens(range(8), caption_length(split, 0))
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from srem_jax import padding
from srem_jax.data import prepare
from srem_jax.errors import UserError

# Images per read when a whole split is loaded (~300 MB of float32 at 36 x 2048).
_ALL_IMAGES_CHUNK = 1024


@dataclasses.dataclass
class PreparedSplit:
  """One prepared split with random access to image features and tokens."""

  n_images: int
  n_captions: int
  caps_per_image: int
  num_regions: int
  feature_dim: int
  max_caption_len: int
  vocab_size: int
  cap_to_img: np.ndarray  # (n_captions,) clean image index of each caption
  path: str
  split: str

  def __getstate__(self):
    # Record sources hold open files; worker processes reopen them.
    return {k: v for k, v in self.__dict__.items() if not k.startswith("_source")}

  def _source(self, record_set: str):
    attr = f"_source_{record_set}"
    if attr not in self.__dict__:
      builder = tfds.builder_from_directory(self.path)
      self.__dict__[attr] = builder.as_data_source(f"{self.split}_{record_set}")
    return self.__dict__[attr]

  def images(self, indices: np.ndarray) -> np.ndarray:
    """Region features (len(indices), R, D) float32 of the given images."""
    # Hot path: parse the stored example directly and copy the feature bytes
    # once, instead of TFDS's generic decode (three copies of ~300 KB each).
    records = self._source("images").data_source
    shape = (self.num_regions, self.feature_dim)
    out = np.empty((len(indices), *shape), np.float32)
    for row, i in enumerate(np.asarray(indices, np.int64).tolist()):
      feature = tf_example_pb2.Example.FromString(records[i]).features.feature
      if feature["index"].int64_list.value[0] != i:
        raise UserError(
          f"{self.path}: image records out of order; delete it to rebuild"
        )
      out[row] = np.frombuffer(
        feature["features"].bytes_list.value[0], np.float32
      ).reshape(shape)
    return out

  def caption_tokens(self, indices: np.ndarray) -> list[np.ndarray]:
    """The int32 tokens of each caption, unpadded."""
    # Parsed directly like `images`: TFDS's generic decode of a few small
    # fields costs more than the rest of an index-only batch.
    records = self._source("captions").data_source
    pieces = []
    for k in np.asarray(indices, np.int64).tolist():
      feature = tf_example_pb2.Example.FromString(records[k]).features.feature
      if feature["index"].int64_list.value[0] != k:
        raise UserError(
          f"{self.path}: caption records out of order; delete it to rebuild"
        )
      pieces.append(np.array(feature["tokens"].int64_list.value, np.int32))
    return pieces

  def padded_tokens(
    self, indices: np.ndarray, caption_len: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (n, caption_len) int32 zero-padded, and lengths (n,) int32."""
    return pad_tokens(self.caption_tokens(indices), caption_len)

  def image(self, i: int) -> np.ndarray:
    return self.images(np.array([i]))[0]

  def all_images(self, dtype=np.float32) -> np.ndarray:
    """Every image's regions (n_images, R, D) in `dtype`, read in chunks.

    Chunks keep the host's peak at the result's size plus one float32 chunk,
    so bfloat16 features of a whole split need half the float32 memory.
    """
    out = np.empty((self.n_images, self.num_regions, self.feature_dim), dtype)
    for start in range(0, self.n_images, _ALL_IMAGES_CHUNK):
      stop = min(start + _ALL_IMAGES_CHUNK, self.n_images)
      out[start:stop] = self.images(np.arange(start, stop))
    return out

  def tokens(self, k: int) -> np.ndarray:
    return self._source("captions")[int(k)]["tokens"]


def pad_tokens(pieces, caption_len: int) -> tuple[np.ndarray, np.ndarray]:
  lengths = np.fromiter(map(len, pieces), np.int32, count=len(pieces))
  tokens = np.zeros((len(pieces), caption_len), np.int32)
  if pieces:
    tokens[np.arange(caption_len) < lengths[:, None]] = np.concatenate(pieces)
  return tokens, lengths


def load_prepared(prepared_dir: str, name: str, split: str) -> PreparedSplit:
  meta = prepare.read_metadata(prepared_dir, name, split)
  path = prepare.split_dir(prepared_dir, name, split)
  if meta is None:
    raise UserError(
      f"{path}: no prepared copy of {name}/{split}; run "
      f"`python -m srem_jax.data.prepare --name {name}` or the training command"
    )
  if meta["cap_to_img"] is None:
    cap_to_img = np.arange(meta["n_captions"], dtype=np.int64) // meta["caps_per_image"]
  else:
    cap_to_img = np.asarray(meta["cap_to_img"], np.int64)
  fields = [f.name for f in dataclasses.fields(PreparedSplit)]
  return PreparedSplit(
    **{k: meta[k] for k in fields if k in meta and k not in ("cap_to_img", "split")},
    cap_to_img=cap_to_img,
    path=path,
    split=split,
  )


def caption_length(split: PreparedSplit, requested: int) -> int:
  """The static padded caption length of `split` (`padding.static_length`)."""
  return padding.static_length(split.max_caption_len, requested, split.split)
