"""One accelerator run: our SGR step, scoring and agreement against the H200 targets.

On a machine with one NVIDIA GPU, within 8 minutes (no part starts after
`--budget_s`, default 450 s), measures with the sizes
`srem_jax.execution.resolve()` picks for it (preset "auto" -> gpu) and paper
dimensions (36 x 2048 regions, E 1024, words 300, sim 256, SGR, 3 steps):

- the training step (`srem_jax.train.step.make_train_step`: SREM loss, clipping,
  Adam) at batch 128, float32 and bfloat16, and float32 under matmul precision
  "default" (TF32), via `bench_train_step` of benchmarks/bench.py;
- the Flickr30K-sized 1,000 x 5,000 test matrix: the tiled all-pairs scoring
  (`tiling.score_all`, from host embeddings to host scores, via
  `bench_eval.bench_eval`), and apart from it the encoders over 1,000 images and
  5,000 captions (host to device and back), summed as "end to end";
- the COCO 5K 5,000 x 25,000 matrix: the first row of tiles (or the first
  `--coco_tiles` tiles) timed and extrapolated to the whole matrix by the tile
  count (labelled so);
- the prediction of each figure above (`accelerator_prediction.py`, from
  `srem_jax.predict`): the same programs' matmul FLOPs over the
  device's peak rate, a compute-bound lower bound beside each measurement;
- peak device memory: `memory_stats()` after each part (the allocator's peak
  so far: it cannot be reset between parts; None on the CPU);
- `benchmarks/torch_reference.py` on the same GPU (`--device=cuda`, in its
  own process, before JAX takes its share of the GPU memory): training step
  and the pair loop, for the speed-up ratios;
- our scores against the reference's on the same random images and captions
  (the reference model saved as an NCR checkpoint and imported with
  `load_torch_checkpoint`): the reference in float32 on the GPU with TF32 off,
  ours at matmul precision "highest" (the default) and "default" (TF32), and
  bfloat16; max |ours - ref| / |ref|, and both against the reference in
  float64 on the CPU.

Every part is guarded: a failure (an OOM, say) is recorded in the JSON with
its error and the remaining parts still run; a part that would start after
`--budget_s` is recorded as skipped. `results.json` and `results.md` in
`--out_dir` are rewritten after every part, so a run cut short keeps what it
measured. The Markdown table is printed at the end.

Preparing the run. The machine needs no `pip install -e .` (this script puts
the repository root on sys.path), but `bench_train_step` reads the default
config, which imports ml_collections (pure Python; absl-py and PyYAML are its
only dependencies). Where PyPI can be reached, from the repository root:

    pip download ml_collections==1.1.0 --no-deps -d build/wheels

then on the GPU machine, from the repository root (build/wheels travels with it):

    pip install --no-deps build/wheels/*.whl
    python benchmarks/accelerator.py --out_dir=accelerator_results

A CPU check of every part at tiny sizes (tiny dims, batch 8, a 16 x 40
matrix; about 75 s of CPU time, most of it compiling the three train steps):

    python benchmarks/accelerator.py --smoke --out_dir=/tmp/accel_smoke
"""

import argparse
import dataclasses
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # run from a source tree, nothing installed

import bench  # noqa: E402
import bench_eval  # noqa: E402
import jax  # noqa: E402
import measure  # noqa: E402
import numpy as np  # noqa: E402
from accelerator_prediction import part_prediction  # noqa: E402
from accelerator_reference import part_agreement, part_reference, reference_device  # noqa: E402
from accelerator_report import TARGETS, write  # noqa: E402

from srem_jax import execution  # noqa: E402
from srem_jax.models.dims import PAPER_DIMS, TINY_DIMS  # noqa: E402
from srem_jax.models.sgraf import SGRAF  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
  dims: dict
  batch: int
  caption_len: int
  f30k: tuple[int, int]
  coco: tuple[int, int]
  coco_tiles: int
  ref_eval: tuple[int, int]
  agree: tuple[int, int]
  tiles: tuple[int, int] | None  # None = the execution plan's
  encoder_chunk: int
  train_steps: int
  eval_steps: int


