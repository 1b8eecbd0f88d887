"""Tests for srem_jax.eval.metrics on hand-ranked matrices and a loop-by-loop reference."""

import numpy as np
import pytest

from srem_jax.errors import UserError
from srem_jax.eval import metrics

# 3 images x 15 captions, captions 5i..5i+4 belong to image i. Ranks by hand:
#   i2t: image 0 best gt 0.9, nothing above -> 0; image 1 best gt 0.6 under
#   0.7, 0.65 -> 2; image 2 best gt 0.5 under 0.8 x3 and 0.9 x4 -> 7.
#   t2i (gt image = column // 5), column by column:
#   [0, 2, 1, 0, 0, 1, 1, 1, 2, 2, 0, 0, 0, 1 (tie 0.2 vs 0.2), 1].
FIVE_CAPTIONS = np.array(
  [
    [
      0.9,
      0.5,
      0.4,
      0.3,
      0.2,
      0.1,
      0.15,
      0.05,
      0.12,
      0.11,
      0.08,
      0.07,
      0.06,
      0.03,
      0.02,
    ],
    [0.7, 0.65, 0.1, 0.1, 0.1, 0.6, 0.3, 0.2, 0.1, 0.05, 0.2, 0.2, 0.2, 0.2, 0.2],
    [0.8, 0.8, 0.8, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.1],
  ]
)
FIVE_CAPTIONS_GT = np.arange(15) // 5

# 4 images x 4 captions, caption i belongs to image i.
#   i2t: [0, 2 (0.8, 0.6 above 0.5), 1, 3 (three ties)];
#   t2i: [0, 0, 2 (0.6 above, 0.3 tie), 2 (0.4 above, 0.3 tie)].
ONE_CAPTION = np.array(
  [
    [0.9, 0.1, 0.2, 0.3],
    [0.8, 0.5, 0.6, 0.1],
    [0.1, 0.2, 0.3, 0.4],
    [0.3, 0.3, 0.3, 0.3],
  ]
)


def ref_ranks(sims, cap_to_img):
  """Direct float64 loops over queries, no chunking."""
  sims = np.asarray(sims, np.float64)
  n_img, n_cap = sims.shape
  i2t = []
  for i in range(n_img):
    gt = [k for k in range(n_cap) if cap_to_img[k] == i]
    best = max(sims[i, k] for k in gt)
    i2t.append(sum(1 for k in range(n_cap) if k not in gt and sims[i, k] >= best))
  t2i = []
  for k in range(n_cap):
    g = cap_to_img[k]
    t2i.append(sum(1 for i in range(n_img) if i != g and sims[i, k] >= sims[g, k]))
  return np.array(i2t), np.array(t2i)


def ref_metrics(sims, cap_to_img):
  out = {}
  ranks = dict(zip(("i2t", "t2i"), ref_ranks(sims, cap_to_img)))
  for d, r in ranks.items():
    for k in (1, 5, 10):
      out[f"{d}_r{k}"] = 100.0 * np.mean(r < k)
  out["rsum"] = sum(out.values())
  for d, r in ranks.items():
    out[f"{d}_medr"] = np.floor(np.median(r)) + 1
    out[f"{d}_meanr"] = r.mean() + 1
  return out


def assert_metrics_equal(actual, expected):
  assert list(actual) == list(expected)
  for key, value in expected.items():
    assert actual[key] == pytest.approx(value, abs=1e-9), key


def test_five_captions_per_image_by_hand():
  np.testing.assert_array_equal(
    metrics.i2t_ranks(FIVE_CAPTIONS, FIVE_CAPTIONS_GT), [0, 2, 7]
  )
  np.testing.assert_array_equal(
    metrics.t2i_ranks(FIVE_CAPTIONS, FIVE_CAPTIONS_GT),
    [0, 2, 1, 0, 0, 1, 1, 1, 2, 2, 0, 0, 0, 1, 1],
  )
  expected = {
    "i2t_r1": 100 / 3,
    "i2t_r5": 200 / 3,
    "i2t_r10": 100.0,
    "t2i_r1": 40.0,
    "t2i_r5": 100.0,
    "t2i_r10": 100.0,
    "rsum": 440.0,
    "i2t_medr": 3.0,
    "i2t_meanr": 4.0,
    "t2i_medr": 2.0,
    "t2i_meanr": 1.8,
  }
  assert_metrics_equal(
    metrics.retrieval_metrics(FIVE_CAPTIONS, FIVE_CAPTIONS_GT), expected
  )


