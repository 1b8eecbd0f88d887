"""Throughput of the train step, the tiled all-pairs scoring and the input pipeline.

Owns the `python benchmarks/bench.py` program and the train-step and pipeline
benchmarks behind it (`bench_train_step`, `bench_pipeline`); the scoring
benchmark is `bench_eval.py`'s, the shared counts and timing `measure.py`'s. Shapes
default to the paper's (36 x 2048 regions, E 1024, words 300, sim 256,
vocabulary 8481, captions of 15 tokens). Compilation and one warm-up run are
timed apart; the reported rate is the median of the timed repetitions. The
last line printed is one JSON object.

    python benchmarks/bench.py train_step --batch=128 --dtype=bfloat16
    python benchmarks/bench.py eval --n_img=100 --n_cap=500 [--resident]
    python benchmarks/bench.py pipeline --batch=128 --steps=20 [--index_only]
    python benchmarks/bench.py checks   # GPU/TPU programs, checked without either
    python benchmarks/bench.py eval --caption_lengths=../shared/data/f30k_caption_lengths.json

With `--caption_lengths` (a histogram file, `srem_jax.padding.read_histogram`)
caption lengths are drawn from its test split, the static length is its
longest, and captions are padded as the product pads them
(`padding.bucket_lengths`): a training batch to its bucket, evaluation tiles
to theirs. Without it, lengths lie in [L/2, L] and one caption has L tokens.

Models take the execution sizes `srem_jax.execution.resolve()` picks for the
machine (flags override them).

FLOPs are counted analytically (2 per multiply-add, matmuls only) for the
formulation the code runs (`pair_flops`); a training step counts 3x its
forward pass (forward, and backward to activations and weights), not the
forward a rematerialised chunk repeats.
"""

import json
import os
import statistics
import sys
import tempfile
import time

if __name__ == "__main__" and sys.argv[1:2] == ["checks"]:
  # The sharded-program check wants 8 host devices; set before jax starts.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import measure
import numpy as np
from absl import flags
from bench_eval import bench_eval
from jax.sharding import Mesh

from srem_jax import padding, sharding
from srem_jax.errors import UserError
from srem_jax.models.dims import PAPER_DIMS, TINY_DIMS
from srem_jax.models.heads import REMAT_MODES
from srem_jax.models.sgraf import DTYPES
from srem_jax.train import step


def bench_train_step(
  *,
  head="sgr",
  batch=128,
  caption_len=15,
  dtype="float32",
  steps=3,
  dims=None,
  hlo=False,
  caption_lengths=None,
  **model_kw,
) -> dict:
  """Times `step.make_train_step` (SREM loss, clipping, Adam) on one device.

  With `hlo`, the result also holds the compiled step's HLO text ("hlo").
  `caption_lengths` (a histogram file) draws the batch's lengths from it and
  pads the batch to its bucket, as the training loader does.
  """
  from configs import base  # the defaults every run starts from

  dims = dims or PAPER_DIMS
  rng = np.random.default_rng(0)
  lengths = None
  if caption_lengths:
    histogram = padding.read_histogram(caption_lengths)
    lengths = padding.draw_lengths(histogram, batch, rng)
    buckets = padding.bucket_lengths(int(histogram[0].max()))
    caption_len = padding.padded_length(int(lengths.max()), buckets)
  config = base.get_config()
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  model = measure.make_model(head, dtype, dims, **model_kw)
  tx = step.make_optimizer(config.train, steps_per_epoch=1000)
  state = step.init_state(
    model,
    tx,
    seed=0,
    num_regions=dims["num_regions"],
    img_dim=dims["img_dim"],
    caption_len=caption_len,
    mesh=mesh,
  )
  train_step = step.make_train_step(
    model,
    tx,
    step.loss_options(config.loss),
    mesh,
    warmup=False,
    external_selection=False,
  )
  data = sharding.global_batch(
    measure.random_batch(rng, batch, caption_len, dims, lengths), mesh
  )
  start = time.perf_counter()
  compiled = train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], data)
    jax.block_until_ready(metrics)

  warmup_s, _ = measure.median_time(run, 1)
  median_s, times = measure.median_time(run, steps)
  pairs = batch * batch
  image_flops, caption_flops = measure.encoder_flops(caption_len=caption_len, **dims)
  flops = 3 * (
    pairs * measure.pair_flops(head, caption_len=caption_len, **measure.head_dims(dims))
    + batch * (image_flops + caption_flops)
  )
  return {
    "bench": "train_step",
    "pairs_per_s": pairs / median_s,
    "flops_per_s": flops / median_s,
    "step_s": median_s,
    "times_s": times,
    "compile_s": compile_s,
    "warmup_s": warmup_s,
    "flops_per_step": flops,
    "shapes": {"batch": batch, "caption_len": caption_len, **dims},
    **measure.lengths_record(caption_lengths, lengths),
    **measure.common(head, dtype, model),
    **({"hlo": compiled.as_text()} if hlo else {}),
  }


