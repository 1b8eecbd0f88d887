"""benchmarks/accelerator.py --smoke runs every part on the CPU and records it.

The smoke run is the GPU run's code path at tiny sizes: every part must
finish with finite figures, the COCO figure must be extrapolated from the
tiles it timed, and our scores must agree with the PyTorch reference's.
"""

import json
import math

import pytest
from scripts import load_benchmark

accelerator = load_benchmark("accelerator")

try:
  import torch  # noqa: F401

  HAVE_TORCH = True
except ImportError:
  HAVE_TORCH = False

REFERENCE_PARTS = {p for p in accelerator.PARTS if p.startswith("reference")}
NEEDS_TORCH = REFERENCE_PARTS | {"agreement"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("accel")
  returned = accelerator.main(["--smoke", f"--out_dir={out_dir}"])
  written = json.loads((out_dir / "results.json").read_text())
  return returned, written, (out_dir / "results.md").read_text()


def _numbers(tree):
  if isinstance(tree, bool):
    return
  if isinstance(tree, (int, float)):
    yield tree
  elif isinstance(tree, dict):
    for value in tree.values():
      yield from _numbers(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _numbers(value)


def test_every_part_ran_and_its_figures_are_finite(smoke):
  _, results, _ = smoke
  parts = results["parts"]
  assert set(parts) == set(accelerator.PARTS)
  expected = accelerator.PARTS if HAVE_TORCH else set(accelerator.PARTS) - NEEDS_TORCH
  for name in expected:
    part = parts[name]
    assert part["status"] == "ok", (name, part.get("traceback"))
    numbers = list(_numbers(part["result"]))
    assert numbers and all(math.isfinite(x) for x in numbers), name
  for dtype in ("float32", "bfloat16", "float32_tf32"):
    result = parts[f"train_step_{dtype}"]["result"]
    assert result["shapes"]["batch"] == 8 and result["step_s"] > 0
    assert result["pairs_per_s"] == pytest.approx(64 / result["step_s"])
  assert parts["train_step_float32_tf32"]["result"]["precision"] == "default"
  assert parts["f30k_scoring"]["result"]["shapes"]["n_img"] == 16
  assert parts["f30k_scoring"]["result"]["shapes"]["n_cap"] == 40
  assert parts["f30k_encoders"]["result"]["pass_s"] > 0
  summary = results["summary"]
  keys = ["train_step_float32_ms", "f30k_end_to_end_s", "coco_full_matrix_s"]
  if HAVE_TORCH:
    keys += ["speedup_train_float32", "speedup_scoring", "score_rel_err_highest"]
  for key in keys:
    assert math.isfinite(summary[key]) and summary[key] > 0, key


def test_coco_figure_is_extrapolated_from_the_first_row_of_tiles(smoke):
  _, results, table = smoke
  coco = results["parts"]["coco_scoring"]["result"]
  # 40 x 200 in 8 x 16 tiles: 5 rows of 13 tiles; one row is timed, and it
  # holds the real pairs of 8 images with all 200 captions.
  assert coco["extrapolated"] and coco["tiles_timed"] == 13
  assert coco["total_tiles"] == 65 and coco["pairs_timed"] == 8 * 200
  assert coco["full_matrix_s"] == pytest.approx(coco["pass_s"] * 5)
  assert "extrapolated from 13 of 65 tiles" in table
  f30k = results["parts"]["f30k_scoring"]["result"]
  assert not f30k["extrapolated"] and f30k["full_matrix_s"] == f30k["pass_s"]


def test_device_memory_is_none_on_the_cpu(smoke):
  _, results, table = smoke
  assert results["meta"]["device_kind"].startswith("cpu")
  for name in set(accelerator.PARTS) - REFERENCE_PARTS:
    assert results["parts"][name]["memory"] is None
  assert results["summary"]["peak_device_bytes"] is None
  assert "| Peak device memory (JAX allocator, whole run) | not reported |" in table


def test_our_scores_agree_with_the_reference(smoke):
  pytest.importorskip("torch")
  _, results, _ = smoke
  errors = results["parts"]["agreement"]["result"]["max_rel_err"]
  assert errors["float32_highest_vs_ref32"] < 1e-4
  assert errors["float32_default_vs_ref32"] < 1e-4  # the CPU has no TF32
  assert errors["float32_highest_vs_ref64"] < 1e-4
  # The measure can see a difference: bfloat16 products are visibly coarser.
  assert errors["bfloat16_highest_vs_ref32"] > 10 * errors["float32_highest_vs_ref32"]
  reference = results["parts"]["reference_train_step"]["result"]
  assert reference["device"] == "cpu" and reference["shapes"]["batch"] == 8


def test_table_has_a_row_per_figure_and_the_targets(smoke):
  returned, results, table = smoke
  assert returned["summary"] == results["summary"]
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert rows[0] == "| What | Result | Predicted (lower bound) | Target (H200) | Meets |"
  assert len(rows) == 1 + 16
  assert "≤ 40 ms" in table and "≤ 3 s" in table and "≤ 30 s" in table
  assert "≥ 10x" in table and "≤ 0.0001" in table
  if HAVE_TORCH:
    assert "failed" not in table and "not run" not in table
    assert table.count("| yes |") == 2  # the score errors; timings are n/a here


def test_each_timed_figure_has_its_prediction_beside_it(smoke):
  _, results, table = smoke
  prediction = results["parts"]["prediction"]["result"]
  # The CPU has no peak among the targets: FLOPs only.
  assert prediction["target"] is None
  figures = prediction["figures"]
  for name in ("train_step_float32", "f30k_scoring", "f30k_encoders", "coco_scoring"):
    assert figures[name]["flops"] > 0 and figures[name]["seconds"] is None
  # Scoring and the encoders are the end-to-end figure; bf16 does the same work.
  end_to_end = figures["f30k_scoring"]["flops"] + figures["f30k_encoders"]["flops"]
  assert figures["f30k_end_to_end"]["flops"] == end_to_end
  assert figures["train_step_bfloat16"]["flops"] == figures["train_step_float32"]["flops"]
  assert table.count("(no peak known for this device)") == 7
  assert "Predicted: compute-bound lower bounds" in table


def test_a_prediction_on_a_known_device_is_a_time_at_its_peak():
  report = load_benchmark("accelerator_report")
  figure = {"flops": 2.68e12, "seconds": 2.68e12 / 67e12}  # H200 fp32: 40 ms
  parts = {"prediction": {"status": "ok", "result": {"figures": {"step": figure}}}}
  assert report._predicted(parts, "step") == "≥ 40 ms (2.68 TFLOP)"
  assert report._predicted(parts, "other") == "-" == report._predicted({}, "step")


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
  def out_of_memory(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 99 bytes")

  monkeypatch.setattr(accelerator, "part_scoring", out_of_memory)
  accelerator.main(
    ["--smoke", f"--out_dir={tmp_path}", "--parts=f30k_scoring,f30k_encoders"]
  )
  results = json.loads((tmp_path / "results.json").read_text())
  failed = results["parts"]["f30k_scoring"]
  assert failed["status"] == "failed"
  assert failed["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
  assert results["parts"]["f30k_encoders"]["status"] == "ok"
  table = (tmp_path / "results.md").read_text()
  assert "f30k_scoring failed: RuntimeError: RESOURCE_EXHAUSTED" in table
  assert "coco_scoring not run" in table


def test_parts_past_the_budget_are_skipped(tmp_path):
  accelerator.main(["--smoke", f"--out_dir={tmp_path}", "--budget_s=0"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert {p["status"] for p in results["parts"].values()} == {"skipped"}
  assert set(results["parts"]) == set(accelerator.PARTS)
