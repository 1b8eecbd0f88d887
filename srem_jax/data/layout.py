"""Reader of the SCAN "precomp" folders users already have on disk
(docs/method.md §Data).

A dataset folder `<raw_dir>/<name>/` holds, per split, `{split}_ims.npy`
(float `(N_rows, R, D)` region features) and either `{split}_caps.txt`
(one caption per line, consecutive lines per image) or `{split}_caps.tsv`
(`image_id<TAB>caption`, one caption per image). Features stay memory-mapped.

    split = read_split("data", "f30k_precomp", "test")
    split.images.shape, len(split.captions)  # (1000, 36, 2048), 5000
"""

import csv
import dataclasses
import os

import numpy as np

from srem_jax.errors import UserError

# Rows scanned per chunk for NaN/Inf: about 75 MB at 36x2048 float32, so an
# 8 GB memmap is checked without holding it in memory.
_FINITE_CHECK_ROWS = 256
# F30K/COCO dev and test files repeat each image row once per caption.
_TXT_CAPS_PER_IMAGE = 5


@dataclasses.dataclass(frozen=True)
class RawSplit:
  """One split: images kept once each, captions and their clean image index."""

  name: str
  split: str
  images: np.ndarray
  captions: list[str]
  cap_to_img: np.ndarray
  caps_per_image: int


def _paths(raw_dir: str, name: str, split: str) -> tuple[str, str, str]:
  folder = os.path.join(raw_dir, name)
  return (
    os.path.join(folder, f"{split}_ims.npy"),
    os.path.join(folder, f"{split}_caps.txt"),
    os.path.join(folder, f"{split}_caps.tsv"),
  )


def resolve_vocab_path(raw_dir: str, name: str, vocab_path: str = "") -> str:
  """`vocab_path` if given, else `<raw_dir>/vocab/<name>_vocab.json`."""
  return vocab_path or os.path.join(raw_dir, "vocab", f"{name}_vocab.json")


def list_splits(raw_dir: str, name: str) -> list[str]:
  """Sorted splits with both features and captions; [] if the folder is missing."""
  folder = os.path.join(raw_dir, name)
  if not os.path.isdir(folder):
    return []
  splits = []
  for filename in os.listdir(folder):
    if filename.endswith("_ims.npy"):
      split = filename[: -len("_ims.npy")]
      _, txt, tsv = _paths(raw_dir, name, split)
      if os.path.isfile(txt) or os.path.isfile(tsv):
        splits.append(split)
  return sorted(splits)


def _load_features(path: str) -> np.ndarray:
  try:
    features = np.load(path, mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable .npy array ({e})") from None
  if features.ndim != 3 or not np.issubdtype(features.dtype, np.floating):
    raise UserError(
      f"{path}: expected a float array of shape (rows, regions, dim), "
      f"got {features.dtype} {features.shape}"
    )
  return features


def _read_txt(path: str) -> list[str]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not a readable UTF-8 text file ({e})") from None
  if lines and lines[-1] == "":
    lines.pop()
  captions = [line.strip() for line in lines]
  for line_number, caption in enumerate(captions, start=1):
    if not caption:
      raise UserError(f"{path}: line {line_number} is an empty caption")
  return captions


def _read_tsv(path: str) -> list[str]:
  # csv with a tab delimiter, as the CC152K loaders read it (quoted fields too).
  captions = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.reader(f, delimiter="\t")
      for row in reader:
        if len(row) < 2:
          raise UserError(
            f"{path}: line {reader.line_num} has no tab; expected image_id<TAB>caption"
          )
        caption = row[1].strip()
        if not caption:
          raise UserError(f"{path}: line {reader.line_num} is an empty caption")
        captions.append(caption)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise UserError(f"{path}: not a readable UTF-8 tsv file ({e})") from None
  return captions


def _check_finite(path: str, images: np.ndarray, row_stride: int) -> None:
  for start in range(0, images.shape[0], _FINITE_CHECK_ROWS):
    chunk = np.asarray(images[start : start + _FINITE_CHECK_ROWS])
    finite_rows = np.isfinite(chunk).all(axis=(1, 2))
    if not finite_rows.all():
      bad_row = (start + int(np.argmin(finite_rows))) * row_stride
      raise UserError(f"{path}: row {bad_row} contains NaN or Inf features")


def _rows_repeat_per_image(features: np.ndarray, caps_per_image: int) -> bool:
  group = np.asarray(features[:caps_per_image])
  return bool((group == group[:1]).all())


def read_split(
  raw_dir: str, name: str, split: str, *, check_finite: bool = True
) -> RawSplit:
  """Reads and validates one split; `check_finite` scans every kept row."""
  folder = os.path.join(raw_dir, name)
  ims_path, txt_path, tsv_path = _paths(raw_dir, name, split)
  expected = f"{split}_ims.npy and {split}_caps.txt (or {split}_caps.tsv)"
  if not os.path.isdir(folder):
    raise UserError(
      f"{folder}: dataset folder not found; expected it to hold {expected}"
    )
  if not os.path.isfile(ims_path):
    raise UserError(f"{ims_path}: file not found; {folder} must hold {expected}")
  if os.path.isfile(txt_path):
    captions, caps_path, is_tsv = _read_txt(txt_path), txt_path, False
  elif os.path.isfile(tsv_path):
    captions, caps_path, is_tsv = _read_tsv(tsv_path), tsv_path, True
  else:
    raise UserError(
      f"{txt_path}: file not found (nor {tsv_path}); {folder} must hold {expected}"
    )
  features = _load_features(ims_path)
  n_rows, n_caps = features.shape[0], len(captions)
  if n_caps == 0 or n_rows == 0:
    raise UserError(
      f"{caps_path}: empty split ({n_caps} captions, {n_rows} feature rows)"
    )

  if n_rows == n_caps and not is_tsv and n_caps % _TXT_CAPS_PER_IMAGE == 0:
    # One row per caption: keep each image once if the rows repeat in groups.
    caps_per_image = (
      _TXT_CAPS_PER_IMAGE
      if _rows_repeat_per_image(features, _TXT_CAPS_PER_IMAGE)
      else 1
    )
    images = features[::caps_per_image]
  elif n_caps % n_rows == 0:
    caps_per_image, images = n_caps // n_rows, features
  else:
    raise UserError(
      f"{caps_path}: {n_caps} captions is neither the number of feature rows "
      f"in {ims_path} ({n_rows}) nor a multiple of it"
    )
  if is_tsv and caps_per_image != 1:
    raise UserError(
      f"{caps_path}: {n_caps} captions for {n_rows} feature rows in {ims_path}; "
      "a tsv split has one caption per image"
    )
  if check_finite:
    row_stride = features.shape[0] // images.shape[0]
    _check_finite(ims_path, images, row_stride)
  cap_to_img = np.arange(n_caps, dtype=np.int64) // caps_per_image
  return RawSplit(
    name=name,
    split=split,
    images=images,
    captions=captions,
    cap_to_img=cap_to_img,
    caps_per_image=caps_per_image,
  )