def test_one_caption_per_image_by_hand():
  expected = {
    "i2t_r1": 25.0,
    "i2t_r5": 100.0,
    "i2t_r10": 100.0,
    "t2i_r1": 50.0,
    "t2i_r5": 100.0,
    "t2i_r10": 100.0,
    "rsum": 475.0,
    "i2t_medr": 2.0,
    "i2t_meanr": 2.5,
    "t2i_medr": 2.0,
    "t2i_meanr": 2.0,
  }
  assert_metrics_equal(metrics.retrieval_metrics(ONE_CAPTION, np.arange(4)), expected)


def test_constant_matrix_gets_the_worst_ranks():
  sims = np.full((3, 15), 0.5, np.float32)
  np.testing.assert_array_equal(metrics.i2t_ranks(sims, FIVE_CAPTIONS_GT), [10] * 3)
  np.testing.assert_array_equal(metrics.t2i_ranks(sims, FIVE_CAPTIONS_GT), [2] * 15)
  result = metrics.retrieval_metrics(sims, FIVE_CAPTIONS_GT)
  assert result["i2t_r1"] == result["i2t_r10"] == result["t2i_r1"] == 0.0
  assert result["t2i_r5"] == 100.0  # only 3 images to choose from
  assert result["i2t_medr"] == 11.0 and result["t2i_medr"] == 3.0


@pytest.mark.parametrize("quantised", (False, True))
def test_chunked_equals_direct_reference(quantised):
  rng = np.random.default_rng(0)
  sims = rng.normal(size=(50, 250)).astype(np.float32)
  if quantised:  # many ties
    sims = np.round(sims, 1)
  cap_to_img = rng.permutation(np.arange(250) // 5)
  ref_i2t, ref_t2i = ref_ranks(sims, cap_to_img)
  for chunk in (1, 7, 50, None):
    np.testing.assert_array_equal(
      metrics.i2t_ranks(sims, cap_to_img, chunk=chunk), ref_i2t
    )
    np.testing.assert_array_equal(
      metrics.t2i_ranks(sims, cap_to_img, chunk=chunk), ref_t2i
    )
  assert_metrics_equal(
    metrics.retrieval_metrics(sims, cap_to_img), ref_metrics(sims, cap_to_img)
  )


def test_coco_protocol_averages_five_folds():
  rng = np.random.default_rng(1)
  sims = rng.normal(size=(10, 50))
  sims[np.arange(50) // 5, np.arange(50)] += 1.0  # better than chance
  cap_to_img = np.arange(50) // 5
  folds = [
    ref_metrics(sims[2 * f : 2 * f + 2, 10 * f : 10 * f + 10], np.arange(10) // 5)
    for f in range(5)
  ]
  expected_1k = {key: np.mean([fold[key] for fold in folds]) for key in folds[0]}
  result = metrics.coco_protocol(sims, cap_to_img)
  assert set(result) == {"coco1k", "coco5k"}
  assert_metrics_equal(result["coco1k"], expected_1k)
  assert_metrics_equal(result["coco5k"], ref_metrics(sims, cap_to_img))
  # Caption columns need not be grouped by image.
  shuffle = rng.permutation(50)
  shuffled = metrics.coco_protocol(sims[:, shuffle], cap_to_img[shuffle])
  assert_metrics_equal(shuffled["coco1k"], expected_1k)


@pytest.mark.parametrize(
  "sims,cap_to_img,match",
  [
    (np.zeros((3, 15)), np.arange(14) // 5, "cap_to_img"),
    (np.zeros((3, 15)), np.arange(15) // 5 + 1, r"\[0, 3\)"),
    (np.zeros((3, 15)), np.arange(15) / 5, "integer"),
    (np.zeros(15), np.arange(15) // 5, "sims"),
    (np.zeros((4, 15)), np.arange(15) // 5, "at least one"),
    (np.full((3, 15), np.nan), np.arange(15) // 5, "NaN"),
  ],
)
def test_bad_inputs_raise_user_error(sims, cap_to_img, match):
  with pytest.raises(UserError, match=match):
    metrics.retrieval_metrics(sims, cap_to_img)


def test_coco_protocol_needs_five_folds():
  with pytest.raises(UserError, match="divisible"):
    metrics.coco_protocol(np.zeros((4, 4)), np.arange(4))
