"""The sizes a run's programs take from its data, for compiling them without
the data: from the config where it says, else those of the dataset it names
(Flickr30K's when it names none this project knows), each assumption noted.

    shapes = data_shapes(config)  # num_regions, img_dim, caption_len, ...
    print(shapes.note)            # "captions padded to 77 (f30k_precomp's longest; ...)"
"""

import dataclasses

# What a config leaves to its data, for datasets this project names. Flickr30K
# (SCAN f30k_precomp): vocabulary 8481 words; the longest test caption has
# 77 tokens with <start>/<end> (shared/data/f30k_caption_lengths.json); 29,000
# training images. COCO (coco_precomp, train with restval): 113,287 images.
KNOWN_DATA = {
  "f30k_precomp": dict(vocab_size=8481, caption_len=77, train_images=29000),
  "coco_precomp": dict(vocab_size=8481, caption_len=77, train_images=113287),
}
DEFAULT_DATA = KNOWN_DATA["f30k_precomp"]


@dataclasses.dataclass(frozen=True)
class DataShapes:
  """The sizes a run reads from its data, here from the config or assumed."""

  num_regions: int
  img_dim: int
  caption_len: int  # the static length: the largest caption bucket
  vocab_size: int
  train_images: int
  note: str


# The embedded synthetic data's captions: at most 18 words in the demo's
# generated splits (so 24 tokens with <start>/<end> bounds them); with
# `long_captions`, at most 80 words plus a phrase.
SYNTHETIC_CAPTION_LEN, SYNTHETIC_LONG_CAPTION_LEN = 24, 96


def data_shapes(config, caption_len=0, vocab_size=0) -> DataShapes:
  synthetic = config.data.synthetic
  known = KNOWN_DATA.get(config.data.name)
  assumed = known or DEFAULT_DATA
  notes = []
  if synthetic.enabled:
    regions, images = synthetic.num_regions, synthetic.num_train
    longest = (
      SYNTHETIC_LONG_CAPTION_LEN if synthetic.long_captions else SYNTHETIC_CAPTION_LEN
    )
    where = "a bound on the synthetic captions"
  else:
    regions, images = 36, assumed["train_images"]  # SCAN's 36 regions per image
    longest = assumed["caption_len"]
    where = f"{config.data.name}'s longest" if known else "F30K's longest"
  length = caption_len or config.data.caption_len or longest
  if not (caption_len or config.data.caption_len):
    notes.append(f"captions padded to {length} ({where}; --caption_len to change)")
  vocab = vocab_size or assumed["vocab_size"]
  if not (vocab_size or known):
    notes.append(f"vocabulary {vocab} words (F30K's; --vocab_size to change)")
  return DataShapes(
    regions, config.model.img_dim, length, vocab, images, "; ".join(notes)
  )
