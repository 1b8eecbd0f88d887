"""Training image features kept in device memory (`data.features_on_device`).

The whole training split is loaded once into one replicated device array in
the model's matmul dtype; the loader then ships only image indices and the
step gathers its batch from the array.

    features = resident.resident_features(data.train, mesh, "bfloat16")
    images = resident.gather_images(features, batch["img_index"], mesh)
"""

import math

import jax
import numpy as np

from srem_jax import sharding
from srem_jax.errors import UserError
from srem_jax.models.sgraf import DTYPES


def resident_features(split, mesh, model_dtype: str, log=print) -> jax.Array:
  """Every image of `split` in one device array, replicated over `mesh`.

  Stored in the model's matmul dtype: the image encoder's first layer casts
  its input to that dtype anyway, so bfloat16 storage loses nothing.
  """
  dtype = np.dtype(DTYPES[model_dtype])
  shape = (split.n_images, split.num_regions, split.feature_dim)
  gib = math.prod(shape) * dtype.itemsize / 2**30
  stats = mesh.local_devices[0].memory_stats()  # None on CPU
  if stats and "bytes_limit" in stats:
    free = (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / 2**30
    if gib > free:
      raise UserError(
        f"config data.features_on_device=True: the {split.split} features need "
        f"{gib:.2f} GiB on every device but only {free:.2f} GiB are free; set it False"
      )
  host = split.all_images(dtype)
  features = jax.make_array_from_callback(
    shape, sharding.replicated(mesh), lambda index: host[index]
  )
  log(
    f"training features on device: {shape} {dtype.name}, "
    f"{gib:.2f} GiB on each of {mesh.size} devices"
  )
  return features


def gather_images(features, img_index, mesh):
  """Rows `img_index` of the resident features, sharded like a host batch."""
  return jax.lax.with_sharding_constraint(
    features[img_index], sharding.data_sharding(mesh)
  )
