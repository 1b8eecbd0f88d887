"""Smoke tests of the benchmark functions at tiny shapes (no timing asserted)."""

import json
import math
import subprocess
import sys

import pytest
from scripts import BENCHMARKS, load_benchmark

from srem_jax.errors import UserError
from srem_jax.models.dims import TINY_DIMS

bench = load_benchmark("bench")
bench_eval = load_benchmark("bench_eval")
measure = load_benchmark("measure")

PAPER_HEAD = dict(
  num_regions=36, caption_len=15, embed_dim=1024, sim_dim=256, sgr_steps=3
)


def test_pair_flops_at_paper_dims_match_hand_counts():
  # Multiply-adds per pair: attention and context 2*36*15*1024, local nodes
  # 15*1024*256, global node 1024*256, score 256, SGR per step (K = 16):
  # reference 3*16*256^2 + 2*16^2*256; folded 2*16*256^2 + 2*16^2*256, and
  # 2*256^2 + 2*16*256 for the last step's node 0.
  common = 1_105_920 + 3_932_160 + 262_144 + 256
  reference = measure.pair_flops("sgr", reference=True, **PAPER_HEAD)
  assert reference == 2 * (common + 3 * 3_276_800)
  assert math.isclose(reference / 1e6, 30.26, rel_tol=1e-3)
  fast = measure.pair_flops("sgr", **PAPER_HEAD)
  assert fast == 2 * (common + 2 * 2_228_224 + 139_264)
  assert measure.pair_flops("saf", **PAPER_HEAD) == 2 * (common + 2 * 16 * 256)


def _finite_positive(x):
  return math.isfinite(x) and x > 0


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_train_step_bench_runs_the_real_step(remat):
  result = bench.bench_train_step(
    head="sgr", batch=4, caption_len=5, steps=1, dims=TINY_DIMS, remat=remat
  )
  assert _finite_positive(result["pairs_per_s"]) and _finite_positive(
    result["flops_per_s"]
  )
  assert result["remat"] == remat and result["shapes"]["batch"] == 4
  assert len(result["times_s"]) == 1 and result["compile_s"] > 0
  json.dumps(result)


def test_eval_bench_counts_pairs_of_all_or_the_first_tiles():
  kw = dict(caption_len=5, steps=1, dims=TINY_DIMS, img_tile=2, cap_tile=2)
  whole = bench_eval.bench_eval(head="saf", n_img=3, n_cap=5, dtype="bfloat16", **kw)
  assert whole["pairs_timed"] == 15 and _finite_positive(whole["pairs_per_s"])
  assert whole["dtype"] == "bfloat16"
  first = bench_eval.bench_eval(head="sgr", n_img=3, n_cap=5, max_tiles=2, **kw)
  assert first["pairs_timed"] == 8


def test_pipeline_bench_reads_batches_from_a_prepared_synthetic_split():
  result = bench.bench_pipeline(batch=4, caption_len=6, steps=2, dims=TINY_DIMS)
  assert _finite_positive(result["batches_per_s"])
  assert result["shapes"]["num_images"] == 8
  assert result["bytes_per_s"] == pytest.approx(
    4 * 4 * 16 * 4 * result["batches_per_s"]
  )


def test_pipeline_bench_index_only_reads_no_features():
  result = bench.bench_pipeline(
    batch=4, caption_len=6, steps=2, dims=TINY_DIMS, index_only=True
  )
  assert result["index_only"] and _finite_positive(result["batches_per_s"])
  assert result["bytes_per_s"] == 0


def test_command_line_rejects_a_missing_mode_in_one_line():
  run = subprocess.run(
    [sys.executable, str(BENCHMARKS / "bench.py"), "--tiny"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
    "error: expected one mode argument out of train_step, eval, pipeline, checks"
  ]


def test_benches_draw_caption_lengths_from_a_histogram(tmp_path):
  path = tmp_path / "lengths.json"
  path.write_text(json.dumps({"splits": {"test": {"5": 6, "7": 3, "30": 1}}}))
  kw = dict(steps=1, dims=TINY_DIMS, caption_lengths=str(path))
  train = bench.bench_train_step(head="sgr", batch=6, **kw)
  drawn = train["caption_lengths"]
  # The batch is padded to the bucket of its longest drawn caption.
  assert train["shapes"]["caption_len"] == (8 if drawn["max"] <= 8 else 30)
  assert 5 <= drawn["mean"] <= drawn["max"] <= 30
  evaluation = bench_eval.bench_eval(
    head="sgr", n_img=3, n_cap=40, img_tile=2, cap_tile=8, **kw
  )
  assert evaluation["shapes"]["caption_len"] == 30
  assert evaluation["pairs_timed"] == 120
  # Short tiles get bucket 8, the tile holding a 30-token caption the static 30.
  assert evaluation["compiled_lengths"] == [8, 30]
  static = bench_eval.bench_eval(head="sgr", n_img=3, n_cap=40, static=True, **kw)
  assert static["compiled_lengths"] == [30]


def test_eval_bench_times_the_resident_evaluation_over_every_pair():
  kw = dict(caption_len=5, steps=1, dims=TINY_DIMS, img_tile=2, cap_tile=2)
  result = bench_eval.bench_eval(head="sgr", n_img=3, n_cap=5, resident=True, **kw)
  assert result["resident"] and result["pairs_timed"] == 15
  assert _finite_positive(result["pairs_per_s"])
  with pytest.raises(UserError, match="max_tiles"):
    bench_eval.bench_eval(
      head="sgr", n_img=3, n_cap=5, resident=True, max_tiles=1, **kw
    )
