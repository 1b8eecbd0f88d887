"""What a benchmarks/accelerator.py run should take at least, before it measures.

`srem_jax.predict` at the sizes the other parts time: matmul FLOPs of
the same programs (traced, not compiled) and, where `predict.target_for`
knows the device, seconds at its peak matmul rate for each part's dtype and
precision: compute-bound lower bounds, printed beside each measured figure so
that a lent GPU tests the model (accelerator_report.py).
"""

import jax
import measure
import numpy as np

from configs import base
from srem_jax import aot, predict
from srem_jax.compile.caption_lengths import sorted_lengths
from srem_jax.compile.shapes import DataShapes


def _config(sizes):
  config = base.get_config()  # bench_train_step's objective and defaults
  for key in ("img_dim", "embed_dim", "word_dim", "sim_dim", "sgr_steps"):
    config.model[key] = sizes.dims[key]
  config.train.batch_size = sizes.batch
  config.eval.batch_size = sizes.encoder_chunk
  return config


def part_prediction(sizes, plan, tiles) -> dict:
  """Per timed part: FLOPs, and seconds at the device's peak (None where no
  peak is known: the CPU of a smoke run)."""
  device = jax.devices()[0]
  target = predict.target_for(device.device_kind)
  dims, length = sizes.dims, sizes.caption_len
  shapes = DataShapes(
    dims["num_regions"], dims["img_dim"], length, dims["vocab_size"], 0, ""
  )
  plan = plan._replace(img_tile=tiles[0], cap_tile=tiles[1])
  model = predict.Predictor(_config(sizes), aot.target_mesh([device]), plan, shapes)
  # bench_train_step's batch: measure.fixed_lengths, its first draw from seed 0.
  lengths = measure.fixed_lengths(np.random.default_rng(0), sizes.batch, length)
  step = model.batch_flops(lengths)
  # bench_eval and part_encoders draw lengths uniformly in [L/2, L].
  uniform = (np.arange(length // 2, length + 1), np.ones(length - length // 2 + 1))
  matrix = lambda n_img, n_cap: model.matrix_flops(n_img, sorted_lengths(uniform, n_cap))
  f30k_scoring, f30k_encoders = matrix(*sizes.f30k)
  coco_scoring, _ = matrix(*sizes.coco)
  precision = plan.matmul_precision
  work = {
    "train_step_float32": (step, "float32", precision),
    "train_step_bfloat16": (step, "bfloat16", precision),
    "train_step_float32_tf32": (step, "float32", "default"),
    "f30k_scoring": (f30k_scoring, "float32", precision),
    "f30k_encoders": (f30k_encoders, "float32", precision),
    "f30k_end_to_end": (f30k_scoring + f30k_encoders, "float32", precision),
    "coco_scoring": (coco_scoring, "float32", precision),
  }
  figures = {}
  for name, (flops, dtype, at) in work.items():
    peak = target.peak(dtype, at) if target else None
    figures[name] = {
      "flops": flops,
      "dtype": dtype,
      "precision": at,
      "peak_flops": peak,
      "seconds": flops / peak if peak else None,
    }
  return {
    "device_kind": device.device_kind,
    "target": target.name if target else None,
    "figures": figures,
    "what": "compute-bound lower bounds: matmul FLOPs (every loop iteration) / "
    "the device's peak matmul rate at the part's dtype and precision",
  }
