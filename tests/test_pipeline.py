"""Tests for the training loader and evaluation streams over a prepared split."""

import json

import numpy as np
import pytest
import rawdata

from srem_jax import config_checks
from srem_jax.data import pipeline, prepare, prepared_split
from srem_jax.errors import UserError
from srem_jax.train import run as train_run

N_TRAIN, N_TEST = 7, 3  # 35 and 15 captions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  raw_dir = tmp_path_factory.mktemp("raw")
  truth = rawdata.write_raw(
    raw_dir, "toy", {"train": N_TRAIN, "test": N_TEST}, rows_per_caption=("test",)
  )
  out = prepare.prepare(str(raw_dir), "toy", "", str(raw_dir / "prep"), log=print)
  splits = {s: prepared_split.load_prepared(out, "toy", s) for s in ("train", "test")}
  return splits, truth


@pytest.fixture(scope="module")
def noisy(data):
  splits, _ = data
  t2i = np.random.default_rng(1).integers(0, N_TRAIN, size=5 * N_TRAIN)
  return t2i, t2i == np.arange(5 * N_TRAIN) // 5


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _loader(data, noisy, **kw):
  splits, _ = data
  kw = {"global_batch_size": 8, "caption_len": 12, "seed": 0, **kw}
  return pipeline.train_loader(splits["train"], *noisy, **kw)


def test_prepared_split_reads_back_the_raw_data(data):
  splits, truth = data
  test = splits["test"]
  assert (test.n_images, test.n_captions, test.caps_per_image) == (3, 15, 5)
  assert (test.num_regions, test.feature_dim, test.vocab_size) == (3, 4, 14)
  assert test.max_caption_len == max(len(t) for t in truth["test"].tokens)
  np.testing.assert_array_equal(test.cap_to_img, np.arange(15) // 5)
  np.testing.assert_array_equal(test.image(2), truth["test"].images[2])
  np.testing.assert_array_equal(test.tokens(11), truth["test"].tokens[11])


def test_each_epoch_is_a_seeded_permutation_minus_the_remainder(data, noisy):
  loader = _loader(data, noisy)
  assert loader.steps_per_epoch == 35 // 8 == 4
  epochs = [
    np.concatenate([b["cap_index"] for b in _take(loader, 4)]) for _ in range(3)
  ]
  for order in epochs:
    assert len(order) == 32 and len(set(order.tolist())) == 32
    assert set(order.tolist()) <= set(range(35))
  assert not np.array_equal(epochs[0], epochs[1])
  again = _loader(data, noisy)
  np.testing.assert_array_equal(_take(again, 4)[3]["cap_index"], epochs[0][24:])
  other_seed = np.concatenate(
    [b["cap_index"] for b in _take(_loader(data, noisy, seed=1), 4)]
  )
  assert not np.array_equal(other_seed, epochs[0])


def test_batches_join_images_through_the_noisy_index(data, noisy):
  splits, truth = data
  t2i, clean = noisy
  for batch in _take(_loader(data, noisy), 6):
    k = batch["cap_index"]
    assert batch["images"].shape == (8, 3, 4) and batch["images"].dtype == np.float32
    assert batch["tokens"].shape == (8, 12) and batch["tokens"].dtype == np.int32
    np.testing.assert_array_equal(batch["img_index"], t2i[k])
    np.testing.assert_array_equal(batch["images"], truth["train"].images[t2i[k]])
    np.testing.assert_array_equal(batch["truly_clean"], clean[k])
    for row, cap in enumerate(k):
      want = truth["train"].tokens[cap]
      assert batch["lengths"][row] == len(want)
      np.testing.assert_array_equal(batch["tokens"][row, : len(want)], want)
      assert not batch["tokens"][row, len(want) :].any()
  assert (~clean).any() and clean.any()


def test_resume_mid_epoch_gives_the_same_next_batches(data, noisy):
  first = _loader(data, noisy)
  _take(first, 3)
  state = json.loads(json.dumps(first.get_state()))
  expected = _take(first, 4)  # crosses into epoch 1
  resumed = _loader(data, noisy)
  resumed.set_state(state)
  for want, got in zip(expected, _take(resumed, 4)):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(UserError, match="train.seed"):
    train_run.check_resume(state, _loader(data, noisy, seed=3).get_state())


def test_process_slices_are_disjoint_and_make_the_global_batch(data, noisy):
  whole = _take(_loader(data, noisy), 5)
  parts = [
    _take(_loader(data, noisy, process_index=p, process_count=2), 5) for p in (0, 1)
  ]
  for step, want in enumerate(whole):
    a, b = parts[0][step], parts[1][step]
    assert len(a["cap_index"]) == 4
    assert not set(a["cap_index"].tolist()) & set(b["cap_index"].tolist())
    for key in want:
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), want[key])


