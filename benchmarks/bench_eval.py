"""The all-pairs scoring benchmark of `python benchmarks/bench.py eval`: host
tiles over jitted `SGRAF.score` (`tiling.score_all`), or with `resident` the
product's device-resident evaluation (`retrieval.score_embedded`).

    result = bench_eval(n_img=100, n_cap=500, steps=3)  # pairs/s, FLOP/s, ...
"""

import time

import jax
import measure
import numpy as np
from jax.sharding import Mesh

from srem_jax import padding, sharding
from srem_jax.errors import UserError
from srem_jax.models import tiling
from srem_jax.models.dims import PAPER_DIMS
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding


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
  model = measure.make_model(head, dtype, dims, **model_kw)
  rng = np.random.default_rng(0)
  lengths = None
  if caption_lengths:
    histogram = padding.read_histogram(caption_lengths)
    caption_len = int(histogram[0].max())
    lengths = padding.draw_lengths(histogram, n_cap, rng)
  small = measure.random_batch(rng, 2, caption_len, dims)
  variables = jax.jit(
    lambda key: model.init(
      key, small["images"], small["tokens"], small["lengths"], train=False
    )
  )(jax.random.PRNGKey(0))
  img, cap = measure.random_embeddings(rng, n_img, n_cap, caption_len, dims, lengths)
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

  warmup_s, _ = measure.median_time(run, 1)
  median_s, times = measure.median_time(run, steps)
  per_tile_flops = [
    measure.pair_flops(head, caption_len=n, **measure.head_dims(dims))
    for n in tile_lengths
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
    **measure.lengths_record(caption_lengths, lengths),
    **measure.common(head, dtype, model),
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
  from srem_jax.eval import retrieval

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
