"""The embedded synthetic dataset, written in the SCAN precomp layout
(docs/method.md §Testbed).

A seeded world of latent concepts, objects and attributes, each with a random
Gaussian prototype in feature space and 2-3 synonym words. An image holds 2-3
objects, 1-2 of them with an attribute; about half its regions show an object
(its prototype, plus its attribute's, plus noise, ReLU'd like bottom-up
features) and the rest show clutter unrelated to any word. Its 5 captions each
mention a random subset of the objects through synonyms, wrapped in filler
words and punctuation. Train has one feature row per image; dev and test
repeat each row 5x, like the F30K/COCO files, so both layouts are exercised.
With `long_captions`, each caption is lengthened with filler words to a word
count drawn from a long-tailed (log-normal) distribution shaped like
Flickr30K's: median 12 words, about 1% over 33, a tail reaching ~70.

    path = generate("data/demo", num_train=1000, feature_dim=128)
    # python -m srem_jax.data.synthetic --out data/demo --feature_dim 128
"""

import dataclasses
import os
import shutil
import sys

import numpy as np
from absl import app, flags

from srem_jax.data import layout, tokenizer
from srem_jax.errors import UserError

CAPS_PER_IMAGE = 5
_IMAGES_PER_CHUNK = 128  # images generated at once; bounds memory, fixes RNG order
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_INTROS = ("a photo of", "there's", "an image showing", "we can see", "it's", "")
_CONNECTORS = (" with ", " near ", " and ", ", ", " next to ", " beside ")
_ENDINGS = (".", "", " .", "!", " in the scene.", " (outdoors).")
_ARTICLES = ("a", "the", "one")
# Flickr30K-like caption lengths in words: log-normal around a median of 12.
_LONG_MEDIAN_WORDS, _LONG_SIGMA, _LONG_MAX_WORDS = 12, 0.43, 80
_PADDING_WORDS = ("the", "a", "with", "near", "and", "in", "scene", "of", "one")
_FILLER = frozenset(
  w for text in _INTROS + _CONNECTORS + _ENDINGS + _ARTICLES for w in text.split()
)


@dataclasses.dataclass(frozen=True)
class Statistics:
  """What the generator draws; the defaults write the embedded dataset.

  Ranges are inclusive. `object_regions` is the fraction of an image's regions
  that show one of its objects (the rest show clutter); `noise` is the region
  noise std relative to the unit-variance prototypes; `intros` prefixes
  captions with a phrase such as "a photo of".
  """

  synonyms: tuple[int, int] = (2, 3)
  objects: tuple[int, int] = (2, 3)
  object_regions: float = 0.5
  noise: float = 1.0
  intros: bool = True

  def check(self) -> None:
    for field in ("synonyms", "objects"):
      low, high = getattr(self, field)
      if not 1 <= low <= high:
        raise UserError(
          f"synthetic {field}: expected 1 <= min <= max, got {low}, {high}"
        )
    if self.objects[0] < 2:
      raise UserError(
        f"synthetic objects: a caption mentions at least 2 objects, so images "
        f"need at least 2; got min {self.objects[0]}"
      )
    if not 0.0 <= self.object_regions <= 1.0:
      raise UserError(
        f"synthetic object_regions: expected a fraction in [0, 1], got "
        f"{self.object_regions}"
      )
    if self.noise < 0.0:
      raise UserError(f"synthetic noise: expected >= 0, got {self.noise}")


