"""The prepared copy of a SCAN precomp dataset: a TFDS builder writing ArrayRecord.

Each raw split becomes one TFDS dataset (builder config = split name) under
`<prepared_dir>/<name>/srem_precomp/<split>/<version>/` with two record sets:
`<split>_images` ({index, features (R, D) float32}, one record per image) and
`<split>_captions` ({index, tokens int32 with <start>/<end>, image = clean image
index}). Images and captions stay apart so one prepared copy serves every noise
setting; the pipeline joins them through the (noisy) `t2i` index at read time.
TFDS writes into an `incomplete.*` folder and renames it when done, so a copy
killed mid-build is never taken for a finished one. The vocabulary's hash is
stored with the copy, and a copy built with another vocabulary is refused.

    prepared_dir = prepare("data", "f30k_precomp", "", "data/prepared")
    # or: python -m srem_jax.data.prepare --raw_dir data --name f30k_precomp
"""

import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from typing import Callable, Sequence
from unittest import mock

import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from array_record.python import array_record_module
from tensorflow_datasets.core import file_adapters

from srem_jax import cli
from srem_jax.data import layout, tokenizer
from srem_jax.errors import UserError
from srem_jax.report.reporting import PassProgress

BUILDER_NAME = "srem_precomp"
VERSION = "1.0.0"
# Bumped when the record layout or metadata keys change; older copies are refused.
FORMAT = 1
FLAGS = flags.FLAGS


def split_dir(prepared_dir: str, name: str, split: str) -> str:
  """The folder of one prepared split (what `tfds.builder_from_directory` opens)."""
  return os.path.join(prepared_dir, name, BUILDER_NAME, split, VERSION)


def read_metadata(prepared_dir: str, name: str, split: str) -> dict | None:
  """The stored metadata of a complete prepared split, or None if there is none."""
  directory = split_dir(prepared_dir, name, split)
  meta_path = os.path.join(directory, "metadata.json")
  if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
    return None
  if not os.path.isfile(meta_path):
    return None
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise UserError(
      f"{directory}: prepared with format {meta.get('format')}, this code reads "
      f"format {FORMAT}; delete {directory} to rebuild it"
    )
  return meta


def prepared_splits(prepared_dir: str, name: str) -> list[str]:
  """Splits of `name` with a complete prepared copy."""
  root = os.path.join(prepared_dir, name, BUILDER_NAME)
  if not os.path.isdir(root):
    return []
  return sorted(
    s for s in os.listdir(root) if read_metadata(prepared_dir, name, s) is not None
  )


def is_prepared(
  prepared_dir: str, name: str, splits: Sequence[str] | None = None
) -> bool:
  """True when every split asked for (or, if None, at least one) is fully built."""
  if splits is None:
    return bool(prepared_splits(prepared_dir, name))
  return all(read_metadata(prepared_dir, name, s) is not None for s in splits)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


