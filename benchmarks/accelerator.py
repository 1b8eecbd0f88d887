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
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # run from a source tree, nothing installed

import bench  # noqa: E402
import bench_eval  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import measure  # noqa: E402
import numpy as np  # noqa: E402

from srem_jax import execution  # noqa: E402
from srem_jax.models.dims import PAPER_DIMS, TINY_DIMS  # noqa: E402
from srem_jax.models.sgraf import SGRAF  # noqa: E402
from srem_jax.models.torch_import import load_torch_checkpoint  # noqa: E402

REFERENCE_SCRIPT = ROOT / "benchmarks" / "torch_reference.py"

# The targets for one H200, each (comparison, bound).
TARGETS = {
  "train_step_ms": ("<=", 40.0),
  "f30k_s": ("<=", 3.0),
  "coco_s": ("<=", 30.0),
  "speedup": (">=", 10.0),
  "score_rel_err": ("<=", 1e-4),
}


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


# ---- the reference ----------------------------------------------------------------


def _load_reference():
  # benchmarks/ is a folder of scripts, not a package: load the file itself.
  spec = importlib.util.spec_from_file_location("torch_reference", REFERENCE_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_device(smoke: bool) -> str:
  if smoke:
    return "cpu"
  try:
    import torch
  except ImportError:
    return "cpu"
  return "cuda" if torch.cuda.is_available() else "cpu"


def part_reference(mode, sizes, device, timeout_s, smoke):
  """`torch_reference.py` in its own process: it frees its GPU memory on exit,
  and JAX in it stays on the CPU (JAX_PLATFORMS=cpu), so it holds none."""
  command = [
    sys.executable,
    str(REFERENCE_SCRIPT),
    mode,
    "--head=sgr",
    f"--caption_len={sizes.caption_len}",
    f"--device={device}",
  ]
  if mode == "train_step":
    command += [f"--batch={sizes.batch}", f"--steps={sizes.train_steps}"]
  else:
    n_img, n_cap = sizes.ref_eval
    command += [f"--n_img={n_img}", f"--n_cap={n_cap}", f"--steps={sizes.eval_steps}"]
  if smoke:
    command += ["--tiny", "--threads=1"]
  paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
  env = dict(os.environ, PYTHONPATH=":".join(paths), JAX_PLATFORMS="cpu")
  done = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
  )
  if done.returncode:
    raise RuntimeError(
      f"{' '.join(command[1:])} exited {done.returncode}:\n{done.stderr[-3000:]}"
    )
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["command"] = " ".join(["python"] + command[1:])
  return result


def _reference_model(torch_reference, dims, seed=0):
  """The reference at its own init, with biases, BatchNorm affines and running
  statistics moved off their init values (weight matrices untouched, so the
  activations stay in the ranges a trained model sees): a misplaced bias or
  statistic then changes the scores."""
  import torch

  torch.manual_seed(seed)
  model = torch_reference.ReferenceSGRAF("sgr", **dims)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point() or tensor.ndim > 1:
        continue
      noise = torch.rand(tensor.shape, generator=gen)
      if name.endswith("running_var"):
        tensor.copy_(0.5 + noise)
      else:
        tensor.add_(0.2 * (noise - 0.5))
  return model.eval()


def _save_ncr_checkpoint(model, dims, path):
  """The three parts' state dicts and the `opt` NCR saves, as NCR saves them."""
  import torch

  opt = argparse.Namespace(
    module_name="SGR",
    img_dim=dims["img_dim"],
    embed_size=dims["embed_dim"],
    word_dim=dims["word_dim"],
    sim_dim=dims["sim_dim"],
    sgr_step=dims["sgr_steps"],
    num_layers=1,
    bi_gru=True,
    no_imgnorm=False,
    no_txtnorm=False,
  )
  parts = [model.img_enc, model.txt_enc, model.sim_enc]
  torch.save({"model": [p.float().state_dict() for p in parts], "opt": opt}, path)


def _max_rel(ours, ref) -> float:
  return float(np.max(np.abs(ours - ref) / np.abs(ref)))


