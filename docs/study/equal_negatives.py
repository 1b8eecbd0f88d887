"""How often a clean in-batch negative matches its anchor as well as the positive.

Regenerates the demo's synthetic training split (seed 0, the sizes of
configs/demo.py) into a temporary folder, reads back which concepts every
image holds and every caption names, and counts, over random batches of 32
clean pairs, the anchors that have another pair in the batch whose caption
(for an image anchor) or image (for a caption anchor) covers all the concepts
the positive does. Such negatives would make a hardest-negative loss push
down a correct match.

    python docs/study/equal_negatives.py
"""

import re
import tempfile

import numpy as np

from srem_jax.data import synthetic

BATCH, BATCHES = 32, 2000


def main():
  sampled, worlds = [], []
  sample_images, world_class = synthetic._sample_images, synthetic._World

  def recording_sample(rng, world, n):
    objects, attached = sample_images(rng, world, n)
    sampled.append((objects, attached))
    return objects, attached

  class RecordingWorld(world_class):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      worlds.append(self)

  synthetic._sample_images, synthetic._World = recording_sample, RecordingWorld
  with tempfile.TemporaryDirectory() as out:
    folder = synthetic.generate(
      out,
      num_train=600,
      num_dev=100,
      num_test=200,
      num_regions=8,
      feature_dim=64,
      num_concepts=48,
      seed=0,
    )
    captions = open(f"{folder}/train_caps.txt").read().splitlines()
  n_images = len(captions) // synthetic.CAPS_PER_IMAGE
  # The train split is generated first, in chunks: its images come first.
  objects = np.concatenate([o for o, _ in sampled])[:n_images]
  attached = np.concatenate([a for _, a in sampled])[:n_images]
  concept_of = {w: c for c, names in enumerate(worlds[0].synonyms) for w in names}
  image_concepts = [set(o[o >= 0]) | set(a[a >= 0]) for o, a in zip(objects, attached)]
  caption_concepts = [
    {
      concept_of[t]
      for t in re.findall(r"[a-z]+(?:-[a-z]+)?", c.lower())
      if t in concept_of
    }
    for c in captions
  ]
  owner = np.arange(len(captions)) // synthetic.CAPS_PER_IMAGE
  assert all(
    caption_concepts[k] <= image_concepts[owner[k]] for k in range(len(captions))
  )

  rng = np.random.default_rng(0)
  image_anchor = caption_anchor = anchors = 0
  for _ in range(BATCHES):
    caps = rng.choice(len(captions), BATCH, replace=False)
    imgs = owner[caps]
    for a in range(BATCH):
      others = [b for b in range(BATCH) if imgs[b] != imgs[a]]
      image_anchor += any(
        caption_concepts[caps[b]] <= image_concepts[imgs[a]] for b in others
      )
      caption_anchor += any(
        caption_concepts[caps[a]] <= image_concepts[imgs[b]] for b in others
      )
      anchors += 1
  print(
    f"batches of {BATCH} clean pairs: anchors with an equally good negative: "
    f"image anchors {image_anchor / anchors:.3f}, caption anchors {caption_anchor / anchors:.3f}"
  )
  print(
    f"concepts per caption {np.mean([len(s) for s in caption_concepts]):.2f}, "
    f"per image {np.mean([len(s) for s in image_concepts]):.2f}"
  )


if __name__ == "__main__":
  main()