class _World:
  """Concept prototypes, clutter prototypes and the words naming each concept."""

  def __init__(
    self,
    rng: np.random.Generator,
    num_concepts: int,
    feature_dim: int,
    stats: Statistics = Statistics(),
  ):
    self.stats = stats
    self.num_attributes = max(2, num_concepts // 4)
    self.num_objects = num_concepts - self.num_attributes
    # Row num_concepts stays zero: "no attribute" adds nothing to a region.
    self.prototypes = np.zeros((num_concepts + 1, feature_dim), np.float32)
    self.prototypes[:num_concepts] = rng.standard_normal(
      (num_concepts, feature_dim), dtype=np.float32
    )
    self.clutter = rng.standard_normal(
      (2 * num_concepts, feature_dim), dtype=np.float32
    )
    self.synonyms = self._name_concepts(rng, num_concepts, stats.synonyms)

  @staticmethod
  def _name_concepts(
    rng: np.random.Generator, num_concepts: int, synonyms_range: tuple[int, int]
  ) -> list[list[str]]:
    used, synonyms = set(_FILLER), []

    def pseudo_word() -> str:
      syllables = rng.integers(2, 4)
      letters = [
        _CONSONANTS[rng.integers(len(_CONSONANTS))]
        + _VOWELS[rng.integers(len(_VOWELS))]
        for _ in range(syllables)
      ]
      word = "".join(letters)
      # Some hyphenated names, which the tokenizer must keep whole.
      return word[:2] + "-" + word[2:] if rng.random() < 0.1 else word

    for _ in range(num_concepts):
      names, count = [], rng.integers(synonyms_range[0], synonyms_range[1] + 1)
      while len(names) < count:
        word = pseudo_word()
        if word not in used:
          used.add(word)
          names.append(word)
      synonyms.append(names)
    return synonyms


def _sample_images(rng: np.random.Generator, world: _World, n: int):
  """Per image: objects (n, max objects) with -1 padding, and their attribute
  (or -1)."""
  low, high = world.stats.objects
  objects = rng.random((n, world.num_objects)).argsort(axis=1)[:, :high]
  attributes = (
    world.num_objects + rng.random((n, world.num_attributes)).argsort(axis=1)[:, :2]
  )
  num_objects = rng.integers(low, high + 1, size=n)
  num_attributes = np.minimum(rng.integers(1, 3, size=n), num_objects)
  slot = np.arange(high)
  objects = np.where(slot < num_objects[:, None], objects, -1)
  attached = np.full((n, high), -1)
  attached[:, :2] = np.where(slot[:2] < num_attributes[:, None], attributes, -1)
  return objects, attached


def _region_features(rng, world: _World, objects, attached, num_regions: int):
  n = objects.shape[0]
  num_objects = (objects >= 0).sum(axis=1)
  region = np.arange(num_regions)
  shown = int(num_regions * world.stats.object_regions)
  object_regions = np.minimum(num_regions, np.maximum(num_objects, shown))
  slot = region[None, :] % num_objects[:, None]
  shows_object = region[None, :] < object_regions[:, None]
  rows = np.arange(n)[:, None]
  no_concept = world.prototypes.shape[0] - 1
  obj = np.where(shows_object, objects[rows, slot], no_concept)
  att = np.where(
    shows_object & (attached[rows, slot] >= 0), attached[rows, slot], no_concept
  )
  clutter = rng.integers(world.clutter.shape[0], size=(n, num_regions))
  order = rng.random((n, num_regions)).argsort(axis=1)
  obj, att, clutter = obj[rows, order], att[rows, order], clutter[rows, order]
  shows_object = shows_object[rows, order]
  # In place, and uniform rather than Gaussian noise (4x cheaper to draw):
  # this is most of the generation time at the default sizes.
  shape = (*obj.shape, world.prototypes.shape[1])
  features = rng.random(shape, dtype=np.float32)
  features -= 0.5
  features *= world.stats.noise * np.sqrt(12.0)  # unit variance times the scale
  features[shows_object] += world.prototypes[obj[shows_object]]
  features[shows_object] += world.prototypes[att[shows_object]]
  features[~shows_object] += world.clutter[clutter[~shows_object]]
  return np.maximum(features, 0.0, out=features)


def _caption(rng: np.random.Generator, world: _World, objects, attached) -> str:
  present = [(o, a) for o, a in zip(objects, attached) if o >= 0]
  mentioned = rng.permutation(len(present))[: rng.integers(2, len(present) + 1)]
  phrases = []
  for index in mentioned:
    obj, att = present[index]
    words = [_ARTICLES[rng.integers(len(_ARTICLES))]]
    if att >= 0 and rng.random() < 0.7:
      words.append(rng.choice(world.synonyms[att]))
    words.append(rng.choice(world.synonyms[obj]))
    phrases.append(" ".join(words))
  text = phrases[0]
  for phrase in phrases[1:]:
    text += _CONNECTORS[rng.integers(len(_CONNECTORS))] + phrase
  if world.stats.intros:
    text = f"{_INTROS[rng.integers(len(_INTROS))]} {text}".strip()
  text += _ENDINGS[rng.integers(len(_ENDINGS))]
  return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def _lengthen(rng: np.random.Generator, text: str) -> str:
  """`text` plus filler words up to a long-tailed drawn word count (never cut)."""
  drawn = rng.lognormal(np.log(_LONG_MEDIAN_WORDS), _LONG_SIGMA)
  extra = min(int(round(drawn)), _LONG_MAX_WORDS) - len(text.split())
  if extra <= 0:
    return text
  words = rng.choice(_PADDING_WORDS, size=extra)
  return text + " " + " ".join(words)


def _write_split(
  folder, split, rng, world, n, num_regions, rows_per_image, long_captions=False
) -> list[str]:
  shape = (n * rows_per_image, num_regions, world.prototypes.shape[1])
  path = os.path.join(folder, f"{split}_ims.npy")
  features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
  captions = []
  for start in range(0, n, _IMAGES_PER_CHUNK):
    count = min(_IMAGES_PER_CHUNK, n - start)
    objects, attached = _sample_images(rng, world, count)
    block = _region_features(rng, world, objects, attached, num_regions)
    rows = slice(start * rows_per_image, (start + count) * rows_per_image)
    features[rows] = np.repeat(block, rows_per_image, axis=0)
    for i in range(count):
      for _ in range(CAPS_PER_IMAGE):
        caption = _caption(rng, world, objects[i], attached[i])
        captions.append(_lengthen(rng, caption) if long_captions else caption)
  features.flush()
  del features
  with open(os.path.join(folder, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
    f.write("".join(caption + "\n" for caption in captions))
  return captions


def generate(
  out_dir: str,
  *,
  name: str = "synthetic_precomp",
  num_train: int = 2000,
  num_dev: int = 200,
  num_test: int = 200,
  num_regions: int = 36,
  feature_dim: int = 2048,
  num_concepts: int = 64,
  seed: int = 0,
  long_captions: bool = False,
  stats: Statistics = Statistics(),
) -> str:
  """Writes the dataset and its vocabulary under `out_dir`; returns the dataset folder.

  `long_captions` gives captions Flickr30K-like long-tailed lengths; `stats`
  changes what the generator draws (the defaults are the embedded dataset's).
  """
  sizes = dict(
    num_train=num_train,
    num_dev=num_dev,
    num_test=num_test,
    num_regions=num_regions,
    feature_dim=feature_dim,
  )
  for field, value in sizes.items():
    if value < 1:
      raise UserError(
        f"data.synthetic.{field}: expected a positive integer, got {value}"
      )
  if num_concepts < 8:
    raise UserError(
      f"data.synthetic.num_concepts: expected at least 8, got {num_concepts}"
    )
  stats.check()
  num_objects = num_concepts - max(2, num_concepts // 4)
  if stats.objects[1] > num_objects:
    raise UserError(
      f"synthetic objects: at most {num_objects} objects exist with "
      f"{num_concepts} concepts, got max {stats.objects[1]}"
    )
  folder = os.path.join(out_dir, name)
  vocab_path = layout.resolve_vocab_path(out_dir, name)
  if os.path.isdir(folder) and os.listdir(folder):
    raise UserError(
      f"{folder}: already exists and is not empty; refusing to overwrite it"
    )
  if os.path.exists(vocab_path):
    raise UserError(f"{vocab_path}: already exists; refusing to overwrite it")

  # Independent streams, so the dev/test data do not change with num_train.
  world_seq, *split_seqs = np.random.SeedSequence(seed).spawn(4)
  world = _World(np.random.default_rng(world_seq), num_concepts, feature_dim, stats)
  # Written aside and moved in place at the end: an interrupted run leaves no
  # half-written dataset that a later run would refuse to replace.
  staging = os.path.join(out_dir, f".{name}.partial-{os.getpid()}")
  os.makedirs(staging)
  try:
    captions = []
    splits = (
      ("train", num_train, 1),
      ("dev", num_dev, CAPS_PER_IMAGE),
      ("test", num_test, CAPS_PER_IMAGE),
    )
    for (split, n, rows_per_image), seq in zip(splits, split_seqs):
      rng = np.random.default_rng(seq)
      written = _write_split(
        staging, split, rng, world, n, num_regions, rows_per_image, long_captions
      )
      if split != "test":
        captions += written
    tokenizer.build_vocab(captions, min_count=4).save(vocab_path)
    if os.path.isdir(folder):
      os.rmdir(folder)
    os.rename(staging, folder)
  finally:
    if os.path.isdir(staging):
      shutil.rmtree(staging)
  return folder


def _define_flags() -> None:
  flags.DEFINE_string(
    "out", None, "Folder that receives <name>/ and vocab/.", required=True
  )
  flags.DEFINE_string("name", "synthetic_precomp", "Dataset folder name.")
  flags.DEFINE_integer("num_train", 2000, "Training images (5 captions each).")
  flags.DEFINE_integer("num_dev", 200, "Dev images.")
  flags.DEFINE_integer("num_test", 200, "Test images.")
  flags.DEFINE_integer("num_regions", 36, "Regions per image.")
  flags.DEFINE_integer("feature_dim", 2048, "Width of a region feature.")
  flags.DEFINE_integer(
    "num_concepts", 64, "Latent concepts shared by images and words."
  )
  flags.DEFINE_integer("seed", 0, "Generator seed.")
  flags.DEFINE_bool(
    "long_captions", False, "Flickr30K-like long-tailed caption lengths."
  )
  default = Statistics()
  flags.DEFINE_list(
    "synonyms", list(map(str, default.synonyms)), "Words per concept: min,max."
  )
  flags.DEFINE_list(
    "objects", list(map(str, default.objects)), "Objects per image: min,max."
  )
  flags.DEFINE_float(
    "object_regions", default.object_regions, "Fraction of regions showing an object."
  )
  flags.DEFINE_float("noise", default.noise, "Region noise std (prototypes: 1).")
  flags.DEFINE_bool("intros", default.intros, "Start captions with 'a photo of' etc.")


def _int_range(name: str, values: list[str]) -> tuple[int, int]:
  try:
    low, high = (int(v) for v in values)
  except ValueError:
    raise UserError(f"--{name}: expected two integers min,max, got {values}") from None
  return low, high


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    stats = Statistics(
      synonyms=_int_range("synonyms", f.synonyms),
      objects=_int_range("objects", f.objects),
      object_regions=f.object_regions,
      noise=f.noise,
      intros=f.intros,
    )
    folder = generate(
      f.out,
      name=f.name,
      num_train=f.num_train,
      num_dev=f.num_dev,
      num_test=f.num_test,
      num_regions=f.num_regions,
      feature_dim=f.feature_dim,
      num_concepts=f.num_concepts,
      seed=f.seed,
      long_captions=f.long_captions,
      stats=stats,
    )
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  vocab_path = layout.resolve_vocab_path(f.out, f.name)
  print(f"wrote {folder}: {', '.join(sorted(os.listdir(folder)))}")
  print(f"wrote {vocab_path}: {len(tokenizer.Vocab.load(vocab_path))} words")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
