"""Epoch-level sample selection: the statistics pass and the GMM split
(docs/method.md §Parts).

`pair_statistics` runs the model over every training pair once, in a seeded
order, and returns each caption's in-batch cross-entropy, energy and swapped
entropy. Host batches are read and placed on the devices by a background
thread a few batches ahead; with `data.features_on_device` the batches carry
image indices only and the images are gathered from the resident features in
the jitted pass, as the training step does. Results stay on the devices
until the pass ends and come back in one transfer. `gmm_selection` turns the
statistics into the clean mask the next epoch trains on.

    stats = pair_statistics(model, variables, data, config, mesh, tau=0.05,
                            temp=1.0, features=run.features)
    clean = gmm_selection(config, model, state, data, mesh, run.features)
"""

import dataclasses
import functools
import queue
import threading

import jax
import numpy as np

from srem_jax import execution, sharding
from srem_jax.data import pipeline, resident
from srem_jax.methods import gmm, losses
from srem_jax.report.reporting import PassProgress

STATISTICS = ("ce", "energy", "entropy")
# Batches enqueued on the devices ahead of the one the host waits for: enough
# to keep them busy while the next batch is read, few enough to bound memory.
_IN_FLIGHT = 2


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Prefetch:
  """Yields `make(item)` for each item of `items`, computed `depth` ahead in a
  thread; an exception there is raised here at the item it stopped on."""

  _END = object()

  def __init__(self, items, make, depth: int = 2):
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, args=(items, make), daemon=True)
    self._thread.start()

  def _fill(self, items, make):
    try:
      for item in items:
        if self._stop.is_set():
          return
        self._queue.put((item, make(item)))
      self._queue.put(self._END)
    except BaseException as error:  # re-raised on the consuming thread
      self._queue.put(error)

  def __iter__(self):
    try:
      while True:
        entry = self._queue.get()
        if entry is self._END:
          return
        if isinstance(entry, BaseException):
          raise entry
        yield entry
    finally:
      self._stop.set()
      while self._thread.is_alive():  # unblock a producer waiting on a full queue
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass


@dataclasses.dataclass(frozen=True)
class SremStatistics:
  """Each pair's in-batch cross-entropy, energy and swapped entropy."""

  tau: float
  temp: float

  def __call__(self, scores, valid) -> dict:
    out = losses.per_sample_stats(scores, self.tau, self.temp, valid=valid)
    return {key: out[key] for key in STATISTICS}


@functools.lru_cache(maxsize=8)
def statistics_function(model, statistic, mesh, on_device: bool, plan=None):
  """Jitted per-sample statistics of one batch, built once per model and
  statistic (a hashable `(scores, valid) -> {name: (K,) array}`), compiled
  with the execution `plan`'s compiler options (None: XLA's)."""

  def stats(v, batch, *features):
    images = (
      resident.gather_images(features[0], batch["img_index"], mesh)
      if on_device
      else batch["images"]
    )
    scores = model.apply(v, images, batch["tokens"], batch["lengths"], train=False)
    return statistic(scores, batch["mask"])

  return jax.jit(stats, compiler_options=execution.compiler_options(plan))


def pair_statistics(
  model,
  variables,
  data,
  config,
  mesh,
  *,
  tau=None,
  temp=None,
  features=None,
  statistic=None,
  plan=None,
) -> dict[str, np.ndarray]:
  """Per-caption in-batch cross-entropy, energy and swapped entropy over the
  training set, as {"ce", "energy", "entropy"} arrays indexed by caption;
  another `statistic` (hashable, `(scores, valid) -> {name: (K,) array}`,
  e.g. NCR's per-sample loss) replaces them, with `tau`/`temp` unused.

  Batches follow a seeded order of the whole (noisy) training set; the last
  one is padded and its padding masked out of every softmax. `features`
  (`resident.resident_features`) replaces the images of the host batches;
  the pass compiles with the execution `plan`'s compiler options.
  """
  devices = mesh.devices.size
  batch_size = _round_up(config.train.batch_size, devices)
  n = data.train.n_captions
  on_device = features is not None
  statistic = statistic or SremStatistics(tau, temp)
  stats = statistics_function(model, statistic, mesh, on_device, plan)
  progress = PassProgress(
    "selection statistics",
    _round_up(n, batch_size) // batch_size,
    "batches",
    items=(n, "pairs"),
    enabled=config.progress.enabled,
    delay_s=config.progress.delay_s,
  )
  batches = pipeline.pair_batches(
    data.train,
    data.noise.t2i,
    batch_size,
    data.caption_len,
    seed=config.train.seed,
    buckets=data.buckets,
    with_images=not on_device,
  )
  extra = (features,) if on_device else ()
  results = []
  for done, (_, batch) in enumerate(
    Prefetch(batches, lambda b: sharding.global_batch(b, mesh)), 1
  ):
    values = stats(variables, batch, *extra)
    results.append((values, batch["cap_index"], batch["mask"]))
    if len(results) > _IN_FLIGHT:  # waits for the devices, transfers nothing
      jax.block_until_ready(results[-1 - _IN_FLIGHT][0])
    progress(done)
  out = {}
  for values, cap_index, keep in sharding.to_host(results):
    for key in values:
      column = out.setdefault(key, np.zeros(n, np.float32))
      column[cap_index[keep]] = values[key][keep]
  return out


def gmm_selection(
  config, model, state, data, mesh, features=None, *, plan=None
) -> np.ndarray:
  """Epoch-level clean mask per caption from a statistics pass (compiled
  with the execution `plan`'s compiler options)."""
  loss_cfg = config.loss
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  stats = pair_statistics(
    model,
    variables,
    data,
    config,
    mesh,
    tau=loss_cfg.tau,
    temp=loss_cfg.energy_temp,
    features=features,
    plan=plan,
  )
  return gmm.gmm_clean_mask(
    stats["ce"],
    stats["energy"],
    iters=loss_cfg.gmm_iters,
    tol=loss_cfg.gmm_tol,
    reg=loss_cfg.gmm_reg,
    min_noisy=loss_cfg.gmm_min_noisy,
  )
