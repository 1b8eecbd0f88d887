"""What the benchmark programs share: analytic FLOP counts, timing, the
process's peak memory, models at given dimensions and random inputs.

    flops = pair_flops("sgr", num_regions=36, caption_len=15, embed_dim=1024,
                       sim_dim=256, sgr_steps=3)
    seconds, times = median_time(run, repeats=3)
"""

import resource
import statistics
import time

import jax
import numpy as np

from srem_jax import execution
from srem_jax.models import dims as dims_lib
from srem_jax.models.sgraf import SGRAF, CaptionEmbedding, ImageEmbedding

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


def median_time(run, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_kind() -> str:
  return f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"


def make_model(head, dtype, dims, **overrides) -> SGRAF:
  """SGRAF at `dims` with the execution sizes `execution.resolve()` picks for
  this machine; `overrides` replace some of them."""
  sizes = execution.resolve().model_kwargs() | overrides
  return dims_lib.make_model(head, dtype, dims, **sizes)


def fixed_lengths(rng, n, caption_len):
  """Lengths in [L/2, L], one of them L (so the padded length is L)."""
  lengths = rng.integers(caption_len // 2, caption_len + 1, size=n)
  lengths[0] = caption_len
  return lengths


def random_batch(rng, batch, caption_len, dims, lengths=None):
  """A batch with `lengths` (default `fixed_lengths`), padded to `caption_len`."""
  if lengths is None:
    lengths = fixed_lengths(rng, batch, caption_len)
  tokens = rng.integers(4, dims["vocab_size"], size=(batch, caption_len))
  tokens = np.where(np.arange(caption_len)[None] < lengths[:, None], tokens, 0)
  images = rng.normal(size=(batch, dims["num_regions"], dims["img_dim"]))
  return {
    "images": images.astype(np.float32),
    "tokens": tokens.astype(np.int32),
    "lengths": lengths.astype(np.int32),
    "truly_clean": np.ones(batch, bool),
  }


def lengths_record(path, lengths) -> dict:
  if lengths is None:
    return {}
  return {
    "caption_lengths": {
      "file": path,
      "mean": float(np.mean(lengths)),
      "max": int(np.max(lengths)),
    }
  }


def head_dims(dims):
  keys = ("num_regions", "embed_dim", "sim_dim", "sgr_steps")
  return {k: dims[k] for k in keys}


def common(head, dtype, model) -> dict:
  return {
    "head": head,
    "dtype": dtype,
    "img_chunk": model.img_chunk,
    "cap_chunk": model.cap_chunk,
    "remat": model.remat,
    "length_group": model.length_group,
    "device_kind": device_kind(),
    "jax": jax.__version__,
    "peak_rss_mb": peak_rss_mb(),
  }


def random_embeddings(rng, n_img, n_cap, caption_len, dims, lengths=None):
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
