"""Throughput of the train step, the tiled all-pairs scoring and the input pipeline.

Owns the `python -m srem_jax.bench` program and the functions behind it
(`bench_train_step`, `bench_eval`, `bench_pipeline`, `pair_flops`). Shapes
default to the paper's (36 x 2048 regions, E 1024, words 300, sim 256,
vocabulary 8481, captions of 15 tokens). Compilation and one warm-up run are
timed apart; the reported rate is the median of the timed repetitions. The
last line printed is one JSON object.

    python -m srem_jax.bench train_step --batch=128 --dtype=bfloat16
    python -m srem_jax.bench eval --n_img=100 --n_cap=500 [--resident]
    python -m srem_jax.bench pipeline --batch=128 --steps=20 [--index_only]
    python -m srem_jax.bench checks   # GPU/TPU programs, checked without either
    python -m srem_jax.bench eval --caption_lengths=../shared/data/f30k_caption_lengths.json

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
import resource
import statistics
import sys
import tempfile
import time

if __name__ == "__main__" and sys.argv[1:2] == ["checks"]:
  # The sharded-program check wants 8 host devices; set before jax starts.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh

from srem_jax import execution, padding, sharding, step
from srem_jax.errors import UserError
from srem_jax.models import tiling
from srem_jax.models.heads import REMAT_MODES
from srem_jax.models.sgraf import DTYPES, SGRAF, CaptionEmbedding, ImageEmbedding

PAPER_DIMS = dict(
  img_dim=2048,
  num_regions=36,
  embed_dim=1024,
  word_dim=300,
  sim_dim=256,
  vocab_size=8481,
  sgr_steps=3,
)


# ---- FLOP counts ------------------------------------------------------------


def pair_flops(
  head, *, num_regions, caption_len, embed_dim, sim_dim, sgr_steps, reference=False
):
  """Forward FLOPs of one image x caption pair.

  Attention R.L.E and context R.L.E, local nodes L.E.S, global node E.S, then
  per SGR step K = L + 1 nodes: the reference runs query, key and output
  layers (3 K.S.S) plus two K.K.S products; the fast path runs one K.S.2S
  layer (x [W_q W_k^T | W_g]) and two K.K.S products, and its last step only
  node 0 (4 S.S + 4 K.S). SAF: gate K.S and pooling K.S.
  """
  r, length, e, s = num_regions, caption_len, embed_dim, sim_dim
  k = length + 1
  macs = 2 * r * length * e + length * e * s + e * s + s
  if head == "saf":
    macs += 2 * k * s
  elif reference:
    macs += sgr_steps * (3 * k * s * s + 2 * k * k * s)
  else:
    macs += (sgr_steps - 1) * (2 * k * s * s + 2 * k * k * s) + 2 * s * s + 2 * k * s
  return 2.0 * macs


def encoder_flops(*, num_regions, caption_len, img_dim, embed_dim, word_dim, **_):
  """Forward FLOPs of (one image, one caption) through encoders and SA layers."""
  r, length, e = num_regions, caption_len, embed_dim
  image = r * img_dim * e + r * e * e + img_dim * e + r * e
  # Bidirectional GRU: input and recurrent projections of 3 gates, 2 directions.
  caption = 2 * length * (word_dim + e) * 3 * e + length * e * e + e * e + length * e
  return 2.0 * image, 2.0 * caption


# ---- timing -----------------------------------------------------------------


def _median_time(run, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_kind() -> str:
  return f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"


def make_model(head, dtype, dims, **overrides) -> SGRAF:
  fields = {k: v for k, v in dims.items() if k != "num_regions"}
  sizes = execution.resolve().model_kwargs() | overrides
  return SGRAF(head=head, dtype=DTYPES[dtype], **fields, **sizes)


def _fixed_lengths(rng, n, caption_len):
  """Lengths in [L/2, L], one of them L (so the padded length is L)."""
  lengths = rng.integers(caption_len // 2, caption_len + 1, size=n)
  lengths[0] = caption_len
  return lengths


def _random_batch(rng, batch, caption_len, dims, lengths=None):
  """A batch with `lengths` (default `_fixed_lengths`), padded to `caption_len`."""
  if lengths is None:
    lengths = _fixed_lengths(rng, batch, caption_len)
  tokens = rng.integers(4, dims["vocab_size"], size=(batch, caption_len))
  tokens = np.where(np.arange(caption_len)[None] < lengths[:, None], tokens, 0)
  images = rng.normal(size=(batch, dims["num_regions"], dims["img_dim"]))
  return {
    "images": images.astype(np.float32),
    "tokens": tokens.astype(np.int32),
    "lengths": lengths.astype(np.int32),
    "truly_clean": np.ones(batch, bool),
  }


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
  model = make_model(head, dtype, dims, **model_kw)
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
    model, tx, step.loss_options(config.loss), mesh, warmup=False, external_selection=False
  )
  data = sharding.global_batch(
    _random_batch(rng, batch, caption_len, dims, lengths), mesh
  )
  start = time.perf_counter()
  compiled = train_step.lower(state, data).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], data)
    jax.block_until_ready(metrics)

  warmup_s, _ = _median_time(run, 1)
  median_s, times = _median_time(run, steps)
  pairs = batch * batch
  image_flops, caption_flops = encoder_flops(caption_len=caption_len, **dims)
  flops = 3 * (
    pairs * pair_flops(head, caption_len=caption_len, **_head_dims(dims))
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
    **_lengths_record(caption_lengths, lengths),
    **_common(head, dtype, model),
    **({"hlo": compiled.as_text()} if hlo else {}),
  }


def _lengths_record(path, lengths) -> dict:
  if lengths is None:
    return {}
  return {
    "caption_lengths": {
      "file": path,
      "mean": float(np.mean(lengths)),
      "max": int(np.max(lengths)),
    }
  }


def _head_dims(dims):
  keys = ("num_regions", "embed_dim", "sim_dim", "sgr_steps")
  return {k: dims[k] for k in keys}


def _common(head, dtype, model) -> dict:
  return {
    "head": head,
    "dtype": dtype,
    "img_chunk": model.img_chunk,
    "cap_chunk": model.cap_chunk,
    "remat": model.remat,
    "length_group": model.length_group,
    "device_kind": _device_kind(),
    "jax": jax.__version__,
    "peak_rss_mb": _peak_rss_mb(),
  }


def _random_embeddings(rng, n_img, n_cap, caption_len, dims, lengths=None):
  e = dims["embed_dim"]

  def unit(*shape):
    # float32 straight away: a COCO-sized float64 draw would double the peak.
    x = rng.standard_normal(size=shape, dtype=np.float32)
    x /= np.sqrt(np.einsum("...e,...e->...", x, x))[..., None]  # no full temporaries
    return x

  if lengths is None:
    lengths = rng.integers(caption_len // 2, caption_len + 1, size=n_cap)
  mask = np.arange(caption_len)[None] < lengths[:, None]
  img = ImageEmbedding(unit(n_img, dims["num_regions"], e), unit(n_img, e))
  words = unit(n_cap, caption_len, e)
  words *= mask[..., None]  # in place: no second copy of a COCO-sized array
  cap = CaptionEmbedding(words, unit(n_cap, e), mask)
  return img, cap


class _EnoughTiles(Exception):
  """Raised from the progress callback to stop after `max_tiles` tiles."""


def bench_eval(
  *,
  head="sgr",
  n_img=100,
  n_cap=500,
  caption_len=15,
  dtype="float32",
  steps=3,
  dims=None,
  img_tile=128,
  cap_tile=256,
  max_tiles=0,
  caption_lengths=None,
  static=False,
  resident=False,
  **model_kw,
) -> dict:
  """Times `tiling.score_all` over jitted `SGRAF.score` on random embeddings,
  or with `resident` the product's evaluation (`retrieval.score_embedded`:
  embeddings on the devices, one call per image block over every caption tile).

  Caption tiles are padded as evaluation pads them (`padding.bucket_lengths`
  below the static length), or all to the static length with `static` (as
  with `data.caption_len` > 0). `caption_lengths` (a histogram file) draws
  the lengths from it; its longest is the static length. `max_tiles` > 0
  stops each pass after that many tiles, so the memory of a large evaluation
  (all embeddings on the host) can be measured in minutes (host tiles only).
  """
  if resident and max_tiles:
    raise UserError("--max_tiles stops host tiles; it does not apply to --resident")
  dims = dims or PAPER_DIMS
  model = make_model(head, dtype, dims, **model_kw)
  rng = np.random.default_rng(0)
  lengths = None
  if caption_lengths:
    histogram = padding.read_histogram(caption_lengths)
    caption_len = int(histogram[0].max())
    lengths = padding.draw_lengths(histogram, n_cap, rng)
  small = _random_batch(rng, 2, caption_len, dims)
  variables = jax.jit(
    lambda key: model.init(
      key, small["images"], small["tokens"], small["lengths"], train=False
    )
  )(jax.random.PRNGKey(0))
  img, cap = _random_embeddings(rng, n_img, n_cap, caption_len, dims, lengths)
  score = jax.jit(lambda v, i, c: model.apply(v, i, c, train=False, method=SGRAF.score))
  img_tile, cap_tile = min(img_tile, n_img), min(cap_tile, n_cap)
  buckets = None if static else padding.bucket_lengths(caption_len)
  cap_lengths = cap.mask.sum(axis=1)
  if buckets is None:
    tile_lengths = [caption_len] * -(-n_cap // cap_tile)
  else:
    tile_lengths = [n for _, n in tiling.caption_tiles(cap_lengths, cap_tile, buckets)]

  if resident:
    run, compile_s = _resident_pass(
      model, variables, img, cap, cap_lengths, img_tile, cap_tile, buckets, caption_len
    )
  else:
    run, compile_s = _host_pass(
      score, variables, img, cap, cap_lengths, img_tile, cap_tile, buckets,
      tile_lengths, max_tiles,
    )  # fmt: skip

  warmup_s, _ = _median_time(run, 1)
  median_s, times = _median_time(run, steps)
  per_tile_flops = [
    pair_flops(head, caption_len=n, **_head_dims(dims)) for n in tile_lengths
  ]
  columns = [min(cap_tile, n_cap - j) for j in range(0, n_cap, cap_tile)]
  row_blocks = -(-n_img // img_tile)
  visited = [(rows, k) for rows in range(row_blocks) for k in range(len(columns))]
  if max_tiles:
    visited = visited[:max_tiles]
  rows_of = lambda b: min(img_tile, n_img - b * img_tile)
  pairs = sum(rows_of(b) * columns[k] for b, k in visited)
  flops = sum(rows_of(b) * columns[k] * per_tile_flops[k] for b, k in visited)
  return {
    "bench": "eval",
    "pairs_per_s": pairs / median_s,
    "flops_per_s": flops / median_s,
    "pass_s": median_s,
    "times_s": times,
    "compile_s": compile_s,
    "warmup_s": warmup_s,
    "pairs_timed": pairs,
    "compiled_lengths": sorted(set(tile_lengths)),
    "resident": resident,
    "shapes": {
      "n_img": n_img,
      "n_cap": n_cap,
      "img_tile": img_tile,
      "cap_tile": cap_tile,
      "caption_len": caption_len,
      **dims,
    },
    **_lengths_record(caption_lengths, lengths),
    **_common(head, dtype, model),
  }


def _host_pass(
  score, variables, img, cap, cap_lengths, img_tile, cap_tile, buckets,
  tile_lengths, max_tiles,
):  # fmt: skip
  """(run, compile seconds): `tiling.score_all` over host tiles."""

  def tile_shape(embedding, rows):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((rows,) + x.shape[1:], x.dtype), embedding
    )

  start = time.perf_counter()
  compiled = {
    length: score.lower(
      variables, tile_shape(img, img_tile), _cap_tile_shape(cap, cap_tile, length)
    ).compile()
    for length in sorted(set(tile_lengths))
  }
  compile_s = time.perf_counter() - start

  def stop_after(done, total):
    if max_tiles and done >= max_tiles:
      raise _EnoughTiles

  def run():
    try:
      tiling.score_all(
        lambda i, c: compiled[c.words.shape[1]](variables, i, c),
        img,
        cap,
        img_tile=img_tile,
        cap_tile=cap_tile,
        progress=stop_after,
        cap_lengths=cap_lengths,
        buckets=buckets,
      )
    except _EnoughTiles:
      return  # the measured tiles are done; the rest of the matrix is skipped

  return run, compile_s


def _resident_pass(
  model, variables, img, cap, cap_lengths, img_tile, cap_tile, buckets, static_len
):
  """(run, seconds of the first call): `retrieval.score_embedded` on device
  embeddings; the first call compiles, so it holds one pass as well."""
  from srem_jax import retrieval

  mesh = Mesh(np.asarray(jax.devices()[:1]), (sharding.DATA_AXIS,))
  emb = retrieval.lay_out(
    [jax.device_put(img)],
    [jax.device_put(cap)],
    img[0].shape[0],
    cap_lengths,
    np.zeros(cap[0].shape[0], np.int32),
    mesh=mesh,
    img_tile=img_tile,
    cap_tile=cap_tile,
    buckets=buckets or (static_len,),
  )
  # jit compiles on the first call: its time is compilation plus one pass.
  start = time.perf_counter()
  retrieval.score_embedded(model, variables, emb, mesh)
  compile_s = time.perf_counter() - start
  return lambda: retrieval.score_embedded(model, variables, emb, mesh), compile_s


def _cap_tile_shape(cap, rows, length):
  """Shapes of a caption tile of `rows` captions and `length` word positions."""
  return CaptionEmbedding(
    jax.ShapeDtypeStruct((rows, length) + cap.words.shape[2:], cap.words.dtype),
    jax.ShapeDtypeStruct((rows,) + cap.glob.shape[1:], cap.glob.dtype),
    jax.ShapeDtypeStruct((rows, length), cap.mask.dtype),
  )


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
  from srem_jax.data import pipeline, prepare, synthetic

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
    split = pipeline.load_prepared(prepared, "bench_precomp", "train")
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
      median_s, times = _median_time(lambda: next(batches), steps)
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
    "device_kind": _device_kind(),
    "peak_rss_mb": _peak_rss_mb(),
  }


# ---- command line -----------------------------------------------------------

TINY_DIMS = dict(
  img_dim=16,
  num_regions=4,
  embed_dim=16,
  word_dim=8,
  sim_dim=8,
  vocab_size=40,
  sgr_steps=3,
)
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
    from srem_jax import accelerator_checks  # imports this module

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
