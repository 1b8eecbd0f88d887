"""Predicted run times (`srem_jax.predict`) against hand counts.

The bucket weights against fractions worked out by hand and a brute-force
enumeration, the matrix FLOPs against the scorer and encoders counted tile by
tile, a tile's groups against plain scans of each group, and the time
against FLOPs / the target's peak written out.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, demo
from srem_jax import aot, execution, padding, predict
from srem_jax.compile import caption_lengths
from srem_jax.compile.flops import matmul_flops
from srem_jax.compile.shapes import DataShapes
from srem_jax.models.dims import TINY_DIMS, make_model
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding

DIMS = TINY_DIMS  # 4 regions of 16 features, E 16, words 8, sim 8, 3 SGR steps
STATIC = 24  # buckets (8, 12, 16, 20, 24)


def _predictor(
  *, static=STATIC, batch=4, length_group=2, img_tile=6, cap_tile=8, cap_chunk=8
):
  config = base.get_config()
  for key in ("img_dim", "embed_dim", "word_dim", "sim_dim", "sgr_steps"):
    config.model[key] = DIMS[key]
  config.train.batch_size, config.eval.batch_size = batch, 16
  config.execution.update(
    preset="cpu", img_chunk=2, cap_chunk=cap_chunk, length_group=length_group,
    img_tile=img_tile, cap_tile=cap_tile,
  )  # fmt: skip
  mesh = aot.target_mesh(jax.devices()[:1])
  plan = execution.resolve(config.execution, device=jax.devices()[0])
  shapes = DataShapes(
    DIMS["num_regions"], DIMS["img_dim"], static, DIMS["vocab_size"], 20, ""
  )
  return predict.Predictor(config, mesh, plan, shapes), plan


# ---- caption lengths and their buckets ----------------------------------------


def test_bucket_weights_of_a_two_bucket_histogram_by_hand():
  # Lengths 5 and 10, equally likely; batches of 4 in groups of 2 (ranks 2, 4).
  weights = caption_lengths.bucket_weights(
    (np.array([5, 10]), np.array([1, 1])), batch=4, group=2, grid=(8, 12)
  )
  # Longest in bucket 8: all four are 5 (1/16). Otherwise (15/16) the last
  # group takes bucket 12; the first takes 8 when at least two are 5 but not
  # all four (11/16 - 1/16), else 12 (5/16).
  expected = np.array([[1 / 16, 0], [(10 / 16) / 2, (5 / 16 + 15 / 16) / 2]])
  np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_bucket_weights_equal_every_batch_enumerated():
  lengths, counts = np.array([6, 11, 19, 30]), np.array([3, 2, 4, 1])
  grid, batch, group = padding.bucket_lengths(32), 5, 2  # (8, 12, ..., 24, 32)
  expected = np.zeros((len(grid), len(grid)))
  p = counts / counts.sum()
  for draw in itertools.product(range(len(lengths)), repeat=batch):
    sample = np.sort(lengths[list(draw)])
    top = grid.index(padding.padded_length(int(sample[-1]), grid))
    for k in caption_lengths.group_branches(sample, group, grid[top]):
      expected[top, k] += np.prod(p[list(draw)]) / 3  # 3 groups of 2, 2, 1
  weights = caption_lengths.bucket_weights((lengths, counts), batch, group, grid)
  np.testing.assert_allclose(weights, expected, atol=1e-12)


def test_sorted_lengths_expand_the_histogram_and_groups_take_their_longest():
  histogram = (np.array([5, 9, 14, 30]), np.array([2, 3, 1, 2]))
  np.testing.assert_array_equal(
    caption_lengths.sorted_lengths(histogram, 8), [5, 5, 9, 9, 9, 14, 30, 30]
  )
  np.testing.assert_array_equal(caption_lengths.sorted_lengths(histogram, 4), [5, 9, 14, 30])
  # Groups of 3 (5 5 9 | 9 9 14 | 30 30): longest 9 -> bucket 12, 14 -> 16,
  # 30 -> 32, branches 1, 2 and 5 of bucket_lengths(32) = (8, 12, ..., 24, 32).
  lengths = caption_lengths.sorted_lengths(histogram, 8)
  assert caption_lengths.group_branches(lengths, 3, 32) == [1, 2, 5]


# ---- FLOPs --------------------------------------------------------------------


@functools.cache
def _variables(length):
  model = make_model("sgr", "float32", DIMS, length_group=0)
  images = jnp.zeros((2, DIMS["num_regions"], DIMS["img_dim"]))
  tokens, lengths = jnp.ones((2, length), jnp.int32), jnp.full((2,), length)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), images, tokens, lengths)


def _plain_score_flops(plan, n_img, n_cap, length):
  """One SGRAF.score call at these sizes, captions padded to `length` and
  scored as they are (length groups off); its largest branch where any."""
  model = make_model("sgr", "float32", DIMS, **plan.model_kwargs())
  e, r = DIMS["embed_dim"], DIMS["num_regions"]
  img = ImageEmbedding(jnp.zeros((n_img, r, e)), jnp.zeros((n_img, e)))
  cap = CaptionEmbedding(
    jnp.zeros((n_cap, length, e)), jnp.zeros((n_cap, e)), jnp.ones((n_cap, length), bool)
  )
  fn = jax.jit(lambda v, i, c: model.apply(v, i, c, train=False, method=SGRAF.score))
  return matmul_flops(fn, _variables(length), img, cap).flops


def test_matrix_flops_are_the_tiles_scored_one_by_one_plus_the_encoders():
  predictor, plan = _predictor(img_tile=6, cap_tile=8, cap_chunk=8)
  lengths = np.array([5, 7, 9, 9, 10, 13, 14, 15, 17, 21, 23])  # tiles of 8 and 3
  scorer, encoders = predictor.matrix_flops(10, lengths)
  # 10 images: 2 blocks of 6. Caption tiles (in length order, the last padded
  # by its longest): 8 captions up to 15 -> bucket 16; 8 rows up to 23 -> 24.
  # One group per tile (cap_chunk 8), so each tile is one call at its bucket.
  tiles = _plain_score_flops(plan, 6, 8, 16) + _plain_score_flops(plan, 6, 8, 24)
  assert scorer == 2 * tiles
  # One encoder batch of 16 images and one of 16 captions at the static 24.
  model = make_model("sgr", "float32", DIMS, **plan.model_kwargs())
  variables = _variables(STATIC)
  encode_images = jax.jit(
    lambda v, x: model.apply(v, x, train=False, method=SGRAF.encode_images)
  )
  encode_captions = jax.jit(
    lambda v, t, n: model.apply(v, t, n, train=False, method=SGRAF.encode_captions)
  )
  images = jnp.zeros((16, DIMS["num_regions"], DIMS["img_dim"]))
  tokens, n = jnp.ones((16, STATIC), jnp.int32), jnp.full((16,), STATIC)
  assert encoders == (
    matmul_flops(encode_images, variables, images).flops
    + matmul_flops(encode_captions, variables, tokens, n).flops
  )


def test_a_tile_s_groups_cost_plain_scans_at_their_own_buckets():
  predictor, plan = _predictor(img_tile=6, cap_tile=8, cap_chunk=4)
  counts = predictor.scorer(24, 6, 8)  # two groups of 4, every group at branch k
  # Groups cut to buckets 12 (branch 1) and 24 (branch 4) cost what plain
  # scans of their 4 captions at those lengths cost, less one fold of each
  # SGR step's W_q W_k^T and W_k b_q (2 steps (S^3 + S^2) FLOPs): a plain
  # call's jaxpr holds one more, outside its scan.
  s, steps = DIMS["sim_dim"], DIMS["sgr_steps"]
  fold = 2 * steps * (s**3 + s**2)
  plain = plan._replace(length_group=0)
  groups = [_plain_score_flops(plain, 6, 4, n) - fold for n in (12, 24)]
  assert (counts[1] + counts[4]) / 2 == sum(groups)
  tile = np.array([5, 7, 9, 11, 13, 17, 20, 23])
  assert caption_lengths.group_branches(tile, 4, 24) == [1, 4]
  scorer, _ = predictor.matrix_flops(6, tile)
  assert scorer == sum(groups)


def _step_flops(predictor, length):
  """The train step at caption length `length`, counted by `matmul_flops`."""
  shapes = dataclasses.replace(predictor.shapes, caption_len=length)
  run = aot.RunPrograms(predictor.config, predictor.mesh, predictor.plan, shapes)
  program = next(p for p in run.train_steps() if " main " in p.name)
  return matmul_flops(program.fn, *program.args).flops


def test_train_step_weights_buckets_of_a_toy_histogram_by_hand():
  predictor, _ = _predictor(static=20, batch=4, length_group=2)
  # Lengths 5 and 19: a batch's longest is in bucket 8 (1/16) or 20 (15/16);
  # then the first of its 2 groups is cut to 8 when at least two lengths are
  # 5 (10/16), else to 20 like the second (5/16).
  histogram = (np.array([5, 19]), np.array([1, 1]))
  at20 = predictor.train_step(20)  # branches of (8, 12, 16, 20)
  assert at20[0] < at20[1] < at20[3]  # groups cut shorter cost less
  expected = (
    _step_flops(predictor, 8) / 16
    + (10 / 16) * (at20[0] + at20[3]) / 2
    + (5 / 16) * at20[3]
  )
  assert predictor.step_flops(histogram) == pytest.approx(expected, rel=1e-12)
  # One batch with a short and a long group: the mean of their branches.
  assert predictor.batch_flops(np.array([5, 5, 19, 19])) == (at20[0] + at20[3]) / 2


def test_times_are_flops_over_chips_at_the_peak_and_the_run_adds_up():
  config = demo.get_config()
  config.data.caption_len = 12  # one static length: one program per phase
  figures, how = predict.predict(config, "h200")
  step, val, test, run = figures
  # H200, float32 at matmul precision "highest": 67 TFLOP/s (FP32, no TF32).
  assert "67.0 TFLOP/s" in how
  for figure in figures:
    assert figure.seconds == figure.flops / 67e12 and figure.flops > 0
  # The demo: 600 images x 5 captions in batches of 32 -> 93 steps; 8 of its
  # 14 epochs warm up; validation on the 100 dev images every epoch.
  assert "93 steps per epoch" in run.what and "100 x 500" in val.what
  assert "200 x 1,000" in test.what and not step.published
  # Its warm-up step differs from the main one in the loss alone: no matmul.
  assert run.flops == pytest.approx(93 * 14 * step.flops + 14 * val.flops + test.flops)


def test_a_device_kind_names_its_target():
  assert predict.target_for("NVIDIA H100 80GB HBM3").name == "h100"
  assert predict.target_for("NVIDIA H200").name == "h200"
  assert predict.target_for("cpu") is None
  assert predict.target_for("TPU v4", chips=4).name == "v4-8"