def bench_pipeline(
  *,
  batch=128,
  caption_len=15,
  steps=20,
  num_workers=0,
  num_images=0,
  dims=None,
  index_only=False,
) -> dict:
  """Times `pipeline.train_loader` over a synthetic prepared dataset in a temp dir.

  `index_only` times the loader of `data.features_on_device`, which yields
  image indices instead of reading features.
  """
  from srem_jax.data import pipeline, prepare, prepared_split, synthetic

  dims = dims or PAPER_DIMS
  num_images = num_images or 2 * batch
  with tempfile.TemporaryDirectory() as root:
    start = time.perf_counter()
    synthetic.generate(
      root,
      name="bench_precomp",
      num_train=num_images,
      num_dev=1,
      num_test=1,
      num_regions=dims["num_regions"],
      feature_dim=dims["img_dim"],
    )
    prepared = prepare.prepare(
      root,
      "bench_precomp",
      "",
      os.path.join(root, "prep"),
      ["train"],
      log=lambda _: None,
    )
    prepare_s = time.perf_counter() - start
    split = prepared_split.load_prepared(prepared, "bench_precomp", "train")
    # Synthetic captions may run longer than the requested padding.
    caption_len = max(caption_len, split.max_caption_len)
    loader = pipeline.train_loader(
      split,
      split.cap_to_img,
      None,
      global_batch_size=batch,
      caption_len=caption_len,
      seed=0,
      num_workers=num_workers,
      with_images=not index_only,
    )
    try:
      batches = iter(loader)
      start = time.perf_counter()
      next(batches)
      first_s = time.perf_counter() - start
      median_s, times = measure.median_time(lambda: next(batches), steps)
    finally:
      loader.close()
  feature_bytes = 0 if index_only else batch * dims["num_regions"] * dims["img_dim"] * 4
  return {
    "bench": "pipeline",
    "batches_per_s": 1 / median_s,
    "bytes_per_s": feature_bytes / median_s,
    "index_only": index_only,
    "batch_s": median_s,
    "mean_batch_s": statistics.fmean(times),
    "first_batch_s": first_s,
    "prepare_s": prepare_s,
    "shapes": {
      "batch": batch,
      "caption_len": caption_len,
      "num_images": num_images,
      "num_regions": dims["num_regions"],
      "img_dim": dims["img_dim"],
    },
    "num_workers": num_workers,
    "device_kind": measure.device_kind(),
    "peak_rss_mb": measure.peak_rss_mb(),
  }


# ---- command line -----------------------------------------------------------

MODES = ("train_step", "eval", "pipeline", "checks")


