"""Predicted run times on an accelerator, from the run's programs' matmul FLOPs.

Owns `python -m srem_jax.predict`: for a config and targets
(`targets.TARGETS`) it traces the programs a run there builds
(`aot.RunPrograms` with the execution sizes the target resolves: the train
step per caption bucket, the encoders, the scorer tile), counts their matmul
FLOPs with every loop iteration (`flops`), weights caption buckets by
Flickr30K's caption lengths (`caption_lengths`), and divides by the target's
chips and its peak matmul rate at the config's dtype and matmul precision.
Each time is a compute-bound lower bound: every matmul FLOP at peak, with no
memory traffic, elementwise work, communication or host time. Tracing needs
a jax device per chip (the command asks for 8 host devices).

    python -m srem_jax.predict --config=configs/flickr.py --targets=h200,v5e-8,v4-8

Caption buckets: a training batch is padded to the bucket of its longest
caption (`padding`), and the SGR head cuts each group of `length_group`
captions (in length order) to its own bucket, a branch picked at run time. A
program traced at bucket L counts base + G * h(k) FLOPs when every
by-length switch takes branch k (G groups), so a batch whose groups take
branches k_g costs the mean over g of those counts. For captions drawn
independently from the histogram, the batch's bucket and its groups'
branches have an exact distribution (order statistics,
`caption_lengths.bucket_weights`); evaluation tiles hold a split's captions
sorted, so theirs are read off the sorted lengths (`sorted_lengths`,
`group_branches`).
"""

import dataclasses
import os

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax
import numpy as np

from srem_jax import aot, execution, padding
from srem_jax.compile import caption_lengths, flops, targets
from srem_jax.compile.caption_lengths import (
  bucket_weights,
  clipped,
  group_branches,
  sorted_lengths,
)
from srem_jax.compile.shapes import data_shapes
from srem_jax.errors import UserError
from srem_jax.methods import readings

CAPTIONS_PER_IMAGE = 5
# Images of the (dev, test) splits: Karpathy's Flickr30K, COCO's dev and testall.
SPLIT_IMAGES = {"f30k_precomp": (1014, 1000), "coco_precomp": (5000, 5000)}
# Published PyTorch figures (SGR, one GPU): the Flickr30K 1,000 x 5,000 test
# matrix in 35 s and ~0.55 s per step at batch 128; their GPU is not named.
PUBLISHED_STEP_S, PUBLISHED_F30K_MATRIX_S = 0.55, 35.0


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


