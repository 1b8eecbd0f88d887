"""benchmarks/head_spread.py: the spread split and the float64 SGR head."""

import jax
import numpy as np
from scripts import load_benchmark

from srem_jax.models.sgraf import SGRAF

head_spread = load_benchmark("head_spread")


def test_spread_splits_a_sum_of_known_parts():
  rng = np.random.default_rng(0)
  n, m, d = 6, 5, 3
  image = rng.normal(size=(n, 1, d))
  caption = rng.normal(size=(1, m, d))
  pair = rng.normal(size=(n, m, d))
  # Centre each part so that the three are exactly the split's parts.
  image -= image.mean(0)
  caption -= caption.mean(1, keepdims=True)
  pair -= pair.mean(0, keepdims=True) + pair.mean(1, keepdims=True) - pair.mean((0, 1))
  total, got_image, got_caption, got_pair = head_spread.spread(
    7.0 + image + caption + pair
  )

  def rms(x):
    return np.sqrt(np.square(np.broadcast_to(x, (n, m, d))).sum(-1).mean())

  np.testing.assert_allclose(got_image, rms(image), rtol=1e-12)
  np.testing.assert_allclose(got_caption, rms(caption), rtol=1e-12)
  np.testing.assert_allclose(got_pair, rms(pair), rtol=1e-12)
  np.testing.assert_allclose(
    total**2, got_image**2 + got_caption**2 + got_pair**2, rtol=1e-12
  )
  assert head_spread.spread(np.ones((n, m))) == (0.0, 0.0, 0.0, 0.0)


def test_numpy_head_reproduces_the_model_scores():
  rng = np.random.default_rng(1)
  model = SGRAF(
    vocab_size=40,
    head="sgr",
    img_dim=12,
    embed_dim=16,
    word_dim=8,
    sim_dim=8,
    sgr_steps=2,
  )
  images = rng.normal(size=(4, 5, 12)).astype(np.float32)
  lengths = np.array([3, 6, 2, 5, 4], np.int32)
  tokens = rng.integers(4, 40, size=(5, 6)).astype(np.int32)
  tokens[np.arange(6)[None] >= lengths[:, None]] = 0
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)
  img = model.apply(variables, images, train=False, method=model.encode_images)
  cap = model.apply(
    variables, tokens, lengths, train=False, method=model.encode_captions
  )
  expected = np.asarray(
    model.apply(variables, img, cap, train=False, method=model.score)
  )
  params = jax.tree.map(np.asarray, variables["params"]["sim_enc"]["pairs"])
  stages, alive, scores = head_spread.sgr_stages(
    params, img.local, img.glob, cap.words, cap.glob, cap.mask, model.smooth
  )
  assert scores.shape == (4, 5) and len(alive) == 2
  np.testing.assert_allclose(scores, expected, atol=1e-6)
  assert [name for name, _ in stages][-1] == "score"
  # Padded words do not change the result: a caption scored alone, unpadded.
  short = tokens[2:3, :2]
  cap2 = model.apply(
    variables, short, lengths[2:3], train=False, method=model.encode_captions
  )
  _, _, alone = head_spread.sgr_stages(
    params, img.local, img.glob, cap2.words, cap2.glob, cap2.mask, model.smooth
  )
  np.testing.assert_allclose(alone[:, 0], scores[:, 2], atol=1e-6)
