"""The device mesh and how host batches become global, sharded `jax.Array`s.

One 1-D mesh with axis "data" spans the devices of every process. Its axis type
is `Auto` (jax 0.10 `jax.make_mesh` defaults to `Explicit`, under which plain
matmuls of sharded arrays raise `ShardingTypeError`). Each process feeds its own
slice of the global batch; `global_batch` stitches the slices together.

    mesh = make_mesh(config.mesh.data)
    batch = global_batch(next(loader), mesh)  # leading axis sharded on "data"
    for batch in prefetch_global(loader, mesh, depth=2): ...  # batches ahead
    rows = to_host(global_array)  # every row on this host, one transfer
"""

import collections
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(data_axis: int = -1) -> Mesh:
  """A ("data",) mesh over all devices (-1) or, on one process, the first
  `data_axis` (checked by `config_checks.check_mesh`)."""
  devices = jax.devices()
  size = len(devices) if data_axis == -1 else data_axis
  return Mesh(np.asarray(devices[:size]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over "data", other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of each array -> global arrays sharded on "data"."""
  sharding = data_sharding(mesh)
  # A transfer asked for, so allowed under `jax.transfer_guard("disallow")`:
  # on several processes jax moves the rows by a path the guard counts as
  # implicit.
  with jax.transfer_guard_host_to_device("allow"):
    return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in local.items()
    }


def prefetch_global(
  local_batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, depth: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """`global_batch` of each batch, issued `depth` batches before it is yielded.

  Transfers are asynchronous, so while the step of one batch runs the next
  `depth` are already on their way to the devices and the step never waits
  for its input. `global_batch` allows its own transfers, so this works under
  `jax.transfer_guard("disallow")`.
  """
  queue = collections.deque()
  for local in local_batches:
    queue.append(global_batch(local, mesh))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def place(x: np.ndarray, where) -> jax.Array:
  """A global array from a host array every process holds: an explicit copy."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return jax.device_put(x, where)
  # Each process fills its own devices' shards of the global array.
  return jax.make_array_from_callback(x.shape, where, lambda index: x[index])


def to_host(tree):
  """Every row of a tree of global arrays on this host: one explicit transfer."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)
