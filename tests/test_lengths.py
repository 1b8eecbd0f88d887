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


# ---- training and selection batches by length -------------------------------

NUM_TRAIN, REGIONS, FEATURES = 40, 4, 12  # 200 captions


@pytest.fixture(scope="module")
def long_split(tmp_path_factory):
  from srem_jax.data import prepare, prepared_split, synthetic

  root = str(tmp_path_factory.mktemp("long"))
  sizes = dict(num_dev=1, num_test=1, num_regions=REGIONS, feature_dim=FEATURES)
  synthetic.generate(
    root, num_train=NUM_TRAIN, num_concepts=8, long_captions=True, **sizes
  )
  out = prepare.prepare(
    root, "synthetic_precomp", "", root + "/prep", ["train"], log=lambda _: None
  )
  return prepared_split.load_prepared(out, "synthetic_precomp", "train")


def test_long_captions_have_a_long_tail(long_split):
  lengths = np.array([len(long_split.tokens(k)) for k in range(long_split.n_captions)])
  median = np.median(lengths)
  assert 10 <= median <= 18 and lengths.max() >= 2 * median
  assert long_split.max_caption_len == lengths.max()


def _loaders(split, **kw):
  from srem_jax.data import pipeline

  t2i = split.cap_to_img
  common = dict(global_batch_size=16, caption_len=0, seed=0, **kw)
  buckets = padding.bucket_lengths(split.max_caption_len)
  return (
    pipeline.train_loader(split, t2i, None, buckets=buckets, **common),
    pipeline.train_loader(split, t2i, None, **common),
    buckets,
  )


def test_training_batches_are_padded_to_their_bucket_and_resume(long_split):
  bucketed, static, buckets = _loaders(long_split)
  widths = set()
  for _ in range(12):
    short, full = next(bucketed), next(static)
    width = short["tokens"].shape[1]
    widths.add(width)
    assert width == padding.padded_length(int(full["lengths"].max()), buckets)
    assert full["tokens"].shape[1] == long_split.max_caption_len
    np.testing.assert_array_equal(short["tokens"], full["tokens"][:, :width])
    assert not full["tokens"][:, width:].any()
    for key in ("lengths", "cap_index", "img_index", "images", "truly_clean"):
      np.testing.assert_array_equal(short[key], full[key])
  assert len(widths) >= 2  # the test exercises more than one bucket
  state = bucketed.get_state()
  expected = next(bucketed)
  resumed, _, _ = _loaders(long_split)
  resumed.set_state(state)
  again = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(again[key], expected[key])
  for loader in (bucketed, static, resumed):
    loader.close()


def test_every_process_pads_to_the_global_batch_bucket(long_split):
  per_process = [
    _loaders(long_split, process_index=p, process_count=2) for p in range(2)
  ]
  whole, _, _ = _loaders(long_split)
  for _ in range(6):
    parts = [next(loaders[0]) for loaders in per_process]
    together = next(whole)
    assert {part["tokens"].shape[1] for part in parts} == {together["tokens"].shape[1]}
    np.testing.assert_array_equal(
      np.concatenate([part["tokens"] for part in parts]), together["tokens"]
    )
  for loader in [whole] + [x for loaders in per_process for x in loaders[:2]]:
    loader.close()


def test_selection_batches_follow_the_same_buckets(long_split):
  from srem_jax.data import pipeline

  t2i = long_split.cap_to_img
  buckets = padding.bucket_lengths(long_split.max_caption_len)
  kw = dict(seed=1)
  short = list(pipeline.pair_batches(long_split, t2i, 48, 0, buckets=buckets, **kw))
  full = list(pipeline.pair_batches(long_split, t2i, 48, 0, **kw))
  assert len(short) == len(full) == 5  # 200 captions, the last batch padded
  for a, b in zip(short, full):
    width = a["tokens"].shape[1]
    assert width == padding.padded_length(int(b["lengths"][b["mask"]].max()), buckets)
    np.testing.assert_array_equal(a["tokens"], b["tokens"][:, :width])
    np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("head", ["sgr", "saf"])
def test_bucketed_step_equals_padded_to_max_on_eight_devices(long_split, head):
  import optax
  import tiny

  from srem_jax import execution, sharding
  from srem_jax.models.sgraf import build_model
  from srem_jax.train import step

  assert jax.device_count() == 8
  mesh = sharding.make_mesh(-1)
  # No dropout: its draws depend on the padded shape, the model's math does not.
  config = tiny.model_config(head, img_dim=FEATURES, dropout=0.0)
  model = build_model(config, long_split.vocab_size, execution.resolve())
  tx = optax.sgd(0.05)  # see test_train: Adam would magnify float noise
  static_len = long_split.max_caption_len
  state = step.init_state(
    model, tx, seed=0, num_regions=REGIONS, img_dim=FEATURES,
    caption_len=static_len, mesh=mesh,
  )  # fmt: skip
  # Bucketed batches scored by length against every caption at the static
  # length with the plain head (no length groups).
  make_step = lambda model: step.make_train_step(
    model, tx, tiny.loss_options("srem"), mesh, warmup=head == "saf",
    external_selection=False,
  )  # fmt: skip
  # Groups of 4: a batch of 16 (2 per device) spans several buckets.
  train_step = make_step(model.clone(length_group=4))
  padded_step = make_step(model.clone(length_group=0))
  bucketed, static, _ = _loaders(long_split)
  for _ in range(2):  # two steps: the second starts from the first's update
    short, full = next(bucketed), next(static)
    # Shorter than the static length, long enough to be scored by length.
    assert 16 < short["tokens"].shape[1] < static_len
    # The step donates its state: each call gets its own copy.
    copy = lambda: jax.device_put(jax.device_get(state), sharding.replicated(mesh))
    out_short = train_step(copy(), sharding.global_batch(short, mesh))
    out_full = padded_step(copy(), sharding.global_batch(full, mesh))
    (state_short, m_short), (state_full, m_full) = jax.device_get((out_short, out_full))
    chex.assert_trees_all_close(m_short, m_full, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
      state_short.params, state_full.params, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
      state_short.batch_stats, state_full.batch_stats, rtol=1e-5, atol=1e-6
    )
    state = jax.device_put(state_full, sharding.replicated(mesh))
  bucketed.close()
  static.close()
