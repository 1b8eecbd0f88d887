"""Tests for the mesh, shardings and process-local -> global batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from srem_jax import config_checks, sharding
from srem_jax.errors import UserError


def test_mesh_spans_all_devices_with_auto_axis():
  mesh = sharding.make_mesh(-1)
  assert mesh.axis_names == ("data",)
  assert mesh.shape["data"] == jax.device_count() == 8
  assert mesh.axis_types == (AxisType.Auto,)


def test_mesh_on_a_subset_and_bad_sizes():
  assert sharding.make_mesh(4).shape["data"] == 4
  for bad in (0, 9, -2):
    with pytest.raises(UserError, match="mesh.data"):
      config_checks.check_mesh(bad, jax.device_count())
  with pytest.raises(UserError, match="mesh.data=4: a multi-process run"):
    config_checks.check_mesh(4, jax.device_count(), process_count=2)


def test_global_batch_is_sharded_with_the_right_values():
  mesh = sharding.make_mesh()
  local = {
    "images": np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2),
    "mask": np.arange(16) % 3 == 0,
  }
  batch = sharding.global_batch(local, mesh)
  for key, value in local.items():
    arr = batch[key]
    assert arr.shape == value.shape and arr.dtype == value.dtype
    assert arr.sharding.is_equivalent_to(sharding.data_sharding(mesh), arr.ndim)
    assert len(arr.addressable_shards) == 8
    for shard in arr.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
      assert shard.data.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(arr), value)


def test_auto_axis_allows_plain_matmul_of_sharded_arrays():
  mesh = sharding.make_mesh()
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  e = sharding.global_batch({"e": x}, mesh)["e"]
  sim = jax.jit(lambda a: a @ a.T, out_shardings=sharding.replicated(mesh))(e)
  np.testing.assert_allclose(np.asarray(sim), x @ x.T, rtol=1e-5, atol=1e-5)
  assert jnp.sum(e).shape == ()


def test_check_batch_divisible():
  devices = sharding.make_mesh().shape["data"]
  config_checks.check_batch_divisible(128, devices)
  with pytest.raises(UserError, match=r"train\.batch_size=12 .* 8 devices"):
    config_checks.check_batch_divisible(12, devices)
