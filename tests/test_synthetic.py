"""Synthetic dataset: layout, determinism, and that captions predict images."""

import os

import numpy as np
import pytest

from srem_jax.data import layout, synthetic, tokenizer
from srem_jax.errors import UserError

SMALL = dict(
  num_train=400, num_dev=60, num_test=10, num_regions=8, feature_dim=64, num_concepts=24
)
NAME = "synthetic_precomp"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic"))
  return out, synthetic.generate(out, seed=0, **SMALL)


def _bytes(folder):
  return {
    f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
  }


def test_writes_the_scan_layout_with_both_row_layouts(dataset):
  out, folder = dataset
  assert folder == os.path.join(out, NAME)
  assert layout.list_splits(out, NAME) == ["dev", "test", "train"]
  train = layout.read_split(out, NAME, "train")
  dev = layout.read_split(out, NAME, "dev")
  assert np.load(os.path.join(folder, "train_ims.npy"), mmap_mode="r").shape == (
    400,
    8,
    64,
  )
  assert np.load(os.path.join(folder, "dev_ims.npy"), mmap_mode="r").shape == (
    300,
    8,
    64,
  )
  assert train.images.shape == (400, 8, 64) and dev.images.shape == (60, 8, 64)
  assert train.caps_per_image == dev.caps_per_image == 5
  assert len(train.captions) == 2000 and len(dev.captions) == 300
  assert train.images.dtype == np.float32 and float(np.min(train.images)) >= 0.0
  # Every image has several distinct captions.
  per_image = np.asarray(train.captions).reshape(400, 5)
  assert np.mean([len(set(row)) for row in per_image]) > 4


def test_vocab_covers_concept_words_and_punctuation(dataset):
  out, _ = dataset
  vocab = tokenizer.Vocab.load(layout.resolve_vocab_path(out, NAME))
  assert {"a", "of", "with", ".", ",", "'s", "!", "("} <= set(vocab.word2idx)
  assert any("-" in word for word in vocab.word2idx)
  dev = layout.read_split(out, NAME, "dev")
  unknown = np.mean([np.mean(vocab.encode(c) == vocab.UNK) for c in dev.captions])
  assert unknown < 0.02


def test_ridge_regression_from_words_retrieves_dev_images(dataset):
  """Bag of words -> mean region feature, fitted on train: dev text->image R@1.

  At these sizes R@1 is 0.64 (chance 1/60); fitted on shuffled pairs it falls
  to chance, so the signal is in the image-caption pairing.
  """
  out, _ = dataset
  vocab = tokenizer.Vocab.load(layout.resolve_vocab_path(out, NAME))

  def bag_of_words(captions):
    counts = np.zeros((len(captions), len(vocab)))
    for row, caption in enumerate(captions):
      np.add.at(counts[row], vocab.encode(caption)[1:-1], 1.0)
    return counts

  train = layout.read_split(out, NAME, "train")
  dev = layout.read_split(out, NAME, "dev")
  train_targets = np.asarray(train.images, np.float64).mean(axis=1)
  center = train_targets.mean(axis=0)
  images = np.asarray(dev.images, np.float64).mean(axis=1) - center
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  x_train, x_dev = bag_of_words(train.captions), bag_of_words(dev.captions)

  def recall_at_1(pairing):
    y = train_targets[pairing] - center
    weights = np.linalg.solve(x_train.T @ x_train + np.eye(len(vocab)), x_train.T @ y)
    predicted = x_dev @ weights
    predicted /= np.linalg.norm(predicted, axis=1, keepdims=True) + 1e-12
    return np.mean(np.argmax(predicted @ images.T, axis=1) == dev.cap_to_img)

  assert recall_at_1(train.cap_to_img) > 0.5
  shuffled = np.random.default_rng(0).permutation(train.cap_to_img)
  assert recall_at_1(shuffled) < 0.1


def test_same_seed_same_bytes_other_seed_differs(dataset, tmp_path):
  _, folder = dataset
  again = synthetic.generate(str(tmp_path / "a"), seed=0, **SMALL)
  assert _bytes(again) == _bytes(folder)
  other = synthetic.generate(str(tmp_path / "b"), seed=1, **SMALL)
  other_bytes = _bytes(other)
  assert other_bytes.keys() == _bytes(folder).keys()
  assert all(other_bytes[f] != b for f, b in _bytes(folder).items())


def test_refuses_to_overwrite(dataset, tmp_path):
  out, folder = dataset
  before = _bytes(folder)
  with pytest.raises(UserError, match="not empty; refusing to overwrite"):
    synthetic.generate(out, seed=3, **SMALL)
  assert _bytes(folder) == before
  (tmp_path / "vocab").mkdir()
  (tmp_path / "vocab" / f"{NAME}_vocab.json").write_text("{}")
  with pytest.raises(UserError, match="vocab.json: already exists"):
    synthetic.generate(str(tmp_path), **SMALL)
  assert not os.path.exists(tmp_path / NAME)


@pytest.mark.parametrize(
  "field,value", [("num_train", 0), ("feature_dim", -1), ("num_concepts", 3)]
)
def test_rejects_bad_sizes(tmp_path, field, value):
  with pytest.raises(UserError, match=f"data.synthetic.{field}"):
    synthetic.generate(str(tmp_path), **{**SMALL, field: value})


def test_statistics_change_what_is_drawn(tmp_path):
  stats = synthetic.Statistics(
    synonyms=(1, 1), objects=(4, 4), object_regions=1.0, noise=0.0, intros=False
  )
  rng = np.random.default_rng(0)
  world = synthetic._World(rng, 24, 16, stats)
  assert all(len(names) == 1 for names in world.synonyms)
  objects, attached = synthetic._sample_images(rng, world, 50)
  assert objects.shape == (50, 4) and (objects >= 0).all()
  features = synthetic._region_features(rng, world, objects, attached, 8)
  # Without noise and clutter every region is ReLU(object + attribute prototype).
  for image in range(3):
    expected = np.maximum(
      world.prototypes[objects[image]]
      + world.prototypes[np.where(attached[image] >= 0, attached[image], -1)],
      0.0,
    )
    got = {tuple(np.round(row, 5)) for row in features[image]}
    assert got == {tuple(np.round(row, 5)) for row in expected}
  starts = {synthetic._caption(rng, world, objects[i], attached[i]).lower().split()[0]
            for i in range(50)}
  intro_words = {phrase.split()[0] for phrase in synthetic._INTROS if phrase}
  assert not starts & (intro_words - set(synthetic._ARTICLES))
  folder = synthetic.generate(str(tmp_path), seed=0, **SMALL, stats=stats)
  assert os.path.exists(os.path.join(folder, "train_caps.txt"))


@pytest.mark.parametrize(
  "stats,match",
  [
    (dict(synonyms=(0, 2)), "synonyms"),
    (dict(objects=(3, 2)), "objects"),
    (dict(objects=(1, 3)), "at least 2"),
    (dict(objects=(2, 30)), "at most 18 objects"),
    (dict(object_regions=1.5), "object_regions"),
    (dict(noise=-1.0), "noise"),
  ],
)
def test_rejects_bad_statistics(tmp_path, stats, match):
  with pytest.raises(UserError, match=match):
    synthetic.generate(str(tmp_path), **SMALL, stats=synthetic.Statistics(**stats))
  assert not os.listdir(tmp_path)
