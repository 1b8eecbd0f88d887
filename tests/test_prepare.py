"""Tests for the prepared ArrayRecord copy (TFDS builder) of a raw split."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rawdata
import tensorflow_datasets as tfds

from srem_jax.data import prepare, prepared_split
from srem_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def raw(tmp_path):
  truth = rawdata.write_raw(
    tmp_path / "raw", "toy", {"train": 4, "test": 3}, rows_per_caption=("test",)
  )
  return str(tmp_path / "raw"), truth


def _records(prepared_dir, split, record_set):
  builder = tfds.builder_from_directory(prepare.split_dir(prepared_dir, "toy", split))
  source = builder.as_data_source(f"{split}_{record_set}")
  return [source[i] for i in range(len(source))]


def test_round_trip_both_row_layouts_and_metadata(raw, tmp_path):
  raw_dir, truth = raw
  lines = []
  out = prepare.prepare(raw_dir, "toy", "", str(tmp_path / "prep"), log=lines.append)
  assert out == str(tmp_path / "prep")
  assert len(lines) == 2 and "toy/test: wrote 3 images" in lines[0]
  assert "15 captions" in lines[0]
  vocab_path = os.path.join(raw_dir, "vocab", "toy_vocab.json")
  for split in ("train", "test"):
    want = truth[split]
    images = _records(out, split, "images")
    assert [r["index"] for r in images] == list(range(len(want.images)))
    for record, expected in zip(images, want.images):
      np.testing.assert_array_equal(record["features"], expected)
      assert record["features"].dtype == np.float32
    captions = _records(out, split, "captions")
    assert [r["index"] for r in captions] == list(range(len(want.tokens)))
    assert [r["image"] for r in captions] == want.cap_to_img.tolist()
    for record, expected in zip(captions, want.tokens):
      np.testing.assert_array_equal(record["tokens"], expected)
    meta = prepare.read_metadata(out, "toy", split)
    assert meta["n_images"] == len(want.images)
    assert meta["n_captions"] == len(want.tokens) == 5 * len(want.images)
    assert meta["caps_per_image"] == 5
    assert (meta["num_regions"], meta["feature_dim"]) == (3, 4)
    assert meta["max_caption_len"] == max(len(t) for t in want.tokens)
    assert meta["vocab_size"] == 4 + len(rawdata.WORDS)
    assert meta["vocab_sha256"] == prepare.file_sha256(vocab_path)
  assert prepare.is_prepared(out, "toy", ["train", "test"])


def test_existing_copy_is_reused_not_rebuilt(raw, tmp_path):
  raw_dir, _ = raw
  out = prepare.prepare(
    raw_dir, "toy", "", str(tmp_path / "prep"), ["train"], log=print
  )
  stamp = os.path.getmtime(prepare.split_dir(out, "toy", "train"))
  lines = []
  prepare.prepare(raw_dir, "toy", "", out, ["train"], log=lines.append)
  assert "toy/train: reusing 4 images" in lines[0]
  assert os.path.getmtime(prepare.split_dir(out, "toy", "train")) == stamp
  assert not prepare.is_prepared(out, "toy", ["test"])
  assert prepare.is_prepared(out, "toy")


def test_copy_built_with_another_vocab_is_refused(raw, tmp_path):
  raw_dir, _ = raw
  out = prepare.prepare(
    raw_dir, "toy", "", str(tmp_path / "prep"), ["train"], log=print
  )
  other = str(tmp_path / "other_vocab.json")
  rawdata.write_vocab(other, words=rawdata.WORDS[::-1])
  with pytest.raises(
    UserError, match="another vocabulary.*data.vocab_path=.*other_vocab"
  ):
    prepare.prepare(raw_dir, "toy", other, out, ["train"], log=print)


def test_missing_vocab_and_missing_split(raw, tmp_path):
  raw_dir, _ = raw
  with pytest.raises(UserError, match="vocab_path"):
    prepare.prepare(raw_dir, "toy", str(tmp_path / "nope.json"), "", log=print)
  with pytest.raises(UserError, match="dev_ims.npy"):
    prepare.prepare(raw_dir, "toy", "", str(tmp_path / "prep"), ["dev"], log=print)
  with pytest.raises(UserError, match="no prepared copy of toy/dev"):
    prepared_split.load_prepared(str(tmp_path / "prep"), "toy", "dev")


def test_failed_build_leaves_no_copy(raw, tmp_path, monkeypatch):
  raw_dir, _ = raw
  out = str(tmp_path / "prep")

  def broken(self):
    yield from ()
    raise RuntimeError("disk full")

  monkeypatch.setattr(prepare.SremPrecomp, "_caption_examples", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    prepare.prepare(raw_dir, "toy", "", out, ["train"], log=print)
  assert not prepare.is_prepared(out, "toy", ["train"])
  assert not prepare.is_prepared(out, "toy")


def test_killed_build_is_not_taken_for_complete_and_is_rebuilt(raw, tmp_path):
  raw_dir, truth = raw
  out = str(tmp_path / "prep")
  script = textwrap.dedent(
    f"""
    import os
    from srem_jax.data import prepare
    written = prepare.SremPrecomp._caption_examples
    def dies_midway(self):
      for i, example in enumerate(written(self)):
        if i == 7:
          os._exit(17)  # like a kill: no cleanup runs
        yield example
    prepare.SremPrecomp._caption_examples = dies_midway
    prepare.prepare({raw_dir!r}, "toy", "", {out!r}, ["train"])
    """
  )
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
  assert done.returncode == 17, done.stderr.decode()[-2000:]
  leftovers = os.listdir(os.path.join(out, "toy", prepare.BUILDER_NAME, "train"))
  assert leftovers and all(name.startswith("incomplete") for name in leftovers)
  assert not prepare.is_prepared(out, "toy", ["train"])
  with pytest.raises(UserError, match="no prepared copy"):
    prepared_split.load_prepared(out, "toy", "train")
  prepare.prepare(raw_dir, "toy", "", out, ["train"], log=print)
  tokens = [r["tokens"].tolist() for r in _records(out, "train", "captions")]
  assert tokens == [t.tolist() for t in truth["train"].tokens]


def test_cli_prepares_every_split(raw, tmp_path):
  raw_dir, _ = raw
  out = str(tmp_path / "prep")
  done = subprocess.run(
    [sys.executable, "-m", "srem_jax.data.prepare", f"--raw_dir={raw_dir}",
     "--name=toy", f"--prepared_dir={out}"],
    cwd=REPO, capture_output=True, text=True,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"prepared toy in {os.path.join(out, 'toy')}" in done.stdout
  assert prepare.is_prepared(out, "toy", ["test", "train"])
  with open(os.path.join(prepare.split_dir(out, "toy", "test"), "metadata.json")) as f:
    assert json.load(f)["split"] == "test"