def part_agreement(sizes, model_kw, device):
  """Our scores against the reference's on the same raw images and captions."""
  import torch

  torch_reference = _load_reference()
  dims, length = sizes.dims, sizes.caption_len
  n_img, n_cap = sizes.agree
  rng = np.random.default_rng(1)
  images = rng.standard_normal((n_img, dims["num_regions"], dims["img_dim"]))
  images = images.astype(np.float32)
  lengths = rng.integers(max(1, length // 2), length + 1, size=n_cap)
  lengths[0] = length
  tokens = rng.integers(4, dims["vocab_size"], size=(n_cap, length))
  tokens[np.arange(length)[None] >= lengths[:, None]] = 0

  model = _reference_model(torch_reference, dims)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "reference_sgr.pth.tar")
    _save_ncr_checkpoint(model, dims, path)
    [(overrides, variables)] = load_torch_checkpoint(path, "A")

  def reference(net, dtype, where):
    with torch.no_grad():
      sims = net.to(dtype=dtype, device=where)(
        torch.from_numpy(images).to(dtype=dtype, device=where),
        torch.from_numpy(tokens).to(where),
        torch.from_numpy(lengths),  # pack_padded_sequence wants host lengths
      )
    return sims.cpu().double().numpy()

  ref64 = reference(copy.deepcopy(model), torch.float64, "cpu")
  flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  try:
    ref32 = reference(model, torch.float32, device)
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

  ours = {}
  variants = {
    "float32_highest": dict(precision="highest"),
    "float32_default": dict(precision="default"),
    "bfloat16_highest": dict(precision="highest", dtype=jnp.bfloat16),
  }
  for name, change in variants.items():
    net = SGRAF(**overrides, **dict(model_kw, **change))
    score = jax.jit(lambda v, i, t, n, net=net: net.apply(v, i, t, n, train=False))
    ours[name] = np.asarray(score(variables, images, tokens, lengths), np.float64)
  errors = {f"{name}_vs_ref32": _max_rel(x, ref32) for name, x in ours.items()}
  errors |= {f"{name}_vs_ref64": _max_rel(x, ref64) for name, x in ours.items()}
  errors["ref32_vs_ref64"] = _max_rel(ref32, ref64)
  # An untrained model's scores sit close together; the error against their
  # spread says whether it could reorder a ranking.
  spread = float(ref32.max() - ref32.min())
  over_spread = {
    f"{name}_vs_ref32": float(np.max(np.abs(x - ref32))) / spread
    for name, x in ours.items()
  }
  return {
    "bench": "agreement",
    "max_rel_err": errors,
    "max_abs_err_over_spread": over_spread,
    "reference": f"float32 on {device}, TF32 off; float64 on cpu",
    "ours_device": measure.device_kind(),
    "ref_scores": {
      "min": float(ref32.min()),
      "max": float(ref32.max()),
      "std": float(ref32.std()),
      "spread": spread,
    },
    "shapes": {"n_img": n_img, "n_cap": n_cap, "caption_len": length, **dims},
    "model_kw": {k: v for k, v in model_kw.items() if k != "precision"},
  }


# ---- the run ------------------------------------------------------------------------

PARTS = (
  "reference_train_step",
  "reference_scoring",
  "train_step_float32",
  "train_step_bfloat16",
  "f30k_scoring",
  "f30k_encoders",
  "coco_scoring",
  "agreement",
  "train_step_float32_tf32",
)
JAX_PARTS = {p for p in PARTS if not p.startswith("reference")}


def _part_functions(sizes, model_kw, tiles, ref_device, smoke, deadline):
  remaining = lambda: max(30.0, deadline - time.perf_counter())
  return {
    "reference_train_step": lambda: part_reference(
      "train_step", sizes, ref_device, remaining(), smoke
    ),
    "reference_scoring": lambda: part_reference(
      "eval", sizes, ref_device, remaining(), smoke
    ),
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


def _ok(parts, name):
  part = parts.get(name) or {}
  return part.get("result") if part.get("status") == "ok" else None


def summarise(parts) -> dict:
  """The figures the targets speak of, from the parts that ran."""
  out = {}
  get = lambda name: _ok(parts, name)
  for dtype in ("float32", "bfloat16", "float32_tf32"):
    if r := get(f"train_step_{dtype}"):
      out[f"train_step_{dtype}_ms"] = 1e3 * r["step_s"]
  if r := get("f30k_scoring"):
    out["f30k_scoring_s"] = r["full_matrix_s"]
    if e := get("f30k_encoders"):
      out["f30k_encoders_s"] = e["pass_s"]
      out["f30k_end_to_end_s"] = r["full_matrix_s"] + e["pass_s"]
  if r := get("coco_scoring"):
    out["coco_full_matrix_s"] = r["full_matrix_s"]
    out["coco_extrapolated"] = r["extrapolated"]
  if ref := get("reference_train_step"):
    out["reference_train_step_ms"] = 1e3 * statistics.median(ref["times_s"])
    for dtype in ("float32", "bfloat16"):
      if r := get(f"train_step_{dtype}"):
        out[f"speedup_train_{dtype}"] = out["reference_train_step_ms"] / (
          1e3 * r["step_s"]
        )
  if (ref := get("reference_scoring")) and (r := get("f30k_scoring")):
    out["reference_scoring_pairs_per_s"] = ref["pairs_per_s"]
    out["speedup_scoring"] = r["pairs_per_s"] / ref["pairs_per_s"]
  if r := get("agreement"):
    out["score_rel_err_highest"] = r["max_rel_err"]["float32_highest_vs_ref32"]
    out["score_rel_err_default"] = r["max_rel_err"]["float32_default_vs_ref32"]
  memory = [p["memory"] for p in parts.values() if p.get("memory")]
  peaks = [m["peak_bytes_in_use"] for m in memory if "peak_bytes_in_use" in m]
  out["peak_device_bytes"] = max(peaks) if peaks else None
  out["device_bytes_limit"] = max((m.get("bytes_limit", 0) for m in memory), default=0)
  return out


def _target(key) -> str:
  op, bound = TARGETS[key]
  unit = {"train_step_ms": " ms", "f30k_s": " s", "coco_s": " s", "speedup": "x"}
  return f"{'≤' if op == '<=' else '≥'} {bound:g}{unit.get(key, '')}"


def _meets(key, value, smoke, timing=True) -> str:
  if value is None:
    return "-"
  if smoke and timing:
    return "n/a (smoke)"
  op, bound = TARGETS[key]
  return "yes" if (value <= bound if op == "<=" else value >= bound) else "NO"


def _one_line(error: str) -> str:
  """An error's first and last lines (a subprocess's ends with its exception)."""
  lines = [x.strip() for x in error.strip().splitlines() if x.strip()] or [""]
  text = lines[0] if len(lines) == 1 else f"{lines[0][:80]} ... {lines[-1]}"
  return text[:200].replace("|", "/")


def markdown(results) -> str:
  """One table row per figure; a part that failed or was skipped says so."""
  parts, s, meta = results["parts"], results["summary"], results["meta"]
  smoke, sizes = meta["smoke"], meta["sizes"]
  rows = []

  def row(what, needs, text, key=None, value=None, timing=True):
    """`text(results of needs...)` if every part in `needs` ran, else why not."""
    for name in needs:
      part = parts.get(name)
      if not part or part["status"] != "ok":
        why = "not run" if not part else f"{part['status']}: {_one_line(part['error'])}"
        rows.append((what, f"{name} {why}", _target(key) if key else "-", "-"))
        return
    result = text(*(parts[n]["result"] for n in needs))
    meets = _meets(key, value, smoke, timing) if key else "-"
    rows.append((what, result, _target(key) if key else "-", meets))

  batch, length = sizes["batch"], sizes["caption_len"]
  labels = {"float32": "fp32", "bfloat16": "bf16",
            "float32_tf32": "fp32 at matmul precision default (TF32)"}  # fmt: skip
  for dtype, label in labels.items():
    row(
      f"Train step SGR {label}, batch {batch}, L {length}",
      [f"train_step_{dtype}"],
      lambda r: f"{1e3 * r['step_s']:.1f} ms ({r['pairs_per_s']:,.0f} pairs/s)",
      "train_step_ms",
      s.get(f"train_step_{dtype}_ms"),
    )
  n_img, n_cap = sizes["f30k"]
  row(
    f"F30K {n_img:,} x {n_cap:,} SGR scoring (encoders excluded)",
    ["f30k_scoring"],
    lambda r: f"{r['full_matrix_s']:.3g} s ({r['pairs_per_s']:,.0f} pairs/s)",
  )
  row(
    f"F30K encoders ({n_img:,} images + {n_cap:,} captions, host to host)",
    ["f30k_encoders"],
    lambda r: f"{r['pass_s']:.3g} s",
  )
  row(
    "F30K end to end (encoders + scoring)",
    ["f30k_scoring", "f30k_encoders"],
    lambda a, b: f"{a['full_matrix_s'] + b['pass_s']:.3g} s",
    "f30k_s",
    s.get("f30k_end_to_end_s"),
  )
  n_img, n_cap = sizes["coco"]
  row(
    f"COCO {n_img:,} x {n_cap:,} SGR scoring",
    ["coco_scoring"],
    lambda r: (
      f"{r['full_matrix_s']:.3g} s"
      + (
        f" (extrapolated from {r['tiles_timed']} of {r['total_tiles']} tiles,"
        f" {r['pass_s']:.3g} s)"
        if r["extrapolated"]
        else " (whole matrix)"
      )
    ),
    "coco_s",
    s.get("coco_full_matrix_s"),
  )
  row(
    "Reference (PyTorch) train step fp32",
    ["reference_train_step"],
    lambda r: f"{s['reference_train_step_ms']:.1f} ms on {r['device']}",
  )
  for dtype in ("float32", "bfloat16"):
    row(
      f"Speed-up, train step {labels[dtype]} over the reference's fp32",
      ["reference_train_step", f"train_step_{dtype}"],
      lambda *_, dtype=dtype: f"{s[f'speedup_train_{dtype}']:.1f}x",
      "speedup",
      s.get(f"speedup_train_{dtype}"),
    )
  row(
    "Reference (PyTorch) scoring, 100 x 100 shards",
    ["reference_scoring"],
    lambda r: (
      f"{r['pairs_per_s']:,.0f} pairs/s on {r['device']} "
      f"({r['shapes']['n_img']} x {r['shapes']['n_cap']})"
    ),
  )
  row(
    "Speed-up, F30K scoring over the reference (pairs/s)",
    ["reference_scoring", "f30k_scoring"],
    lambda *_: f"{s['speedup_scoring']:.1f}x",
    "speedup",
    s.get("speedup_scoring"),
  )
  for precision, label in (("highest", "highest (the default)"),
                           ("default", "default (TF32): its cost")):  # fmt: skip
    row(
      f"Scores, max rel. error vs reference fp32, ours fp32 at precision {label}",
      ["agreement"],
      lambda r, p=precision: (
        f"{r['max_rel_err'][f'float32_{p}_vs_ref32']:.1e} "
        f"(vs float64: ours {r['max_rel_err'][f'float32_{p}_vs_ref64']:.1e}, "
        f"reference fp32 {r['max_rel_err']['ref32_vs_ref64']:.1e}; max abs. error "
        f"/ score spread {r['max_abs_err_over_spread'][f'float32_{p}_vs_ref32']:.1e})"
      ),
      "score_rel_err",
      s.get(f"score_rel_err_{precision}"),
      timing=False,
    )
  row(
    "Scores, max rel. error vs reference fp32, ours bf16 (for information)",
    ["agreement"],
    lambda r: (
      f"{r['max_rel_err']['bfloat16_highest_vs_ref32']:.1e} (max abs. error "
      f"/ score spread {r['max_abs_err_over_spread']['bfloat16_highest_vs_ref32']:.1e})"
    ),
  )
  peak, limit = s.get("peak_device_bytes"), s.get("device_bytes_limit")
  rows.append((
    "Peak device memory (JAX allocator, whole run)",
    f"{peak / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB" if peak else "not reported",
    "-",
    "-",
  ))  # fmt: skip
  scope = "SMOKE: tiny sizes on the CPU; the targets are for paper sizes on an H200" \
    if smoke else "paper dims"  # fmt: skip
  lines = [
    f"Device {meta['device_kind']}; jax {meta['jax']}; torch {meta['torch']}; {scope}.",
    f"Execution: {meta['plan']}.",
    f"Wall time {meta.get('wall_s', 0):.0f} s.",
    "",
    "| What | Result | Target (H200) | Meets |",
    "|---|---|---|---|",
  ]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  return "\n".join(lines) + "\n"


def _finite(x):
  if isinstance(x, float) and not math.isfinite(x):
    return repr(x)  # JSON has no NaN/inf; keep it visible as text
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def _write(results, out_dir: Path):
  results["summary"] = summarise(results["parts"])
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(
    json.dumps(_finite(results), indent=1, default=str) + "\n"
  )
  table = markdown(results)
  (out_dir / "results.md").write_text(table)
  return table


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
    model_kw = plan.model_kwargs() if plan else {}
    tiles = sizes.tiles or ((plan.img_tile, plan.cap_tile) if plan else None)
    return _part_functions(sizes, model_kw, tiles, ref_device, args.smoke, deadline)

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
    _write(results, out_dir)
  results["meta"]["wall_s"] = time.perf_counter() - start
  table = _write(results, out_dir)
  print(table)
  print(f"[accelerator] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
  return results


if __name__ == "__main__":
  main()
