"""SCAN precomp reader: both row layouts, tsv captions and every user error."""

import os

import numpy as np
import pytest

from srem_jax.data import layout
from srem_jax.errors import UserError

NAME = "toy_precomp"


def _write(tmp_path, split, features, captions=None, tsv_lines=None):
  folder = tmp_path / NAME
  folder.mkdir(exist_ok=True)
  np.save(folder / f"{split}_ims.npy", features)
  if captions is not None:
    (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))
  if tsv_lines is not None:
    (folder / f"{split}_caps.tsv").write_text("".join(t + "\n" for t in tsv_lines))
  return str(tmp_path)


def _features(n, regions=3, dim=4, seed=0):
  return np.random.default_rng(seed).random((n, regions, dim), dtype=np.float32)


def test_reads_one_row_per_image(tmp_path):
  features = _features(3)
  captions = [f"caption {k}" for k in range(15)]
  raw = _write(tmp_path, "train", features, captions)
  split = layout.read_split(raw, NAME, "train")
  assert split.caps_per_image == 5
  np.testing.assert_array_equal(split.images, features)
  assert split.captions == captions
  np.testing.assert_array_equal(split.cap_to_img, np.arange(15) // 5)
  assert split.cap_to_img.dtype == np.int64
  assert isinstance(split.images, np.memmap)


def test_rows_repeated_per_caption_keep_each_image_once(tmp_path):
  features = _features(4)
  raw = _write(tmp_path, "test", np.repeat(features, 5, axis=0), ["a dog"] * 20)
  split = layout.read_split(raw, NAME, "test")
  assert split.caps_per_image == 5
  np.testing.assert_array_equal(split.images, features)
  np.testing.assert_array_equal(split.cap_to_img, np.arange(20) // 5)


def test_distinct_row_per_caption_means_one_caption_per_image(tmp_path):
  raw = _write(tmp_path, "dev", _features(5), [f"c{k}" for k in range(5)])
  split = layout.read_split(raw, NAME, "dev")
  assert split.caps_per_image == 1
  np.testing.assert_array_equal(split.cap_to_img, np.arange(5))


def test_tsv_one_caption_per_image_with_quotes(tmp_path):
  lines = ["id0\ta man on a horse", 'id1\t"a ""quoted"" sign"', "id2\t  a cat  "]
  raw = _write(tmp_path, "train", _features(3), tsv_lines=lines)
  split = layout.read_split(raw, NAME, "train")
  assert split.captions == ["a man on a horse", 'a "quoted" sign', "a cat"]
  assert split.caps_per_image == 1
  np.testing.assert_array_equal(split.cap_to_img, np.arange(3))


def test_list_splits_and_vocab_path(tmp_path):
  raw = _write(tmp_path, "train", _features(1), ["x"] * 5)
  _write(tmp_path, "testall", _features(1), ["x"] * 5)
  np.save(tmp_path / NAME / "orphan_ims.npy", _features(1))
  assert layout.list_splits(raw, NAME) == ["testall", "train"]
  assert layout.list_splits(raw, "missing") == []
  assert layout.resolve_vocab_path(raw, NAME) == os.path.join(
    raw, "vocab", f"{NAME}_vocab.json"
  )
  assert layout.resolve_vocab_path(raw, NAME, "my.json") == "my.json"


def test_missing_folder_lists_expected_files(tmp_path):
  with pytest.raises(UserError, match=r"train_ims\.npy and train_caps\.txt"):
    layout.read_split(str(tmp_path), NAME, "train")


def test_missing_caption_file(tmp_path):
  raw = _write(tmp_path, "train", _features(1))
  with pytest.raises(UserError, match=r"train_caps\.txt: file not found"):
    layout.read_split(raw, NAME, "train")


def test_missing_feature_file(tmp_path):
  (tmp_path / NAME).mkdir()
  (tmp_path / NAME / "dev_caps.txt").write_text("a\n")
  with pytest.raises(UserError, match=r"dev_ims\.npy: file not found"):
    layout.read_split(str(tmp_path), NAME, "dev")


@pytest.mark.parametrize(
  "features", [np.zeros((2, 3), np.float32), np.zeros((2, 3, 4), np.int32)]
)
def test_rejects_wrong_rank_or_dtype(tmp_path, features):
  raw = _write(tmp_path, "train", features, ["x"] * 10)
  with pytest.raises(UserError, match=r"train_ims\.npy: expected a float array"):
    layout.read_split(raw, NAME, "train")


def test_rejects_unreadable_npy(tmp_path):
  raw = _write(tmp_path, "train", _features(1), ["x"] * 5)
  (tmp_path / NAME / "train_ims.npy").write_bytes(b"not an npy file")
  with pytest.raises(UserError, match=r"train_ims\.npy: not a readable"):
    layout.read_split(raw, NAME, "train")


def test_rejects_caption_count_mismatch(tmp_path):
  raw = _write(tmp_path, "train", _features(3), ["x"] * 7)
  with pytest.raises(UserError, match="7 captions is neither"):
    layout.read_split(raw, NAME, "train")


def test_rejects_empty_caption_line_with_its_number(tmp_path):
  raw = _write(tmp_path, "train", _features(1), ["a", "b", "  ", "d", "e"])
  with pytest.raises(UserError, match="line 3 is an empty caption"):
    layout.read_split(raw, NAME, "train")


def test_rejects_tsv_line_without_tab(tmp_path):
  raw = _write(tmp_path, "train", _features(2), tsv_lines=["id0\tok", "no tab here"])
  with pytest.raises(UserError, match="line 2 has no tab"):
    layout.read_split(raw, NAME, "train")


@pytest.mark.parametrize("repeated", [False, True])
def test_reports_first_non_finite_row(tmp_path, repeated, monkeypatch):
  monkeypatch.setattr(layout, "_FINITE_CHECK_ROWS", 2)  # bad row in a later chunk
  features = _features(6)
  features[4, 1, 2] = np.inf
  features[5, 0, 0] = np.nan
  if repeated:
    features = np.repeat(features, 5, axis=0)
  raw = _write(tmp_path, "train", features, ["x"] * 30)
  expected_row = 20 if repeated else 4
  with pytest.raises(
    UserError, match=f"train_ims.npy: row {expected_row} contains NaN"
  ):
    layout.read_split(raw, NAME, "train")
  assert layout.read_split(raw, NAME, "train", check_finite=False).images.shape[0] == 6