def _define_flags() -> dict:
  """Flags exist only when this module is the program."""
  return dict(
    head=flags.DEFINE_enum("head", "sgr", ["sgr", "saf"], "Similarity head."),
    batch=flags.DEFINE_integer("batch", 128, "train_step/pipeline: global batch."),
    n_img=flags.DEFINE_integer("n_img", 100, "eval: images."),
    n_cap=flags.DEFINE_integer("n_cap", 500, "eval: captions."),
    img_tile=flags.DEFINE_integer("img_tile", 128, "eval: images per tile."),
    cap_tile=flags.DEFINE_integer("cap_tile", 256, "eval: captions per tile."),
    max_tiles=flags.DEFINE_integer(
      "max_tiles", 0, "eval: stop each pass after N tiles (0 = all)."
    ),
    caption_len=flags.DEFINE_integer("caption_len", 15, "Padded caption length L."),
    dtype=flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Matmul dtype."),
    steps=flags.DEFINE_integer("steps", 3, "Timed repetitions (median reported)."),
    img_chunk=flags.DEFINE_integer(
      "img_chunk", 0, "Images per scan step, SGR training (0 = model default)."
    ),
    cap_chunk=flags.DEFINE_integer(
      "cap_chunk", 0, "Captions per scan step, scoring (0 = model default)."
    ),
    remat=flags.DEFINE_enum(
      "remat", None, list(REMAT_MODES), "Rematerialisation (default: model's)."
    ),
    length_group=flags.DEFINE_integer(
      "length_group",
      -1,
      "Captions per length group (0 = every caption at the padded length, "
      "-1 = model default).",
    ),
    num_workers=flags.DEFINE_integer("num_workers", 0, "pipeline: grain workers."),
    index_only=flags.DEFINE_bool(
      "index_only",
      False,
      "pipeline: yield image indices only, as with data.features_on_device.",
    ),
    tiny=flags.DEFINE_bool("tiny", False, "Tiny dims instead of the paper's."),
    caption_lengths=flags.DEFINE_string(
      "caption_lengths",
      None,
      "train_step/eval: histogram JSON ({splits: {test: {length: count}}}) to "
      "draw caption lengths from; its longest is the static length.",
    ),
    static=flags.DEFINE_bool(
      "static", False, "eval: pad every tile to the static length (no buckets)."
    ),
    resident=flags.DEFINE_bool(
      "resident",
      False,
      "eval: time the product's device-resident evaluation (retrieval.py) "
      "instead of host tiles.",
    ),
  )


def main(argv, flag_values) -> None:
  values = {name: flag.value for name, flag in flag_values.items()}
  if len(argv) != 2 or argv[1] not in MODES:
    raise UserError(f"expected one mode argument out of {', '.join(MODES)}")
  mode = argv[1]
  for name in "batch n_img n_cap steps caption_len img_tile cap_tile".split():
    if values[name] < 1:
      raise UserError(f"--{name}: expected a positive integer, got {values[name]}")
  dims = TINY_DIMS if values["tiny"] else PAPER_DIMS
  model_kw = {}
  for chunk in ("img_chunk", "cap_chunk"):
    if values[chunk]:
      model_kw[chunk] = values[chunk]
  if values["remat"]:
    model_kw["remat"] = values["remat"]
  if values["length_group"] >= 0:
    model_kw["length_group"] = values["length_group"]
  common = dict(caption_len=values["caption_len"], steps=values["steps"], dims=dims)
  if mode == "checks":
    import accelerator_checks

    accelerator_checks.report(dims=dims, caption_len=values["caption_len"])
    return
  if mode == "train_step":
    result = bench_train_step(
      head=values["head"],
      batch=values["batch"],
      dtype=values["dtype"],
      caption_lengths=values["caption_lengths"],
      **common,
      **model_kw,
    )
  elif mode == "eval":
    result = bench_eval(
      head=values["head"],
      n_img=values["n_img"],
      n_cap=values["n_cap"],
      dtype=values["dtype"],
      img_tile=values["img_tile"],
      cap_tile=values["cap_tile"],
      max_tiles=values["max_tiles"],
      caption_lengths=values["caption_lengths"],
      static=values["static"],
      resident=values["resident"],
      **common,
      **model_kw,
    )
  else:
    result = bench_pipeline(
      batch=values["batch"],
      num_workers=values["num_workers"],
      index_only=values["index_only"],
      **common,
    )
  result["load_average"] = os.getloadavg()
  print(json.dumps(result))


if __name__ == "__main__":
  from srem_jax import cli  # the config-flag stack, needed by the program only

  _flag_values = _define_flags()
  cli.run(lambda argv: main(argv, _flag_values))
