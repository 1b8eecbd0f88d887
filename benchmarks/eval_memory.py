"""Device and host memory of a COCO 5K evaluation (5,000 x 25,000) at paper dims.

Nothing of that size is run: the block scorer of `srem_jax.eval.retrieval` is
lowered and compiled for the abstract shapes (no FLOPs, no buffers) and its
`memory_analysis()` gives the bytes of its arguments (the resident
embeddings), output (one image block's row of the matrix) and temporaries.
Caption lengths are drawn from a histogram file (`--caption_lengths`, the
Flickr30K test split as a stand-in for COCO's) and laid out in tiles as
evaluation lays them out. The host figure is the matrix itself plus the
ranking's blocks; `--rank` measures that one for real (peak RSS of ranking a
random matrix of the full size with the COCO protocol).

    python benchmarks/eval_memory.py \
        --caption_lengths=../shared/data/f30k_caption_lengths.json [--preset=gpu] [--rank]
"""

import argparse
import json
import os
import resource
import sys

sys.path.insert(0, os.getcwd())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import measure  # noqa: E402
import numpy as np  # noqa: E402

from srem_jax import execution, padding, sharding  # noqa: E402
from srem_jax.eval import retrieval
from srem_jax.models import tiling  # noqa: E402
from srem_jax.models.dims import PAPER_DIMS  # noqa: E402
from srem_jax.models.sgraf import CaptionEmbedding, ImageEmbedding  # noqa: E402

GIB = 2**30


def _spec(shape, dtype=jnp.float32, where=None):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=where)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--caption_lengths", required=True)
  parser.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "tpu"])
  parser.add_argument("--n_img", type=int, default=5000)
  parser.add_argument("--rank", action="store_true")
  args = parser.parse_args()
  n_img, n_cap = args.n_img, 5 * args.n_img
  dims = PAPER_DIMS
  e, r = dims["embed_dim"], dims["num_regions"]
  plan = execution.resolve({"preset": args.preset})
  histogram = padding.read_histogram(args.caption_lengths)
  static = int(histogram[0].max())
  lengths = padding.draw_lengths(histogram, n_cap, np.random.default_rng(0))
  buckets = padding.bucket_lengths(static)
  cap_tile = min(plan.cap_tile, n_cap)
  img_tile = min(plan.img_tile, n_img)
  blocks = -(-n_img // img_tile)
  tiles = tiling.caption_tiles(lengths, cap_tile, buckets)
  per_bucket = {}
  for _, length in tiles:
    per_bucket[length] = per_bucket.get(length, 0) + 1

  model = measure.make_model("sgr", "float32", dims, **plan.model_kwargs())
  mesh = sharding.make_mesh(-1)
  small = measure.random_batch(np.random.default_rng(0), 2, static, dims)
  variables = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      small["images"],
      small["tokens"],
      small["lengths"],
      train=False,
    )
  )
  images = ImageEmbedding(_spec((blocks, img_tile, r, e)), _spec((blocks, img_tile, e)))
  caps = tuple(
    CaptionEmbedding(
      _spec((t, cap_tile, n, e)), _spec((t, cap_tile, e)), _spec((t, cap_tile, n), bool)
    )
    for n, t in per_bucket.items()
  )
  score_block = retrieval.eval_functions(model, mesh).score_block
  compiled = score_block.lower(
    variables, images, _spec((), jnp.int32), caps, _spec((n_cap,), jnp.int32)
  ).compile()
  memory = compiled.memory_analysis()
  nbytes = lambda tree: sum(  # noqa: E731
    int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
  )
  out = {
    "preset": args.preset,
    "shape": [n_img, n_cap],
    "img_tile": img_tile,
    "cap_tile": cap_tile,
    "tiles_per_bucket": {str(k): v for k, v in per_bucket.items()},
    "image_embeddings_gib": nbytes(images) / GIB,
    "caption_tiles_gib": nbytes(caps) / GIB,
    "params_gib": nbytes(variables) / GIB,
    "compiled_argument_gib": memory.argument_size_in_bytes / GIB,
    "compiled_output_gib": memory.output_size_in_bytes / GIB,
    "compiled_temp_gib": memory.temp_size_in_bytes / GIB,
    # Before the tiles are laid out, the encoder outputs of every caption sit
    # at the static length: the transient peak of the embedding phase.
    "captions_at_static_length_gib": n_cap * static * (e * 4 + 1) / GIB,
    "host_matrix_gib": n_img * n_cap * 4 / GIB,
  }
  # Steady state while scoring: embeddings + two blocks' rows in flight + temps.
  out["device_peak_scoring_gib"] = (
    out["compiled_argument_gib"]
    + 2 * out["compiled_output_gib"]
    + out["compiled_temp_gib"]
  )
  if args.rank:
    from srem_jax.eval import metrics

    sims = np.random.default_rng(0).standard_normal((n_img, n_cap), np.float32)
    metrics.coco_protocol(sims, np.repeat(np.arange(n_img), 5))
    out["host_peak_rss_rank_gib"] = (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
