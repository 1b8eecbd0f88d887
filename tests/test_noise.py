"""Noise protocols, noise files and their validation (SPEC §1.2)."""

import collections
import os

import numpy as np
import pytest

from configs import base
from srem_jax import config_checks
from srem_jax.data import noise
from srem_jax.errors import UserError

N_IMGS, CPI = 200, 5
N_CAPS = N_IMGS * CPI


def _reference_subset_shuffle(values, ratio, seed):
  """NCR's draw order, written out: shuffle positions, shuffle chosen values."""
  rng = np.random.RandomState(seed)
  order = list(range(len(values)))
  rng.shuffle(order)
  chosen = order[: int(ratio * len(values))]
  picked = [values[i] for i in chosen]
  rng.shuffle(picked)
  out = list(values)
  for position, value in zip(chosen, picked):
    out[position] = value
  return np.asarray(out), set(chosen)


@pytest.mark.parametrize("ratio", [0.2, 0.6, 1.0])
def test_caption_level_is_a_rearrangement_of_chosen_positions(ratio):
  t2i = noise.caption_level_noise(N_CAPS, CPI, ratio, seed=3)
  clean = np.arange(N_CAPS) // CPI
  expected, chosen = _reference_subset_shuffle(list(clean), ratio, seed=3)
  assert len(chosen) == int(ratio * N_CAPS)
  np.testing.assert_array_equal(t2i, expected)
  assert t2i.dtype == np.int64 and t2i.shape == (N_CAPS,)
  assert collections.Counter(t2i.tolist()) == collections.Counter(clean.tolist())
  unchosen = np.setdiff1d(np.arange(N_CAPS), sorted(chosen))
  np.testing.assert_array_equal(t2i[unchosen], clean[unchosen])
  # Shuffling the chosen captions mismatches nearly all of them.
  assert (t2i != clean).sum() > 0.9 * len(chosen)


@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.7])
def test_image_level_permutes_only_the_chosen_images(ratio):
  perm = noise.image_level_noise(N_IMGS, ratio, seed=1)
  expected, chosen = _reference_subset_shuffle(list(range(N_IMGS)), ratio, seed=1)
  np.testing.assert_array_equal(perm, expected)
  np.testing.assert_array_equal(np.sort(perm), np.arange(N_IMGS))
  moved = set(np.flatnonzero(perm != np.arange(N_IMGS)).tolist())
  assert moved <= chosen and len(chosen) == int(ratio * N_IMGS)
  assert len(moved) >= len(chosen) - 10


def test_deterministic_per_seed_and_different_across_seeds():
  a = noise.caption_level_noise(N_CAPS, CPI, 0.5, seed=7)
  np.testing.assert_array_equal(a, noise.caption_level_noise(N_CAPS, CPI, 0.5, seed=7))
  assert not np.array_equal(a, noise.caption_level_noise(N_CAPS, CPI, 0.5, seed=8))
  b = noise.image_level_noise(N_IMGS, 0.5, seed=7)
  np.testing.assert_array_equal(b, noise.image_level_noise(N_IMGS, 0.5, seed=7))
  assert not np.array_equal(b, noise.image_level_noise(N_IMGS, 0.5, seed=8))


def _resolve(tmp_path, **overrides):
  kwargs = dict(
    ratio=0.4,
    protocol="caption",
    seed=0,
    file="",
    n_caps=N_CAPS,
    n_imgs=N_IMGS,
    caps_per_image=CPI,
    workdir=str(tmp_path / "work"),
  )
  kwargs.update(overrides)
  return noise.resolve_noise(**kwargs)


