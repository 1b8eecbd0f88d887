"""Training images kept in device memory give the run the host-fed path gives."""

import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import rawdata
import tiny
from test_main import latest_params, tiny_config

from srem_jax import config_checks, execution, sharding, train
from srem_jax.data import noise, pipeline, prepare, prepared_split, resident
from srem_jax.errors import UserError
from srem_jax.models.sgraf import SGRAF, build_model
from srem_jax.train.step import init_state, make_train_step

N_IMAGES, K, R, D, L, VOCAB = 24, 16, 4, 12, 7, 30


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  raw_dir = tmp_path_factory.mktemp("raw")
  truth = rawdata.write_raw(raw_dir, "toy", {"train": 7}, num_regions=3, feature_dim=5)
  out = prepare.prepare(str(raw_dir), "toy", "", str(raw_dir / "prep"), log=print)
  return prepared_split.load_prepared(out, "toy", "train"), truth["train"]


def test_whole_split_reads_back_in_either_dtype(prepared):
  split, truth = prepared
  np.testing.assert_array_equal(split.all_images(), truth.images)
  bf16 = split.all_images(jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  # The host cast rounds as the encoder's in-graph cast does (nearest even).
  np.testing.assert_array_equal(
    bf16, np.asarray(jnp.asarray(truth.images, jnp.bfloat16))
  )


@pytest.mark.parametrize("protocol", ["caption", "image"])
def test_loader_indices_select_the_images_the_host_path_reads(
  prepared, monkeypatch, protocol
):
  split, truth = prepared
  if protocol == "caption":
    t2i = noise.caption_level_noise(split.n_captions, 5, ratio=0.6, seed=1)
  else:
    t2i = np.repeat(noise.image_level_noise(split.n_images, 0.6, seed=1), 5)
  assert (t2i != split.cap_to_img).any()
  kw = dict(global_batch_size=8, caption_len=0, seed=3)
  host = pipeline.train_loader(split, t2i, None, **kw)
  host_batches = [next(host) for _ in range(6)]  # crosses into epoch 1
  resident = split.all_images()

  def no_host_reads(indices):
    raise AssertionError("the index-only loader read image features")

  monkeypatch.setattr(split, "images", no_host_reads)
  for process in (0, 1):
    indexed = pipeline.train_loader(
      split, t2i, None, with_images=False, process_index=process, process_count=2, **kw
    )
    for step, want in enumerate(host_batches):
      got = next(indexed)
      assert "images" not in got
      rows = slice(4 * process, 4 * process + 4)
      for key, value in got.items():
        np.testing.assert_array_equal(value, want[key][rows])
      np.testing.assert_array_equal(got["img_index"], t2i[got["cap_index"]])
      np.testing.assert_array_equal(resident[got["img_index"]], want["images"][rows])
      np.testing.assert_array_equal(
        truth.images[t2i[got["cap_index"]]], want["images"][rows]
      )
    assert indexed.get_state() == host.get_state()


def _fake_split(images):
  return types.SimpleNamespace(
    n_images=images.shape[0],
    num_regions=images.shape[1],
    feature_dim=images.shape[2],
    split="train",
    all_images=lambda dtype: images.astype(dtype),
  )


def _make_step(model, tx, mesh, on_device):
  return make_train_step(
    model,
    tx,
    tiny.loss_options(),
    mesh,
    warmup=False,
    external_selection=True,
    features_on_device=on_device,
  )


def _run_steps(mesh, step, initial, images, features=None, steps=2):
  """Adam steps on fixed batches: host images, or gathered from `features`."""
  state = jax.device_put(initial, sharding.replicated(mesh))
  losses = []
  for i in range(steps):
    batch = tiny.random_batch(
      i, batch=K, regions=R, features=D, caption_len=L, vocab=VOCAB
    )
    # Repeated and permuted rows, as noisy partners are.
    batch["img_index"] = np.random.default_rng(i).integers(0, N_IMAGES, K, np.int32)
    batch["selected"] = np.arange(K) % 3 > 0
    if features is None:
      batch["images"] = images[batch["img_index"]]
      state, metrics = step(state, sharding.global_batch(batch, mesh))
    else:
      del batch["images"]
      state, metrics = step(state, sharding.global_batch(batch, mesh), features)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_step_on_resident_features_equals_the_host_fed_step():
  mesh = sharding.make_mesh(-1)
  assert mesh.size == 8
  model = build_model(tiny.model_config("sgr", img_dim=D), VOCAB, execution.resolve())
  tx = optax.adam(1e-2)
  initial = jax.device_get(
    init_state(model, tx, seed=0, num_regions=R, img_dim=D, caption_len=L, mesh=mesh)
  )
  images = np.random.default_rng(7).normal(size=(N_IMAGES, R, D)).astype(np.float32)
  host_fed = _make_step(model, tx, mesh, on_device=False)
  want, want_losses = _run_steps(mesh, host_fed, initial, images)
  logged = []
  features = resident.resident_features(
    _fake_split(images), mesh, "float32", logged.append
  )
  assert features.dtype == jnp.float32 and features.shape == images.shape
  assert features.sharding.is_fully_replicated and "GiB" in logged[0]
  on_device = _make_step(model, tx, mesh, on_device=True)
  got, got_losses = _run_steps(mesh, on_device, initial, None, features)
  # The same float32 values reach the same computation: nothing may differ.
  assert got_losses == want_losses and np.all(np.isfinite(got_losses))
  chex.assert_trees_all_equal(got.params, want.params)
  chex.assert_trees_all_equal(got.batch_stats, want.batch_stats)
  assert not features.is_deleted()  # an argument, never donated with the state
  # Other features of the same shape change the result: they were not baked in.
  other = resident.resident_features(_fake_split(images[::-1].copy()), mesh, "float32")
  changed, _ = _run_steps(mesh, on_device, initial, None, other, steps=1)
  assert not np.array_equal(
    changed.params["img_enc"]["fc"]["kernel"], got.params["img_enc"]["fc"]["kernel"]
  )


def test_bfloat16_features_lose_nothing_a_bfloat16_model_keeps():
  """The image encoder casts its input to the matmul dtype itself."""
  mesh = sharding.make_mesh(1)
  model = build_model(
    tiny.model_config("sgr", img_dim=D, dtype="bfloat16"), VOCAB, execution.resolve()
  )
  variables = model.init(
    jax.random.PRNGKey(0), jnp.zeros((2, R, D)), train=False, method=SGRAF.encode_images
  )
  images = np.random.default_rng(3).normal(size=(N_IMAGES, R, D)).astype(np.float32)
  features = resident.resident_features(_fake_split(images), mesh, "bfloat16")
  assert features.dtype == jnp.bfloat16

  @jax.jit
  def encode(x):
    return model.apply(variables, x, train=False, method=SGRAF.encode_images)

  chex.assert_trees_all_equal(encode(features), encode(jnp.asarray(images)))


def test_bad_values_are_one_line_user_errors():
  config = ml_collections.ConfigDict({"data": {"features_on_device": "yes"}})
  with pytest.raises(UserError, match=r"data.features_on_device='yes': must be True"):
    config_checks.check_boolean(config, "data.features_on_device")
  device = types.SimpleNamespace(
    memory_stats=lambda: {"bytes_limit": 2**30, "bytes_in_use": 2**29}
  )
  small = types.SimpleNamespace(local_devices=[device], size=1)
  split = _fake_split(np.zeros((1, 36, 1024), np.float32))
  split.n_images = 4096  # 0.56 GiB as float32
  with pytest.raises(UserError, match=r"need 0\.56 GiB .* only 0\.50 GiB are free"):
    resident.resident_features(split, small, "float32")


@pytest.mark.slow
def test_run_with_resident_features_ends_like_the_host_fed_run(
  tmp_path_factory, capsys
):
  data_dir = tmp_path_factory.mktemp("data")
  results, params = {}, {}
  for on in (False, True):
    # One post-warm-up epoch: the step with external selection is covered above.
    config = tiny_config(data_dir, epochs=1, warmup_epochs=0)
    config.data.features_on_device = on
    workdir = str(tmp_path_factory.mktemp(f"on_{on}"))
    results[on] = train.train_and_evaluate(config, workdir)
    params[on] = latest_params(workdir)
  assert "training features on device: (24, 4, 16) float32" in capsys.readouterr().out
  assert results[True]["test"] == results[False]["test"]
  chex.assert_trees_all_equal(params[True], params[False])