# Unregistered: the copy is opened by path, and `python -m` of this module
# would otherwise register the name a second time.
class SremPrecomp(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One raw split (images + tokenised captions) as two ArrayRecord record sets."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Place the SCAN precomp folder (<split>_ims.npy, <split>_caps.txt or .tsv) "
    "in the manual_dir; it is read, never modified."
  )

  def __init__(
    self,
    *,
    raw: layout.RawSplit,
    vocab: tokenizer.Vocab,
    vocab_meta,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    **kwargs,
  ):
    # `_info()` runs inside the base constructor and needs the shapes.
    self._raw = raw
    # (record set, total) -> progress(done), made when that record set starts
    self._progress = progress or (lambda record_set, total: lambda done: None)
    self._tokens = [vocab.encode(c).astype(np.int32) for c in raw.captions]
    self._vocab_meta = vocab_meta
    super().__init__(
      config=tfds.core.BuilderConfig(name=raw.split),
      file_format="array_record",
      **kwargs,
    )

  def _metadata(self) -> dict:
    raw = self._raw
    n_images, num_regions, feature_dim = raw.images.shape
    clean = np.asarray(raw.cap_to_img, np.int64)
    standard = np.arange(len(clean)) // raw.caps_per_image
    return {
      "format": FORMAT,
      "name": raw.name,
      "split": raw.split,
      "n_images": int(n_images),
      "n_captions": len(clean),
      "caps_per_image": int(raw.caps_per_image),
      "num_regions": int(num_regions),
      "feature_dim": int(feature_dim),
      "max_caption_len": max(len(t) for t in self._tokens),
      **self._vocab_meta,
      # The usual k // caps_per_image mapping is not spelled out.
      "cap_to_img": None if np.array_equal(clean, standard) else clean.tolist(),
    }

  def _info(self) -> tfds.core.DatasetInfo:
    feature_dim = self._raw.images.shape[2]
    # One feature set serves both record sets: caption records carry zero
    # regions and image records no tokens, so neither pays for the other.
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"{self._raw.name}/{self._raw.split}: region features and tokenised captions",
      features=tfds.features.FeaturesDict(
        {
          "index": tfds.features.Scalar(np.int64),
          "features": tfds.features.Tensor(
            shape=(None, feature_dim),
            dtype=np.float32,
            encoding=tfds.features.Encoding.BYTES,
          ),
          "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "image": tfds.features.Scalar(np.int64),
        }
      ),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(self._metadata()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the already-read raw split
    split = self._raw.split
    return {
      f"{split}_images": self._generate_examples("images"),
      f"{split}_captions": self._generate_examples("captions"),
    }

  def _generate_examples(self, record_set: str):
    if record_set == "images":
      return self._image_examples()
    return self._caption_examples()

  def _image_examples(self):
    images = self._raw.images
    empty = np.zeros((0,), np.int32)
    progress = self._progress("images", images.shape[0])
    for i in range(images.shape[0]):
      features = np.asarray(images[i], np.float32)
      yield i, {"index": i, "features": features, "tokens": empty, "image": i}
      progress(i + 1)

  def _caption_examples(self):
    no_features = np.zeros((0, self._raw.images.shape[2]), np.float32)
    progress = self._progress("captions", len(self._tokens))
    for k, tokens in enumerate(self._tokens):
      image = int(self._raw.cap_to_img[k])
      yield k, {"index": k, "features": no_features, "tokens": tokens, "image": image}
      progress(k + 1)


def _check_vocab(
  meta: dict, vocab_sha256: str, vocab_path: str, directory: str
) -> None:
  if meta["vocab_sha256"] != vocab_sha256:
    raise UserError(
      f"{directory} was prepared with another vocabulary ({meta['vocab_path']}, "
      f"sha256 {meta['vocab_sha256'][:12]}) than data.vocab_path={vocab_path} "
      f"(sha256 {vocab_sha256[:12]}); token ids would not match: delete "
      f"{directory} to rebuild it, or set data.prepared_dir elsewhere"
    )


def _write_uncompressed(cls, path, iterator):
  writer = array_record_module.ArrayRecordWriter(
    os.fspath(path), "group_size:1,uncompressed"
  )
  for _, serialized_example in iterator:
    writer.write(serialized_example)
  writer.close()


@contextlib.contextmanager
def _uncompressed_records():
  """Writes ArrayRecord files without TFDS's default zstd compression.

  Region features barely compress, and decompressing them made random reads of
  a training batch about 3.5x slower. Readers need no change: the option is
  stored in each file.
  """
  adapter = file_adapters.ArrayRecordFileAdapter
  with mock.patch.object(adapter, "write_examples", classmethod(_write_uncompressed)):
    yield


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's banners and its warning about a custom builder config."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    logging.set_verbosity(verbosity)


def _build_split(
  raw_dir, name, split, vocab, vocab_meta, prepared_dir, progress, delay_s
) -> dict:
  raw = layout.read_split(raw_dir, name, split)
  config = tfds.download.DownloadConfig(
    manual_dir=os.path.join(raw_dir, name),
    compute_stats=tfds.download.ComputeStatsMode.SKIP,
  )
  # Taken before TFDS's output is silenced, so progress reaches the real stdout.
  stdout = sys.stdout

  def bar(record_set: str, total: int) -> PassProgress:
    label = f"{name}/{split} {record_set}"
    return PassProgress(
      label, total, record_set, enabled=progress, delay_s=delay_s, stream=stdout
    )

  with (
    _quiet_tfds(),
    _uncompressed_records(),
    tempfile.TemporaryDirectory() as downloads,
  ):
    builder = SremPrecomp(
      raw=raw,
      vocab=vocab,
      vocab_meta=vocab_meta,
      progress=bar,
      data_dir=os.path.join(prepared_dir, name),
    )
    builder.download_and_prepare(download_dir=downloads, download_config=config)
  return read_metadata(prepared_dir, name, split)


def prepare(
  raw_dir: str,
  name: str,
  vocab_path: str,
  prepared_dir: str,
  splits: Sequence[str] | None = None,
  log: Callable[[str], None] = print,
  progress: bool = False,
  progress_delay_s: float = 5.0,
) -> str:
  """Builds the prepared copy of every split (or those given) that lacks one.

  Returns the prepared root to pass to `srem_jax.data.prepared_split.load_prepared`. An empty
  `prepared_dir` means `<raw_dir>/prepared`; an empty `vocab_path` means the
  layout's default vocabulary file. `progress` prints records written, rate
  and ETA on stdout for a split that takes longer than `progress_delay_s`.
  """
  prepared_dir = prepared_dir or os.path.join(raw_dir, "prepared")
  vocab_path = layout.resolve_vocab_path(raw_dir, name, vocab_path)
  if not os.path.isfile(vocab_path):
    raise UserError(f"data.vocab_path: vocabulary file {vocab_path} not found")
  vocab_sha256 = file_sha256(vocab_path)
  splits = list(splits) if splits is not None else layout.list_splits(raw_dir, name)
  if not splits:
    raise UserError(f"{os.path.join(raw_dir, name)}: no <split>_ims.npy files found")
  tfds.disable_progress_bar()
  vocab = None
  for split in splits:
    directory = split_dir(prepared_dir, name, split)
    meta = read_metadata(prepared_dir, name, split)
    if meta is not None:
      _check_vocab(meta, vocab_sha256, vocab_path, directory)
      action = "reusing"
    else:
      if vocab is None:
        vocab = tokenizer.Vocab.load(vocab_path)
      vocab_meta = {
        "vocab_size": len(vocab),
        "vocab_sha256": vocab_sha256,
        "vocab_path": os.path.abspath(vocab_path),
      }
      meta = _build_split(
        raw_dir,
        name,
        split,
        vocab,
        vocab_meta,
        prepared_dir,
        progress,
        progress_delay_s,
      )
      action = "wrote"
    log(
      f"{name}/{split}: {action} {meta['n_images']} images x "
      f"{meta['num_regions']}x{meta['feature_dim']}, {meta['n_captions']} captions "
      f"(longest {meta['max_caption_len']} tokens) at {directory}"
    )
  return prepared_dir


def main(argv: Sequence[str]) -> None:
  del argv
  written = prepare(
    FLAGS.raw_dir,
    FLAGS.name,
    FLAGS.vocab_path,
    FLAGS.prepared_dir,
    progress=not FLAGS.quiet,
  )
  print(f"prepared {FLAGS.name} in {os.path.join(written, FLAGS.name)}")


if __name__ == "__main__":
  flags.DEFINE_string(
    "raw_dir", "data", "folder holding <name>/ in the SCAN precomp layout"
  )
  flags.DEFINE_string("name", "f30k_precomp", "dataset folder name under raw_dir")
  flags.DEFINE_string("vocab_path", "", "vocabulary JSON; empty = the layout's default")
  flags.DEFINE_string("prepared_dir", "", "output root; empty = <raw_dir>/prepared")
  flags.DEFINE_bool("quiet", False, "print no progress lines while writing")
  cli.run(main)
