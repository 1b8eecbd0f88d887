"""Noisy correspondences: the two injection protocols and noise files
(docs/method.md §Noise).

Caption-level noise (NCR, BiCro) shuffles the image index of a random
`int(r * N_caps)` captions among themselves; image-level noise (DECL, RCL)
permutes a random `int(r * N_imgs)` images among themselves so that all
captions of a chosen image move together. Both draw like NCR's generator
(`RandomState(seed)`: shuffle the positions, shuffle the chosen values).

    noise = resolve_noise(ratio=0.4, protocol="caption", seed=0, file="",
                          n_caps=145000, n_imgs=29000, caps_per_image=5,
                          workdir="workdirs/flickr")
    noise.t2i[k]  # image paired with caption k for training
"""

import dataclasses
import os

import numpy as np
from etils import epath

from srem_jax import paths
from srem_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Noise:
  """Training pairing of every caption, with the injected-noise truth."""

  t2i: np.ndarray
  clean: np.ndarray
  protocol: str
  path: str


def clean_t2i(n_caps: int, caps_per_image: int) -> np.ndarray:
  return np.arange(n_caps, dtype=np.int64) // caps_per_image


def _shuffle_random_subset(values: np.ndarray, ratio: float, seed: int) -> np.ndarray:
  rng = np.random.RandomState(seed)
  positions = np.arange(len(values))
  rng.shuffle(positions)
  chosen = positions[: int(ratio * len(values))]
  moved = values[chosen]
  rng.shuffle(moved)
  values = values.copy()
  values[chosen] = moved
  return values


def caption_level_noise(
  n_caps: int, caps_per_image: int, ratio: float, seed: int
) -> np.ndarray:
  """The noisy t2i (length n_caps): chosen captions' image indices reshuffled."""
  return _shuffle_random_subset(clean_t2i(n_caps, caps_per_image), ratio, seed)


def image_level_noise(n_imgs: int, ratio: float, seed: int) -> np.ndarray:
  """A permutation of arange(n_imgs) that moves only a random int(r*n_imgs) subset."""
  return _shuffle_random_subset(np.arange(n_imgs, dtype=np.int64), ratio, seed)


def _make_noise(
  t2i: np.ndarray, caps_per_image: int, protocol: str, path: str
) -> Noise:
  clean = t2i == clean_t2i(len(t2i), caps_per_image)
  return Noise(t2i=t2i, clean=clean, protocol=protocol, path=path)


def _as_index_array(path: str, array: np.ndarray) -> np.ndarray:
  if array.ndim != 1:
    raise UserError(f"{path}: expected a 1-D index array, got shape {array.shape}")
  if np.issubdtype(array.dtype, np.integer):
    return array.astype(np.int64)
  if np.issubdtype(array.dtype, np.floating):
    integral = np.isfinite(array) & (array == np.round(array))
    if not integral.all():
      first = int(np.argmin(integral))
      raise UserError(
        f"{path}: expected integer image indices, entry {first} is {array[first]}"
      )
    return array.astype(np.int64)
  raise UserError(f"{path}: expected integer image indices, got dtype {array.dtype}")


def _is_permutation(values: np.ndarray) -> bool:
  return bool((np.bincount(values, minlength=len(values)) == 1).all())


def _check_sizes(n_caps: int, n_imgs: int, caps_per_image: int) -> None:
  if n_caps != n_imgs * caps_per_image:
    raise ValueError(f"n_caps={n_caps} != n_imgs={n_imgs} * {caps_per_image}")


def load_noise_file(path: str, n_caps: int, n_imgs: int, caps_per_image: int) -> Noise:
  """Loads a caption t2i, an image permutation or one expanded per caption."""
  _check_sizes(n_caps, n_imgs, caps_per_image)
  try:
    with epath.Path(path).open("rb") as f:
      array = np.load(f, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable .npy noise file ({e})") from None
  if not isinstance(array, np.ndarray):
    raise UserError(f"{path}: expected a single .npy array, not an archive")
  indices = _as_index_array(path, array)
  if len(indices) not in (n_caps, n_imgs):
    raise UserError(
      f"{path}: length {len(indices)}; expected {n_caps} (one image per caption) "
      f"or {n_imgs} (an image permutation)"
    )
  out_of_range = (indices < 0) | (indices >= n_imgs)
  if out_of_range.any():
    first = int(np.argmax(out_of_range))
    raise UserError(
      f"{path}: entry {first} is {indices[first]}, outside the image range "
      f"[0, {n_imgs})"
    )
  if len(indices) == n_caps:
    groups = indices.reshape(n_imgs, caps_per_image)
    per_image = caps_per_image > 1 and (groups == groups[:, :1]).all()
    if per_image and _is_permutation(groups[:, 0]):
      return _make_noise(indices, caps_per_image, "image", path)
    return _make_noise(indices, caps_per_image, "caption", path)
  if not _is_permutation(indices):
    raise UserError(
      f"{path}: an image-level noise file of length {n_imgs} must be a "
      "permutation of the image indices"
    )
  return _make_noise(np.repeat(indices, caps_per_image), caps_per_image, "image", path)


def _native_noise(
  protocol: str, ratio: float, seed: int, n_caps: int, n_imgs: int, caps_per_image: int
) -> np.ndarray:
  if protocol == "caption":
    return caption_level_noise(n_caps, caps_per_image, ratio, seed)
  return image_level_noise(n_imgs, ratio, seed)


def _write_once(path: epath.Path, array: np.ndarray) -> bool:
  """Saves `array` at `path` unless a file is there; False if one was."""
  if paths.is_url(path):
    # Buckets have no atomic create, but only process 0 writes this file and
    # an object appears whole once its upload ends.
    if path.exists():
      return False
    with path.open("wb") as f:
      np.save(f, array)
    return True
  # Written aside and linked into place: a run killed mid-write leaves no
  # half-written file, and an existing file is never replaced.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, array)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)


def resolve_noise(
  *,
  ratio: float,
  protocol: str,
  seed: int,
  file: str,
  n_caps: int,
  n_imgs: int,
  caps_per_image: int,
  workdir: str,
) -> Noise:
  """The training pairing: from `file`, clean for ratio 0, else generated and
  saved (`ratio` and `protocol` checked at start-up by `config_checks`)."""
  _check_sizes(n_caps, n_imgs, caps_per_image)
  if file:
    return load_noise_file(file, n_caps, n_imgs, caps_per_image)
  if ratio == 0:
    return _make_noise(clean_t2i(n_caps, caps_per_image), caps_per_image, "none", "")

  native = _native_noise(protocol, ratio, seed, n_caps, n_imgs, caps_per_image)
  folder = epath.Path(workdir)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"noise_{protocol}_r{ratio:g}_s{seed}.npy"
  if not _write_once(path, native):
    try:
      with path.open("rb") as f:
        existing = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: not a readable .npy noise file ({e})") from None
    if not (isinstance(existing, np.ndarray) and np.array_equal(existing, native)):
      raise UserError(
        f"{path}: exists but differs from the {protocol}-level noise for ratio "
        f"{ratio:g} and seed {seed}; move it away or pass it as noise.file"
      )
  t2i = native if protocol == "caption" else np.repeat(native, caps_per_image)
  return _make_noise(t2i, caps_per_image, protocol, str(path))