def test_train_loader_rejects_bad_inputs(data, noisy):
  splits, _ = data
  t2i, clean = noisy
  with pytest.raises(UserError, match="train.batch_size=64"):
    config_checks.check_batch_fits(64, splits["train"].n_captions)
  with pytest.raises(UserError, match="t2i"):
    pipeline.train_loader(
      splits["train"], t2i[:-1], clean, global_batch_size=8, caption_len=0, seed=0
    )
  with pytest.raises(UserError, match="t2i"):
    pipeline.train_loader(
      splits["train"], t2i + N_TRAIN, clean, global_batch_size=8, caption_len=0, seed=0
    )


@pytest.mark.parametrize("batch_size,process_count", [(2, 1), (4, 2), (16, 1)])
def test_image_stream_visits_each_image_once(data, batch_size, process_count):
  splits, truth = data
  seen = []
  for p in range(process_count):
    batches = list(
      pipeline.image_batches(
        splits["test"], batch_size, process_index=p, process_count=process_count
      )
    )
    assert len(batches) == -(-N_TEST // batch_size)
    for batch in batches:
      assert batch["images"].shape == (batch_size // process_count, 3, 4)
      np.testing.assert_array_equal(
        batch["images"], truth["test"].images[batch["img_index"]]
      )
      seen += batch["img_index"][batch["mask"]].tolist()
  assert sorted(seen) == list(range(N_TEST))


def test_caption_stream_visits_captions_of_the_first_images_once(data):
  splits, truth = data
  seen = []
  for p in (0, 1):
    for batch in pipeline.caption_batches(
      splits["test"], 4, 0, num_images=2, process_index=p, process_count=2
    ):
      assert batch["tokens"].shape == (2, splits["test"].max_caption_len)
      keep = batch["mask"]
      np.testing.assert_array_equal(batch["img_index"], batch["cap_index"] // 5)
      for row in np.flatnonzero(keep):
        want = truth["test"].tokens[batch["cap_index"][row]]
        np.testing.assert_array_equal(batch["tokens"][row, : len(want)], want)
        assert batch["lengths"][row] == len(want)
      seen += batch["cap_index"][keep].tolist()
  assert sorted(seen) == list(range(10))
  with pytest.raises(UserError, match="data.val_images"):
    next(pipeline.caption_batches(splits["test"], 4, 0, num_images=4))


def test_pair_stream_covers_the_training_set_once(data, noisy):
  splits, truth = data
  t2i, clean = noisy
  batches = list(pipeline.pair_batches(splits["train"], t2i, 8, 0, seed=5))
  assert len(batches) == 5 and batches[-1]["mask"].sum() == 3
  seen = np.concatenate([b["cap_index"][b["mask"]] for b in batches])
  assert sorted(seen.tolist()) == list(range(35))
  again = np.concatenate(
    [b["cap_index"] for b in pipeline.pair_batches(splits["train"], t2i, 8, 0, seed=5)]
  )
  np.testing.assert_array_equal(
    again, np.concatenate([b["cap_index"] for b in batches])
  )
  for batch in batches:
    np.testing.assert_array_equal(batch["img_index"], t2i[batch["cap_index"]])
    np.testing.assert_array_equal(batch["truly_clean"], clean[batch["cap_index"]])
    np.testing.assert_array_equal(
      batch["images"], truth["train"].images[batch["img_index"]]
    )


def test_caption_length(data):
  split = data[0]["train"]
  longest = split.max_caption_len
  assert prepared_split.caption_length(split, 0) == longest
  assert prepared_split.caption_length(split, longest + 3) == longest + 3
  with pytest.raises(
    UserError, match=rf"data.caption_len={longest - 1} .*\({longest} tokens"
  ):
    prepared_split.caption_length(split, longest - 1)


def test_worker_processes_give_the_same_batches_and_resume(data, noisy):
  expected = _take(_loader(data, noisy), 6)
  loader = _loader(data, noisy, num_workers=2)
  got = _take(loader, 3)
  state = loader.get_state()
  loader.close()
  resumed = _loader(data, noisy, num_workers=1)
  resumed.set_state(state)
  got += _take(resumed, 3)
  for want, batch in zip(expected, got):
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key])
