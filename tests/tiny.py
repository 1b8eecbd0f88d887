"""Tiny model configs, loss options and random batches shared by step tests."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402
from srem_jax.train import step  # noqa: E402


def model_config(head="sgr", **dims):
  """configs/base.py's model with tiny dimensions (overridable)."""
  config = base.get_config().model
  sizes = dict(img_dim=12, embed_dim=16, word_dim=8, sim_dim=8, sgr_steps=2)
  config.update(dict(sizes, head=head, **dims))
  return config


def loss_options(name="srem"):
  """The default objective's keyword arguments, as the train step gets them."""
  config = base.get_config().loss
  config.name = name
  return step.loss_options(config)


def random_batch(seed, *, batch, regions, features, caption_len, vocab):
  """Random features and padded captions of random lengths, plus noise truth."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, caption_len + 1, size=batch).astype(np.int32)
  tokens = rng.integers(4, vocab, size=(batch, caption_len)).astype(np.int32)
  tokens[np.arange(caption_len)[None, :] >= lengths[:, None]] = 0
  return {
    "images": rng.normal(size=(batch, regions, features)).astype(np.float32),
    "tokens": tokens,
    "lengths": lengths,
    "cap_index": np.arange(batch, dtype=np.int32),
    "img_index": np.arange(batch, dtype=np.int32),
    "truly_clean": rng.random(batch) < 0.7,
  }
