"""Evaluation and the selection pass on the devices equal the host-fed reference.

The references below are the plain formulations: every encoder batch pulled
to the host, every (image tile, caption tile) pair uploaded and scored by its
own jitted call (`tiling.score_all`), every selection batch's statistics
fetched on its own. The device versions run under
`jax.transfer_guard("disallow")`, so any implicit host<->device copy fails.
"""

import types

import jax
import numpy as np
import pytest
from test_main import tiny_config

from srem_jax import execution, padding, sharding
from srem_jax.data import dataset, pipeline, resident
from srem_jax.eval import evaluator, retrieval
from srem_jax.methods import gmm
from srem_jax.methods.losses import per_sample_stats
from srem_jax.models import tiling
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding, build_model
from srem_jax.train import selection


def _round_up(n, k):
  return -(-n // k) * k


def reference_matrix(model, variables, split, config, mesh, caption_len, n):
  """Host embeddings, one upload and one jitted call per tile pair."""
  rows, full = sharding.data_sharding(mesh), sharding.replicated(mesh)
  batch_size = _round_up(config.eval.batch_size, mesh.size)
  enc_img = jax.jit(
    lambda v, x: model.apply(v, x, train=False, method=SGRAF.encode_images)
  )
  enc_cap = jax.jit(
    lambda v, t, n: model.apply(v, t, n, train=False, method=SGRAF.encode_captions)
  )
  parts = []
  for batch in pipeline.image_batches(split, batch_size, num_images=n):
    gb = sharding.global_batch(batch, mesh)
    emb = jax.device_get(enc_img(variables, gb["images"]))
    parts.append([x[batch["mask"]] for x in emb])
  img = ImageEmbedding(*(np.concatenate(x) for x in zip(*parts)))
  parts, owners = [], []
  for batch in pipeline.caption_batches(split, batch_size, caption_len, num_images=n):
    gb = sharding.global_batch(batch, mesh)
    emb = jax.device_get(enc_cap(variables, gb["tokens"], gb["lengths"]))
    parts.append([x[batch["mask"]] for x in emb])
    owners.append(batch["img_index"][batch["mask"]])
  cap = CaptionEmbedding(*(np.concatenate(x) for x in zip(*parts)))
  score = jax.jit(
    lambda v, i, c: model.apply(v, i, c, train=False, method=SGRAF.score),
    in_shardings=(full, rows, full),
    out_shardings=full,
  )
  img_tile = min(
    _round_up(config.execution.img_tile, mesh.size), _round_up(n, mesh.size)
  )
  buckets = padding.bucket_lengths(caption_len, config.data.caption_len)
  sims = tiling.score_all(
    lambda i, c: score(variables, jax.device_put(i, rows), jax.device_put(c, full)),
    img,
    cap,
    img_tile=img_tile,
    cap_tile=config.execution.cap_tile,
    cap_lengths=cap.mask.sum(axis=1),
    buckets=buckets if len(buckets) > 1 else None,
  )
  return sims, np.concatenate(owners)


def reference_statistics(model, variables, data, config, mesh, tau, temp):
  """Per-batch statistics, each batch's result fetched as it comes."""
  stats = jax.jit(
    lambda v, b: per_sample_stats(
      model.apply(v, b["images"], b["tokens"], b["lengths"], train=False),
      tau,
      temp,
      valid=b["mask"],
    )
  )
  out = {
    key: np.zeros(data.train.n_captions, np.float32) for key in selection.STATISTICS
  }
  batch_size = _round_up(config.train.batch_size, mesh.size)
  for batch in pipeline.pair_batches(
    data.train, data.noise.t2i, batch_size, data.caption_len,
    seed=config.train.seed, buckets=data.buckets,
  ):  # fmt: skip
    values = jax.device_get(stats(variables, sharding.global_batch(batch, mesh)))
    keep = batch["mask"]
    for key, column in out.items():
      column[batch["cap_index"][keep]] = values[key][keep]
  return out


@pytest.fixture(scope="module", params=[0, 50], ids=["buckets", "static"])
def setup(request, tmp_path_factory):
  """Long-tailed captions (several buckets, or one static length), 8 devices."""
  config = tiny_config(tmp_path_factory.mktemp("data"))
  config.data.synthetic.long_captions = True
  config.data.caption_len = request.param
  config.mesh.data = -1
  config.progress.enabled = False
  data = dataset.open_data(config, str(tmp_path_factory.mktemp("run")), log=print)
  model = build_model(config.model, data.vocab_size, execution.resolve())
  mesh = sharding.make_mesh(-1)
  assert mesh.size == 8
  variables = model.init(
    {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
    np.zeros((2, data.train.num_regions, data.train.feature_dim), np.float32),
    np.ones((2, data.caption_len), np.int32),
    np.full((2,), 3, np.int32),
    train=False,
  )
  variables = jax.device_put(variables, sharding.replicated(mesh))
  return config, data, model, variables, mesh


@pytest.mark.parametrize("num_images", [10, 9])
def test_device_matrix_equals_the_host_tiled_reference(setup, num_images):
  config, data, model, variables, mesh = setup
  split = data.test  # 10 images x 50 captions: 2 image blocks x 4 caption tiles
  expected, owners = reference_matrix(
    model, variables, split, config, mesh, data.caption_len, num_images
  )
  if config.data.caption_len == 0:  # several buckets, so tiles really differ
    lengths = [n for _, n in tiling.caption_tiles(
      np.array([len(t) for t in split.caption_tokens(np.flatnonzero(
        split.cap_to_img < num_images))]), 16, data.buckets)]  # fmt: skip
    assert len(set(lengths)) > 1, lengths
  evaluate = evaluator.for_config(
    config, model, split, mesh, execution.resolve(config.execution),
    caption_len=data.caption_len, num_images=num_images,
  )  # fmt: skip
  with jax.transfer_guard("disallow"):
    result, sims, cap_to_img = evaluate.run(variables, return_matrix=True)
  np.testing.assert_array_equal(cap_to_img, owners)
  assert sims.shape == expected.shape == (num_images, 5 * num_images)
  # Each pair is scored by the same per-tile program: the same summation order.
  np.testing.assert_array_equal(sims, expected)
  assert result == evaluator.rank_metrics(expected, owners)
  # An ensemble of one model twice ranks the same matrix.
  assert evaluate.run([variables, variables]) == result


def test_the_same_embeddings_serve_every_epoch_without_recompiling(setup):
  config, data, model, variables, mesh = setup
  plan = execution.resolve(config.execution)
  evaluate = evaluator.for_config(
    config, model, data.val, mesh, plan, caption_len=data.caption_len,
    num_images=10,
  )  # fmt: skip
  first = evaluate.run(variables)
  score_block = retrieval.eval_functions(model, mesh, plan).score_block
  misses = score_block._cache_size()
  assert misses > 0  # the evaluator scores with the functions of its plan
  with jax.transfer_guard("disallow"):
    assert evaluate.run(variables) == first
  assert score_block._cache_size() == misses


def test_the_tpu_preset_s_compile_effort_scores_the_same_matrix(setup):
  """The evaluator compiles with its plan's options (here XLA's compile
  effort -1 on the CPU), and they change no score."""
  config, data, model, variables, mesh = setup
  plan = execution.resolve(config.execution)
  tuned = plan._replace(compile_effort=-1.0)
  sims = {}
  for p in (plan, tuned):
    evaluate = evaluator.for_config(
      config, model, data.val, mesh, p, caption_len=data.caption_len,
      num_images=10,
    )  # fmt: skip
    sims[p] = evaluate.run(variables, return_matrix=True)[1]
  fns = retrieval.eval_functions(model, mesh, tuned)
  assert all(fn._cache_size() > 0 for fn in fns)  # the evaluator's, compiled
  np.testing.assert_array_equal(sims[tuned], sims[plan])


@pytest.fixture(scope="module")
def expected_statistics(setup):
  """The reference statistics at the config's tau and energy temperature,
  computed once for the tests that compare against them."""
  config, data, model, variables, mesh = setup
  loss = config.loss
  return reference_statistics(
    model, variables, data, config, mesh, loss.tau, loss.energy_temp
  )


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "resident"])
def test_selection_statistics_equal_the_per_batch_reference(
  setup, expected_statistics, on_device
):
  config, data, model, variables, mesh = setup
  expected = expected_statistics
  features = None
  if on_device:
    features = resident.resident_features(data.train, mesh, "float32", print)
  with jax.transfer_guard("disallow"):
    stats = selection.pair_statistics(
      model, variables, data, config, mesh, tau=config.loss.tau,
      temp=config.loss.energy_temp, features=features,
    )  # fmt: skip
  assert set(stats) == set(expected)
  for key in expected:
    # The batch and its program are the reference's: bit for bit.
    np.testing.assert_array_equal(stats[key], expected[key], err_msg=key)
  assert np.all(stats["ce"] > 0)  # every caption was written


def test_gmm_selection_splits_the_statistics_pass(setup, expected_statistics):
  config, data, model, variables, mesh = setup
  state = types.SimpleNamespace(**variables)
  expected = expected_statistics
  loss = config.loss
  clean = gmm.gmm_clean_mask(
    expected["ce"], expected["energy"], iters=loss.gmm_iters, tol=loss.gmm_tol,
    reg=loss.gmm_reg, min_noisy=loss.gmm_min_noisy,
  )  # fmt: skip
  with jax.transfer_guard("disallow"):
    got = selection.gmm_selection(config, model, state, data, mesh)
  np.testing.assert_array_equal(got, clean)


def test_a_prefetch_error_surfaces_in_the_consumer():
  def items():
    yield 1
    raise RuntimeError("bad batch")

  seen = []
  with pytest.raises(RuntimeError, match="bad batch"):
    for item, made in selection.Prefetch(items(), lambda x: x * 10):
      seen.append(made)
  assert seen == [10]
