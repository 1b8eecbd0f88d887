"""The summary and Markdown table of a benchmarks/accelerator.py run, and the
targets it is read against; beside each measured figure, its prediction
(accelerator_prediction.py: a compute-bound lower bound)."""

import json
import math
import statistics
from pathlib import Path

# The targets for one H200, each (comparison, bound).
TARGETS = {
  "train_step_ms": ("<=", 40.0),
  "f30k_s": ("<=", 3.0),
  "coco_s": ("<=", 30.0),
  "speedup": (">=", 10.0),
  "score_rel_err": ("<=", 1e-4),
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


def _predicted(parts, key) -> str:
  """The prediction part's figure for `key`: at least this long (FLOPs at
  peak), or the FLOPs alone where the device's peak is unknown."""
  figure = ((_ok(parts, "prediction") or {}).get("figures") or {}).get(key)
  if not figure:
    return "-"
  n = figure["flops"]
  flops = f"{n / 1e12:,.3g} TFLOP" if n >= 1e12 else f"{n / 1e9:,.3g} GFLOP"
  if figure["seconds"] is None:
    return f"{flops} (no peak known for this device)"
  seconds = figure["seconds"]
  time = f"{1e3 * seconds:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
  return f"≥ {time} ({flops})"


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

  def row(what, needs, text, key=None, value=None, timing=True, predicted=None):
    """`text(results of needs...)` if every part in `needs` ran, else why not;
    beside it the prediction `predicted` names."""
    guess = _predicted(parts, predicted) if predicted else "-"
    for name in needs:
      part = parts.get(name)
      if not part or part["status"] != "ok":
        why = "not run" if not part else f"{part['status']}: {_one_line(part['error'])}"
        rows.append((what, f"{name} {why}", guess, _target(key) if key else "-", "-"))
        return
    result = text(*(parts[n]["result"] for n in needs))
    meets = _meets(key, value, smoke, timing) if key else "-"
    rows.append((what, result, guess, _target(key) if key else "-", meets))

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
      predicted=f"train_step_{dtype}",
    )
  n_img, n_cap = sizes["f30k"]
  row(
    f"F30K {n_img:,} x {n_cap:,} SGR scoring (encoders excluded)",
    ["f30k_scoring"],
    lambda r: f"{r['full_matrix_s']:.3g} s ({r['pairs_per_s']:,.0f} pairs/s)",
    predicted="f30k_scoring",
  )
  row(
    f"F30K encoders ({n_img:,} images + {n_cap:,} captions, host to host)",
    ["f30k_encoders"],
    lambda r: f"{r['pass_s']:.3g} s",
    predicted="f30k_encoders",
  )
  row(
    "F30K end to end (encoders + scoring)",
    ["f30k_scoring", "f30k_encoders"],
    lambda a, b: f"{a['full_matrix_s'] + b['pass_s']:.3g} s",
    "f30k_s",
    s.get("f30k_end_to_end_s"),
    predicted="f30k_end_to_end",
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
    predicted="coco_scoring",
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
    "-",
  ))  # fmt: skip
  scope = "SMOKE: tiny sizes on the CPU; the targets are for paper sizes on an H200" \
    if smoke else "paper dims"  # fmt: skip
  lines = [
    f"Device {meta['device_kind']}; jax {meta['jax']}; torch {meta['torch']}; {scope}.",
    f"Execution: {meta['plan']}.",
    f"Wall time {meta.get('wall_s', 0):.0f} s.",
    f"Predicted: {_prediction_note(parts)}.",
    "",
    "| What | Result | Predicted (lower bound) | Target (H200) | Meets |",
    "|---|---|---|---|---|",
  ]
  lines += [f"| {' | '.join(cells)} |" for cells in rows]
  return "\n".join(lines) + "\n"


def _prediction_note(parts) -> str:
  part = parts.get("prediction")
  if not part or part["status"] != "ok":
    return "not run" if not part else f"{part['status']}: {_one_line(part['error'])}"
  r = part["result"]
  where = f"target {r['target']}" if r["target"] else "no target for this device"
  return f"{r['what']} ({r['device_kind']}: {where})"


def _finite(x):
  if isinstance(x, float) and not math.isfinite(x):
    return repr(x)  # JSON has no NaN/inf; keep it visible as text
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return x


def write(results, out_dir: Path):
  results["summary"] = summarise(results["parts"])
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "results.json").write_text(
    json.dumps(_finite(results), indent=1, default=str) + "\n"
  )
  table = markdown(results)
  (out_dir / "results.md").write_text(table)
  return table