class Predictor:
  """Matmul FLOPs (over all chips) of a run's work on `mesh` with `plan`,
  from `aot.RunPrograms` traced once per caption bucket."""

  def __init__(self, config, mesh, plan, shapes):
    self.config, self.mesh, self.plan, self.shapes = config, mesh, plan, shapes
    self.requested = config.data.caption_len  # > 0: one static length
    self._counts = {}

  def _branches(self, which, prefix, length, **plan) -> list[float]:
    """FLOPs of the program named `prefix...` among `RunPrograms.<which>()`
    at caption length `length`, with every by-length switch (a cond with a
    branch per bucket of `length`) taking branch k, for each k; other conds
    count their largest branch."""
    key = (prefix, length, tuple(sorted(plan.items())))
    if key not in self._counts:
      shapes = dataclasses.replace(self.shapes, caption_len=length)
      run = aot.RunPrograms(self.config, self.mesh, self.plan._replace(**plan), shapes)
      program = next(p for p in getattr(run, which)() if p.name.startswith(prefix))
      closed = program.fn.trace(*program.args).jaxpr
      n = len(padding.bucket_lengths(length))
      pick = lambda k: lambda c: c[k] if len(c) == n else max(c)
      self._counts[key] = [flops.count_jaxpr(closed, pick(k)).flops for k in range(n)]
    return self._counts[key]

  def train_step(self, length: int, phase: str = "main") -> list[float]:
    return self._branches("train_steps", f"train step {phase} ", length)

  def scorer(self, length: int, img_tile: int, cap_tile: int) -> list[float]:
    tiles = dict(img_tile=img_tile, cap_tile=cap_tile)
    return self._branches("evaluation", "eval scorer", length, **tiles)

  def encoders(self) -> tuple[float, float, int]:
    """(image, caption) encoder FLOPs per evaluation batch and its size;
    captions at the static length, as evaluation embeds them."""
    length = self.shapes.caption_len
    images, captions = (
      self._branches("evaluation", f"encode {what}", length)[0]
      for what in ("images", "captions")
    )
    return images, captions, _round_up(self.config.eval.batch_size, self.mesh.devices.size)

  @property
  def _train_group(self) -> int:
    sgr = self.config.model.head == "sgr"
    return max(1, self.plan.length_group if sgr else self.plan.cap_chunk)

  def batch_flops(self, lengths, phase: str = "main") -> float:
    """FLOPs of one train step on a batch with these caption lengths."""
    grid = padding.bucket_lengths(self.shapes.caption_len, self.requested)
    padded = padding.padded_length(int(np.max(lengths)), grid)
    counts = self.train_step(padded, phase)
    branches = group_branches(np.sort(lengths), self._train_group, padded)
    return float(np.mean([counts[k] for k in branches]))

  def step_flops(self, histogram, phase: str = "main") -> float:
    """Expected FLOPs of a train step on batches drawn from the histogram."""
    grid = padding.bucket_lengths(self.shapes.caption_len)
    batch = self.config.train.batch_size
    weights = bucket_weights(histogram, batch, self._train_group, grid)
    if self.requested:  # every batch at the static length, the last bucket
      weights = np.vstack([np.zeros_like(weights[:-1]), weights.sum(axis=0)])
    total = 0.0
    for l, length in enumerate(grid):
      if weights[l].sum() > 1e-9:  # buckets a batch all but never reaches: skipped
        counts = self.train_step(length, phase)
        total += sum(weights[l, k] * counts[k] for k in range(l + 1))
    return total

  def matrix_flops(self, num_images: int, lengths) -> tuple[float, float]:
    """(scorer, encoders) FLOPs of the num_images x len(lengths) matrix laid
    out as evaluation does: image blocks, caption tiles in length order."""
    devices, lengths = self.mesh.devices.size, np.sort(lengths)
    img_tile = min(_round_up(self.plan.img_tile, devices), _round_up(num_images, devices))
    cap_tile = min(self.plan.cap_tile, len(lengths))
    grid = padding.bucket_lengths(self.shapes.caption_len, self.requested)
    group = max(1, min(self.plan.cap_chunk, cap_tile))
    row = 0.0
    for start in range(0, len(lengths), cap_tile):
      tile = lengths[start : start + cap_tile]
      tile = np.concatenate([tile, np.full(cap_tile - len(tile), tile[-1])])
      padded = padding.padded_length(int(tile[-1]), grid)
      counts = self.scorer(padded, img_tile, cap_tile)
      row += np.mean([counts[k] for k in group_branches(tile, group, padded)])
    images, captions, batch = self.encoders()
    encode = -(-num_images // batch) * images + -(-len(lengths) // batch) * captions
    return -(-num_images // img_tile) * row, encode


# ---- a run's figures ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figure:
  what: str
  flops: float  # matmul FLOPs over all chips
  seconds: float  # flops / chips / peak: a compute-bound lower bound
  published: str = ""  # the published PyTorch figure, where there is one


def target_for(device_kind: str, chips: int = 1) -> targets.Target | None:
  """The target whose chip is this jax device kind (maker and model), if any."""
  for target in targets.TARGETS.values():
    if target.chips == chips and target.device_kind.split()[:2] == device_kind.split()[:2]:
      return target
  return None


def predict(config, target_name: str) -> tuple[list[Figure], str]:
  """The figures of a run of `config` on the target, and a line saying how."""
  if config.loss.name == "ncr":
    raise UserError("predictions cover single-model runs; NCR trains two models")
  target, devices = targets.TARGETS[target_name], jax.devices()
  if len(devices) < target.chips:
    raise UserError(
      f"{target_name}: tracing needs {target.chips} jax devices, have "
      f"{len(devices)} (XLA_FLAGS=--xla_force_host_platform_device_count=8)"
    )
  mesh = aot.target_mesh(devices[: target.chips], config.mesh.data)
  plan = execution.resolve(config.execution, device=aot._TargetDevice(target))
  shapes = data_shapes(config)
  model = Predictor(config, mesh, plan, shapes)
  dtype, precision = config.model.dtype, plan.matmul_precision
  peak, chips = target.peak(dtype, precision), mesh.devices.size
  test, dev = (
    clipped(caption_lengths.histogram(split), shapes.caption_len)
    for split in ("test", "dev")
  )
  synthetic = config.data.synthetic
  dev_images, test_images = (
    (synthetic.num_dev, synthetic.num_test)
    if synthetic.enabled
    else SPLIT_IMAGES.get(config.data.name, SPLIT_IMAGES["f30k_precomp"])
  )
  val_images = min(config.data.val_images or dev_images, dev_images)

  def matrix(images, histogram):
    lengths = sorted_lengths(histogram, CAPTIONS_PER_IMAGE * images)
    return sum(model.matrix_flops(images, lengths))

  batch, epochs = config.train.batch_size, config.train.epochs
  main = model.step_flops(test, "main")
  warm_epochs = config.train.warmup_epochs if config.loss.name == "srem" else 0
  warm = model.step_flops(test, "warm-up") if warm_epochs else 0.0
  val, test_matrix = matrix(val_images, dev), matrix(test_images, test)
  steps = shapes.train_images * CAPTIONS_PER_IMAGE // batch
  run = steps * (warm_epochs * warm + (epochs - warm_epochs) * main)
  run += epochs * val + test_matrix
  f30k = config.data.name == "f30k_precomp"
  selects = config.loss.name == "srem" and readings.resolve(config.loss)["selection"]
  left_out = " (not its per-epoch selection pass)" if selects == "epoch_gmm" else ""
  step_s, matrix_s = PUBLISHED_STEP_S, PUBLISHED_F30K_MATRIX_S
  published_run = epochs * (steps * step_s + matrix_s) / 3600
  rows = [
    (f"train step, batch {batch} (F30K test lengths)", main, f"~{step_s} s"),
    (f"validation matrix {val_images:,} x {CAPTIONS_PER_IMAGE * val_images:,} "
     "(F30K dev lengths)", val, ""),
    (f"test matrix {test_images:,} x {CAPTIONS_PER_IMAGE * test_images:,} "
     "(F30K test lengths)", test_matrix, f"{matrix_s:g} s"),
    (f"one {epochs}-epoch run: {steps:,} steps per epoch, validation each "
     f"epoch, the test matrix{left_out}", run, f"~{published_run:.1f} h (derived: {epochs} "
     f"x ({steps:,} x {step_s} s + {matrix_s:g} s))"),
  ]  # fmt: skip
  figures = [
    Figure(what, n, n / chips / peak, published if f30k else "")
    for what, n, published in rows
  ]
  how = (
    f"{target.name}: {chips} x {target.device_kind}, peak {peak / 1e12:.1f} "
    f"TFLOP/s per chip ({dtype}, matmul precision {precision}); {plan.reason}"
  )
  return figures, how


def duration(seconds: float) -> str:
  if seconds < 1:
    return f"{1e3 * seconds:.3g} ms"
  if seconds < 600:
    return f"{seconds:.3g} s"
  return f"{seconds / 60:.3g} min" if seconds < 36000 else f"{seconds / 3600:.3g} h"


def markdown(config, names: list[str], results: list[list[Figure]]) -> str:
  head = " | ".join(f"{n} (lower bound)" for n in names)
  lines = [f"| {config.name}: what | {head} | PyTorch (published) |"]
  lines.append("|---" + "|---:" * len(names) + "|---|")
  for i, first in enumerate(results[0]):
    cells = [
      f"{duration(r[i].seconds)} ({r[i].flops / 1e12:,.1f} TFLOP)" for r in results
    ]
    lines.append(f"| {first.what} | {' | '.join(cells)} | {first.published or '-'} |")
  return "\n".join(lines)


def main(argv, flag_values) -> None:
  config, names = flag_values["config"].value, flag_values["targets"].value.split(",")
  if len(argv) > 1 or config is None:
    raise UserError("usage: --config=configs/flickr.py [--targets=h200,v5e-8,v4-8]")
  unknown = [n for n in names if n not in targets.TARGETS]
  if unknown:
    raise UserError(f"--targets: {unknown} not among {', '.join(targets.TARGETS)}")
  results = []
  for name in names:
    figures, how = predict(config, name)
    print(how, flush=True)
    results.append(figures)
  print(
    "\nCompute-bound lower bounds: matmul FLOPs (every loop iteration, "
    "caption buckets weighted by Flickr30K's lengths) / chips / peak.\n"
  )
  print(markdown(config, names, results))


if __name__ == "__main__":
  from absl import flags

  from srem_jax import cli

  _flags = dict(
    config=cli.define_config_flag(),
    targets=flags.DEFINE_string(
      "targets", "h200,v5e-8,v4-8", "Comma-separated targets to predict for."
    ),
  )
  cli.run(lambda argv: main(argv, _flags))