def _sizes(args) -> Sizes:
  if args.smoke:
    return Sizes(
      dims=TINY_DIMS,
      batch=8,
      caption_len=6,
      f30k=(16, 40),
      coco=(40, 200),
      coco_tiles=0,
      ref_eval=(16, 40),
      agree=(6, 8),
      tiles=(8, 16),
      encoder_chunk=16,
      train_steps=2,
      eval_steps=2,
    )
  return Sizes(
    dims=PAPER_DIMS,
    batch=args.batch,
    caption_len=args.caption_len,
    f30k=(1000, 5000),
    coco=(5000, 25000),
    coco_tiles=args.coco_tiles,
    ref_eval=(args.ref_n_img, args.ref_n_cap),
    agree=(args.agree_n_img, args.agree_n_cap),
    tiles=None,
    encoder_chunk=1000,
    train_steps=args.steps,
    eval_steps=args.eval_steps,
  )


# ---- device facts -------------------------------------------------------------


def device_memory() -> dict | None:
  """The first device's allocator figures (bytes), or None where it reports none."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  if not stats:
    return None
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(stats[k]) for k in keys if k in stats}


def _git_commit() -> str | None:
  try:
    done = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
    )
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() or None


# ---- our parts ------------------------------------------------------------------


def part_train_step(sizes, model_kw, dtype, precision=None):
  kw = dict(model_kw, **({"precision": precision} if precision else {}))
  result = bench.bench_train_step(
    head="sgr",
    batch=sizes.batch,
    caption_len=sizes.caption_len,
    dtype=dtype,
    steps=sizes.train_steps,
    dims=sizes.dims,
    **kw,
  )
  result["precision"] = kw["precision"]
  return result


def part_scoring(sizes, model_kw, tiles, shape, max_tiles=None):
  """All tiles (`max_tiles` None), the first `max_tiles`, or with 0 the first
  row of tiles: every caption tile against the first image tile."""
  n_img, n_cap = shape
  if max_tiles == 0:
    max_tiles = -(-n_cap // min(tiles[1], n_cap))
  result = bench_eval.bench_eval(
    head="sgr",
    n_img=n_img,
    n_cap=n_cap,
    caption_len=sizes.caption_len,
    dtype="float32",
    steps=1 if max_tiles else sizes.eval_steps,
    dims=sizes.dims,
    img_tile=tiles[0],
    cap_tile=tiles[1],
    max_tiles=max_tiles or 0,
    **model_kw,
  )
  result["precision"] = model_kw["precision"]
  result["encoders"] = "excluded: scoring of random unit-norm embeddings"
  shapes = result["shapes"]
  total = -(-n_img // shapes["img_tile"]) * -(-n_cap // shapes["cap_tile"])
  result["total_tiles"] = total
  if max_tiles and max_tiles < total:
    # Every tile costs the same (edge tiles are padded to full size), so the
    # whole matrix takes the timed pass's time per tile times the tile count.
    result["extrapolated"] = True
    result["tiles_timed"] = max_tiles
    result["full_matrix_s"] = result["pass_s"] * total / max_tiles
  else:
    result["extrapolated"] = False
    result["tiles_timed"] = total
    result["full_matrix_s"] = result["pass_s"]
  return result


def part_encoders(sizes, model_kw):
  """Encoders over the F30K-sized set: host inputs to host embeddings, in chunks."""
  dims, length = sizes.dims, sizes.caption_len
  n_img, n_cap = sizes.f30k
  model = measure.make_model("sgr", "float32", dims, **model_kw)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((n_img, dims["num_regions"], dims["img_dim"]))
  images = images.astype(np.float32)
  lengths = rng.integers(length // 2, length + 1, size=n_cap).astype(np.int32)
  lengths[0] = length
  tokens = rng.integers(4, dims["vocab_size"], size=(n_cap, length)).astype(np.int32)
  tokens[np.arange(length)[None] >= lengths[:, None]] = 0
  variables = jax.jit(
    lambda key: model.init(key, images[:2], tokens[:2], lengths[:2], train=False)
  )(jax.random.PRNGKey(0))
  encode_images = jax.jit(
    lambda v, x: model.apply(v, x, train=False, method=SGRAF.encode_images)
  )
  encode_captions = jax.jit(
    lambda v, t, n: model.apply(v, t, n, train=False, method=SGRAF.encode_captions)
  )
  img_chunk, cap_chunk = (
    min(sizes.encoder_chunk, n_img),
    min(sizes.encoder_chunk, n_cap),
  )

  def run():
    out = [
      encode_images(variables, images[i : i + img_chunk])
      for i in range(0, n_img, img_chunk)
    ]
    out += [
      encode_captions(variables, tokens[j : j + cap_chunk], lengths[j : j + cap_chunk])
      for j in range(0, n_cap, cap_chunk)
    ]
    return jax.device_get(out)  # scoring starts from host embeddings

  start = time.perf_counter()
  run()
  first_s = time.perf_counter() - start
  median_s, times = measure.median_time(run, sizes.eval_steps)
  return {
    "bench": "encoders",
    "pass_s": median_s,
    "times_s": times,
    "first_pass_s": first_s,  # includes compilation
    "shapes": {
      "n_img": n_img,
      "n_cap": n_cap,
      "caption_len": length,
      "chunk": [img_chunk, cap_chunk],
      **dims,
    },
    "precision": model_kw["precision"],
  }


# ---- the run ------------------------------------------------------------------------

PARTS = (
  "reference_train_step",
  "reference_scoring",
  "prediction",
  "train_step_float32",
  "train_step_bfloat16",
  "f30k_scoring",
  "f30k_encoders",
  "coco_scoring",
  "agreement",
  "train_step_float32_tf32",
)
JAX_PARTS = {p for p in PARTS if not p.startswith("reference")}


def _part_functions(sizes, plan, tiles, ref_device, smoke, deadline):
  model_kw = plan.model_kwargs() if plan else {}
  remaining = lambda: max(30.0, deadline - time.perf_counter())
  return {
    "reference_train_step": lambda: part_reference(
      "train_step", sizes, ref_device, remaining(), smoke
    ),
    "reference_scoring": lambda: part_reference(
      "eval", sizes, ref_device, remaining(), smoke
    ),
    "prediction": lambda: part_prediction(sizes, plan, tiles),
    "train_step_float32": lambda: part_train_step(sizes, model_kw, "float32"),
    "train_step_bfloat16": lambda: part_train_step(sizes, model_kw, "bfloat16"),
    "f30k_scoring": lambda: part_scoring(sizes, model_kw, tiles, sizes.f30k),
    "f30k_encoders": lambda: part_encoders(sizes, model_kw),
    "coco_scoring": lambda: part_scoring(
      sizes, model_kw, tiles, sizes.coco, sizes.coco_tiles
    ),
    "agreement": lambda: part_agreement(sizes, model_kw, ref_device),
    "train_step_float32_tf32": lambda: part_train_step(
      sizes, model_kw, "float32", precision="default"
    ),
  }


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default="accelerator_results")
  parser.add_argument("--smoke", action="store_true", help="Tiny sizes on the CPU.")
  parser.add_argument("--caption_len", type=int, default=40,
                      help="Padded caption length (about a real F30K batch's longest).")  # fmt: skip
  parser.add_argument("--batch", type=int, default=128, help="Training batch.")
  parser.add_argument("--steps", type=int, default=5, help="Timed train steps.")
  parser.add_argument("--eval_steps", type=int, default=3, help="Timed F30K passes.")
  parser.add_argument("--coco_tiles", type=int, default=0,
                      help="COCO tiles timed (0 = the first row of tiles: every "
                      "caption tile against the first image tile).")  # fmt: skip
  parser.add_argument("--ref_n_img", type=int, default=200,
                      help="Reference scoring: images (its rate per pair does not "
                      "depend on the matrix size: 100 x 100 shards).")  # fmt: skip
  parser.add_argument("--ref_n_cap", type=int, default=1000)
  parser.add_argument("--agree_n_img", type=int, default=16)
  parser.add_argument("--agree_n_cap", type=int, default=32)
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"Comma-separated subset of {', '.join(PARTS)}.")  # fmt: skip
  parser.add_argument("--budget_s", type=float, default=450.0,
                      help="Parts that would start later than this are skipped.")  # fmt: skip
  args = parser.parse_args(argv)
  if args.coco_tiles < 0:
    parser.error(f"--coco_tiles: expected 0 or more, got {args.coco_tiles}")
  for name in "caption_len batch steps eval_steps ref_n_img ref_n_cap " \
              "agree_n_img agree_n_cap".split():  # fmt: skip
    if getattr(args, name) < 1:
      parser.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
  unknown = set(args.parts.split(",")) - set(PARTS)
  if unknown:
    parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {PARTS}")
  return args


def main(argv=None) -> dict:
  args = _parse(argv)
  start = time.perf_counter()
  if args.smoke:
    try:
      jax.config.update("jax_platforms", "cpu")  # no effect once a backend is up
    except Exception:  # noqa: BLE001 - then the smoke run uses that backend
      pass
  sizes = _sizes(args)
  selected = [p for p in PARTS if p in args.parts.split(",")]
  ref_device = reference_device(args.smoke)
  out_dir = Path(args.out_dir)
  try:
    import torch

    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  results = {
    "meta": {
      "argv": sys.argv[1:] if argv is None else list(argv),
      "smoke": args.smoke,
      "python": platform.python_version(),
      "jax": jax.__version__,
      "torch": torch_version,
      "git_commit": _git_commit(),
      "reference_device": ref_device,
      "sizes": dataclasses.asdict(sizes),
      "device_kind": "(not yet initialised)",
      "plan": "(not yet resolved)",
      "targets": {k: list(v) for k, v in TARGETS.items()},
    },
    "parts": {},
  }
  deadline = start + args.budget_s
  # The plan is resolved (and JAX's backend started) at the first JAX part, so
  # the reference parts before it have the whole GPU.
  plan_holder = {}

  def functions_for(name):
    if name in JAX_PARTS and "plan" not in plan_holder:
      plan = execution.resolve(None)
      plan_holder["plan"] = plan
      results["meta"]["plan"] = plan.reason
      results["meta"]["device_kind"] = measure.device_kind()
      results["meta"]["devices"] = [str(d) for d in jax.devices()]
    plan = plan_holder.get("plan")
    tiles = sizes.tiles or ((plan.img_tile, plan.cap_tile) if plan else None)
    return _part_functions(sizes, plan, tiles, ref_device, args.smoke, deadline)

  for name in selected:
    if time.perf_counter() > deadline:
      results["parts"][name] = {"status": "skipped", "error": "past --budget_s"}
      continue
    print(f"[accelerator] {name} ...", flush=True)
    part_start = time.perf_counter()
    try:
      result = functions_for(name)[name]()
      entry = {"status": "ok", "result": result}
    except Exception as error:  # recorded; the other parts still run
      entry = {
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "traceback": traceback.format_exc()[-4000:],
      }
    entry["wall_s"] = time.perf_counter() - part_start
    if name in JAX_PARTS:
      entry["memory"] = device_memory()
    results["parts"][name] = entry
    print(f"[accelerator] {name}: {entry['status']} ({entry['wall_s']:.1f} s)"
          + (f" {entry['error'][:200]}" if entry["status"] != "ok" else ""),
          flush=True)  # fmt: skip
    results["meta"]["wall_s"] = time.perf_counter() - start
    write(results, out_dir)
  results["meta"]["wall_s"] = time.perf_counter() - start
  table = write(results, out_dir)
  print(table)
  print(f"[accelerator] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
  return results


if __name__ == "__main__":
  main()
