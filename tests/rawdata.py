"""Tiny raw SCAN precomp folders for tests, written with plain numpy.

Captions are space-separated lower-case words from a fixed word list, so the
expected token ids are `[1, word2idx[w]..., 2]` without any tokenizer.

    expected = write_raw(tmp_path, "toy", {"train": 4, "test": 3})
    expected["train"].images.shape  # (4, regions, dim)
"""

import dataclasses
import json
import os

import numpy as np

WORDS = ("a", "dog", "cat", "runs", "on", "grass", "red", "ball", "man", "sits")
CAPS_PER_IMAGE = 5


@dataclasses.dataclass
class RawTruth:
  images: np.ndarray  # (n_images, R, D) one row per image
  tokens: list[np.ndarray]  # per caption, with <start>/<end>
  cap_to_img: np.ndarray


def write_vocab(path: str, words=WORDS) -> dict[str, int]:
  word2idx = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}
  for word in words:
    word2idx[word] = len(word2idx)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(
      {
        "word2idx": word2idx,
        "idx2word": {str(i): w for w, i in word2idx.items()},
        "idx": len(word2idx),
      },
      f,
    )
  return word2idx


def write_raw(
  raw_dir,
  name: str,
  images_per_split: dict[str, int],
  *,
  num_regions: int = 3,
  feature_dim: int = 4,
  rows_per_caption: tuple[str, ...] = (),
  seed: int = 0,
) -> dict[str, RawTruth]:
  """Writes `<raw_dir>/<name>/` and `<raw_dir>/vocab/<name>_vocab.json`.

  Splits named in `rows_per_caption` repeat each image row once per caption,
  as the F30K/COCO dev and test files do.
  """
  raw_dir = os.fspath(raw_dir)
  rng = np.random.default_rng(seed)
  word2idx = write_vocab(os.path.join(raw_dir, "vocab", f"{name}_vocab.json"))
  folder = os.path.join(raw_dir, name)
  os.makedirs(folder, exist_ok=True)
  truth = {}
  for split, n_images in images_per_split.items():
    images = rng.normal(size=(n_images, num_regions, feature_dim)).astype(np.float32)
    rows = (
      np.repeat(images, CAPS_PER_IMAGE, axis=0) if split in rows_per_caption else images
    )
    np.save(os.path.join(folder, f"{split}_ims.npy"), rows)
    captions, tokens = [], []
    for _ in range(n_images * CAPS_PER_IMAGE):
      words = list(rng.choice(WORDS, size=rng.integers(1, 9)))
      captions.append(" ".join(words))
      tokens.append(np.array([1, *(word2idx[w] for w in words), 2], np.int32))
    with open(os.path.join(folder, f"{split}_caps.txt"), "w") as f:
      f.write("\n".join(captions) + "\n")
    cap_to_img = np.arange(n_images * CAPS_PER_IMAGE) // CAPS_PER_IMAGE
    truth[split] = RawTruth(images, tokens, cap_to_img)
  return truth