def test_zero_ratio_is_clean_without_a_file(tmp_path):
  result = _resolve(tmp_path, ratio=0.0)
  np.testing.assert_array_equal(result.t2i, np.arange(N_CAPS) // CPI)
  assert result.clean.all() and result.protocol == "none" and result.path == ""
  assert not os.path.exists(tmp_path / "work")


def test_caption_noise_saved_natively_and_reloaded(tmp_path):
  first = _resolve(tmp_path)
  assert first.path == str(tmp_path / "work" / "noise_caption_r0.4_s0.npy")
  saved = np.load(first.path)
  np.testing.assert_array_equal(saved, noise.caption_level_noise(N_CAPS, CPI, 0.4, 0))
  np.testing.assert_array_equal(first.t2i, saved)
  np.testing.assert_array_equal(first.clean, saved == np.arange(N_CAPS) // CPI)
  assert 0.55 < first.clean.mean() < 0.65
  again = _resolve(tmp_path)
  np.testing.assert_array_equal(again.t2i, first.t2i)
  from_file = _resolve(tmp_path, file=first.path, ratio=0.9)
  assert from_file.protocol == "caption"
  np.testing.assert_array_equal(from_file.t2i, first.t2i)


def test_image_noise_saved_as_permutation_and_expanded(tmp_path):
  result = _resolve(tmp_path, protocol="image", ratio=0.5, seed=2)
  perm = np.load(result.path)
  assert perm.shape == (N_IMGS,)
  np.testing.assert_array_equal(result.t2i, perm[np.arange(N_CAPS) // CPI])
  assert result.protocol == "image"
  np.testing.assert_array_equal(result.clean, np.repeat(perm == np.arange(N_IMGS), CPI))


def test_detects_image_permutation_expanded_per_caption(tmp_path):
  perm = noise.image_level_noise(N_IMGS, 0.3, seed=4)
  path = str(tmp_path / "expanded.npy")
  np.save(path, np.repeat(perm, CPI).astype(np.int32))
  result = noise.load_noise_file(path, N_CAPS, N_IMGS, CPI)
  assert result.protocol == "image" and result.t2i.dtype == np.int64
  np.testing.assert_array_equal(result.t2i, np.repeat(perm, CPI))


def test_accepts_integral_floats(tmp_path):
  path = str(tmp_path / "float.npy")
  np.save(path, noise.image_level_noise(N_IMGS, 0.3, seed=4).astype(np.float64))
  assert noise.load_noise_file(path, N_CAPS, N_IMGS, CPI).protocol == "image"


def test_existing_but_different_file_is_refused_and_kept(tmp_path):
  (tmp_path / "work").mkdir()
  path = tmp_path / "work" / "noise_caption_r0.4_s0.npy"
  np.save(path, np.arange(N_CAPS) // CPI)
  before = path.read_bytes()
  with pytest.raises(UserError, match="exists but differs"):
    _resolve(tmp_path)
  assert path.read_bytes() == before


@pytest.mark.parametrize(
  "array,message",
  [
    (np.zeros(N_CAPS + 1, np.int64), "length 1001; expected 1000"),
    (
      np.full(N_CAPS, N_IMGS, np.int64),
      r"entry 0 is 200, outside the image range \[0, 200\)",
    ),
    (np.full(N_IMGS, -1, np.int64), "entry 0 is -1, outside"),
    (np.full(N_CAPS, 0.5), "expected integer image indices, entry 0 is 0.5"),
    (np.zeros((N_IMGS, CPI), np.int64), "expected a 1-D index array"),
    (np.zeros(N_IMGS, np.int64), "must be a permutation"),
    (np.zeros(N_CAPS, bool), "got dtype bool"),
  ],
)
def test_rejects_malformed_noise_files(tmp_path, array, message):
  path = str(tmp_path / "bad.npy")
  np.save(path, array)
  with pytest.raises(UserError, match=message):
    noise.load_noise_file(path, N_CAPS, N_IMGS, CPI)


def test_rejects_unreadable_noise_file(tmp_path):
  path = tmp_path / "garbage.npy"
  path.write_bytes(b"\x00\x01garbage")
  with pytest.raises(UserError, match="garbage.npy: not a readable .npy"):
    noise.load_noise_file(str(path), N_CAPS, N_IMGS, CPI)
  with pytest.raises(UserError, match="missing.npy: not a readable .npy"):
    noise.load_noise_file(str(tmp_path / "missing.npy"), N_CAPS, N_IMGS, CPI)


@pytest.mark.parametrize(
  "overrides,message",
  [({"ratio": 1.5}, "noise.ratio"), ({"protocol": "word"}, "noise.protocol")],
)
def test_rejects_bad_settings(tmp_path, overrides, message):
  config = base.get_config()
  config.noise.update(overrides)
  with pytest.raises(UserError, match=message):
    config_checks.validate(config)
