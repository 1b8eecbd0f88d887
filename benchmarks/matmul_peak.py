"""What XLA's matmuls reach on this machine: the ceiling the SGRAF figures sit under.

Times one jitted float32-output matmul per shape and dtype (best of several
runs, after a warm-up) and prints GFLOP/s per row, then one JSON object.
The shapes are the head's local-node layer (pairs x words, E) x (E, S), a
large square product, and one image's context product over a caption tile
(words, R) x (R, E).

    python benchmarks/matmul_peak.py
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = [(15360, 1024, 256), (4096, 4096, 4096), (3840, 36, 1024)]


def best_seconds(fn, *args, repeats=5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main() -> None:
  rng = np.random.default_rng(0)
  product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  rows = []
  for dtype in ("float32", "bfloat16"):
    for m, k, n in SHAPES:
      a = jnp.asarray(rng.random((m, k)), dtype)
      b = jnp.asarray(rng.random((k, n)), dtype)
      gflops = 2 * m * k * n / best_seconds(product, a, b) / 1e9
      rows.append({"dtype": dtype, "m": m, "k": k, "n": n, "gflop_per_s": gflops})
      print(f"{dtype:8s} ({m} x {k}) x ({k} x {n}): {gflops:7.0f} GFLOP/s", flush=True)
  print(json.dumps({"matmul_peak": rows, "jax": jax.__version__}))


if __name__ == "__main__":
  main()
