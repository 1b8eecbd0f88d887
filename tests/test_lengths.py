"""Caption-length buckets: the policy, and bucketed paths equal padded-to-max ones.

The head masks padded words, so trimming padding changes a score only by
float32 summation order over the word axis (reductions of a longer, zero-
padded axis may associate differently); scores are compared to 2e-6 absolute (scores lie in (0, 1); float32 spacing
there is at most 6e-8, so a few tens of rounding steps).
"""

import json

import chex
import jax
import numpy as np
import pytest

from srem_jax import padding
from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF
from srem_jax.models.tiling import caption_tiles, score_all


def test_bucket_policy_bounds_shapes_and_keeps_a_static_request():
  assert padding.bucket_lengths(77) == (8, 12, 16, 20, 24, 32, 48, 77)
  assert padding.bucket_lengths(15) == (8, 12, 15)
  assert padding.bucket_lengths(77, requested=80) == (80,)
  assert len(padding.bucket_lengths(1000)) <= 8
  buckets = padding.bucket_lengths(77)
  assert [padding.padded_length(n, buckets) for n in (1, 8, 9, 41, 48, 49, 77)] == [
    8, 8, 12, 48, 48, 77, 77
  ]  # fmt: skip
  with pytest.raises(ValueError):
    padding.padded_length(78, buckets)


def test_histogram_draws_follow_the_file(tmp_path):
  path = tmp_path / "h.json"
  path.write_text(json.dumps({"splits": {"test": {"5": 1, "9": 3, "30": 0}}}))
  histogram = padding.read_histogram(str(path))
  drawn = padding.draw_lengths(histogram, 4000, np.random.default_rng(0))
  assert set(np.unique(drawn)) == {5, 9}
  assert abs(np.mean(drawn == 9) - 0.75) < 0.03
  for bad in ({"splits": {}}, {"splits": {"test": {"x": 1}}}, {"splits": {"test": {}}}):
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="h.json"):
      padding.read_histogram(str(path))
  with pytest.raises(UserError, match="no such"):
    padding.read_histogram(str(tmp_path / "missing.json"))


def test_caption_tiles_visit_every_caption_once_in_order_of_length():
  lengths = np.array([9, 3, 30, 3, 12, 7, 3])
  tiles = caption_tiles(lengths, 3, (8, 12, 16, 32))
  assert [list(rows) for rows, _ in tiles] == [[1, 3, 6], [5, 0, 4], [2]]
  assert [length for _, length in tiles] == [8, 12, 32]


def _tiny(head):
  return SGRAF(vocab_size=50, head=head, img_dim=12, embed_dim=16, word_dim=8,
               sim_dim=8, cap_chunk=2)  # fmt: skip


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_bucketed_scoring_equals_padded_to_max(head):
  rng = np.random.default_rng(1)
  static = 20
  num_img, num_cap = 5, 23
  lengths = np.concatenate([rng.integers(2, 9, num_cap - 2), [static, 11]])
  rng.shuffle(lengths)
  tokens = rng.integers(4, 50, size=(num_cap, static))
  tokens = np.where(np.arange(static)[None] < lengths[:, None], tokens, 0)
  images = rng.normal(size=(num_img, 6, 12)).astype(np.float32)
  model = _tiny(head)
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)
  img = model.apply(variables, images, train=False, method=SGRAF.encode_images)
  cap = model.apply(
    variables, tokens, lengths, train=False, method=SGRAF.encode_captions
  )
  img, cap = jax.tree.map(np.asarray, (img, cap))
  shapes = []

  @jax.jit
  @chex.assert_max_traces(n=4)
  def score(i, c):
    shapes.append(c.words.shape)
    return model.apply(variables, i, c, train=False, method=SGRAF.score)

  kw = dict(img_tile=2, cap_tile=4)
  padded = score_all(score, img, cap, **kw)
  buckets = (4, 8, 12, static)
  bucketed = score_all(
    score, img, cap, cap_lengths=cap.mask.sum(1), buckets=buckets, **kw
  )
  # One trace per bucket a tile needs, besides the padded path's.
  needed = {length for _, length in caption_tiles(cap.mask.sum(1), 4, buckets)}
  assert len(needed) >= 3 and static in needed
  assert {s[1] for s in shapes} == needed
  np.testing.assert_allclose(bucketed, padded, rtol=0, atol=2e-6)
  # Each caption on its own, sliced to its real words: the reference's loop.
  for k in (0, int(np.argmax(lengths)), int(np.argmin(lengths))):
    n = int(lengths[k])
    alone = jax.tree.map(
      lambda x: x[k : k + 1, :n] if x.ndim > 2 else x[k : k + 1], cap
    )
    alone = alone._replace(mask=cap.mask[k : k + 1, :n])
    single = model.apply(variables, img, alone, train=False, method=SGRAF.score)
    np.testing.assert_allclose(
      bucketed[:, k], np.asarray(single)[:, 0], rtol=0, atol=2e-6
    )
  print("max |bucketed - padded|:", float(np.max(np.abs(bucketed - padded))))
  chex.clear_trace_counter()
