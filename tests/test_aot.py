"""`python -m srem_jax.aot`: a run's programs, compiled for GPUs and TPUs here.

The program set and the target descriptions are checked everywhere; the
compiles need the target's compiler (libtpu: `pip install -e '.[tpu]'`; the
CUDA 12 plugin: `pip install -e '.[cuda_compile]'`) and are marked `accelerator` (deselect with -m "not accelerator"). They run
the command in a fresh process: the test process's XLA_FLAGS are CPU flags.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts import load_benchmark

from configs import demo
from srem_jax import aot, execution, sharding
from srem_jax.compile import shapes, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a missing parent package
    return False


needs_tpu = pytest.mark.skipif(
  not _installed("libtpu"), reason=f"libtpu not installed: {aot.INSTALL['tpu']}"
)
needs_cuda = pytest.mark.skipif(
  not _installed("jax_plugins.xla_cuda12"),
  reason=f"the CUDA 12 plugin is not installed: {aot.INSTALL['cuda']}",
)


def _aot(tmp_path, target, *flags):
  """(completed process, rows) of the command on the demo config."""
  out = tmp_path / "rows.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
    [sys.executable, "-m", "srem_jax.aot", "--config=configs/demo.py",
     f"--target={target}", f"--json={out}", *flags],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  rows = json.loads(out.read_text()) if out.exists() else None
  return result, rows


# ---- everywhere: the program set and the target descriptions ----------------


def _names(**overrides):
  config = demo.get_config()
  for path, value in overrides.items():
    section, key = path.split("__")
    config[section][key] = value
  mesh = sharding.make_mesh(-1)
  plan = execution.resolve(config.execution)
  programs = aot.RunPrograms(config, mesh, plan, shapes.data_shapes(config)).all()
  return [p.name for p in programs]


def test_a_run_s_programs_follow_its_method():
  names = _names()
  assert [n.split(" b")[0] for n in names[:2]] == [
    "train step warm-up",
    "train step main",
  ]
  assert "encode images b256" in names and "encode captions b256" in names
  assert any(n.startswith("eval scorer tile") for n in names)
  assert not any("selection" in n for n in names)  # r0 selects in the batch
  assert any("selection pass" in n for n in _names(loss__selection="epoch_gmm"))
  ncr = _names(loss__name="ncr")
  assert [n.split(" b")[0] for n in ncr[:4]] == [
    "ncr warm-up step",
    "ncr co-train step",
    "ncr co-train step +unlabelled",
    "ncr division pass",
  ]


def test_targets_state_their_chips_memory_and_peaks():
  for name in ("h100", "h200", "v5e-1", "v5e-8", "v4-8"):
    target = targets.TARGETS[name]
    assert target.peak("bfloat16", "default") >= target.peak("float32", "highest")
    # A program that moves 1 GB and does nothing else is bandwidth bound.
    assert target.roofline(0, 1e9, "float32", "highest") == 1e9 / target.bandwidth
  h200 = targets.TARGETS["h200"].gpu_config
  assert "device_memory_size: 151397597184" in h200
  assert 'device_description_str: "NVIDIA H200 141GB HBM3e"' in h200
  assert targets.TARGETS["h100"].budget_bytes < 0.8 * 84942979072


# ---- with the compilers ------------------------------------------------------

# Captions scored at the padded length: the by-length branches more than
# double the train step's compile time (minutes here), and the precision and
# the fit are properties of the products, which both paths share.
FAST = ("--config.execution.by_length=False",)


def _dot_precisions(hlo: str) -> set[str]:
  """The operand precisions of the float32 products of a compiled HLO text:
  dots (GPU), convolutions (TPU: its dots become them), GEMM calls."""
  found = set()
  for line in hlo.splitlines():
    if re.search(r"= f32\[[^\]]*\]\S* (dot|convolution)\(", line):
      match = re.search(r"operand_precision=\{(\w+),(\w+)\}", line)
      found.add(match.group(1) if match else "default")
    elif "__cublas$gemm" in line and "f32[" in line.split("custom-call")[0]:
      match = re.search(r'"operand_precision":\["(\w+)","(\w+)"\]', line)
      found.add(match.group(1).lower() if match else "default")
  return found


@pytest.mark.accelerator
@needs_tpu
def test_demo_train_step_compiles_for_v5e_and_fits_in_full_precision(tmp_path):
  result, rows = _aot(
    tmp_path, "v5e-1", "--programs=train step main", f"--hlo_dir={tmp_path}", *FAST
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  (row,) = rows
  assert row["compiled"] and row["fits"] and row["temp_bytes"] > 0
  assert row["flops"] > 0 and row["roofline_s"] > 0
  (hlo,) = tmp_path.glob("v5e-1.*.hlo.txt")
  assert _dot_precisions(hlo.read_text()) == {"highest"}


@pytest.mark.accelerator
@needs_cuda
def test_demo_train_step_compiles_for_h200_and_fits_in_full_precision(tmp_path):
  result, rows = _aot(
    tmp_path, "h200", "--programs=train step main", f"--hlo_dir={tmp_path}", *FAST
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  (row,) = rows
  assert row["compiled"] and row["fits"]
  assert 0 < row["memory_share"] < 0.01
  (hlo,) = tmp_path.glob("h200.*.hlo.txt")
  assert _dot_precisions(hlo.read_text()) == {"highest"}


@pytest.mark.accelerator
@needs_tpu
def test_json_rows_hold_the_documented_keys(tmp_path):
  result, rows = _aot(tmp_path, "v5e-8", "--programs=encode")
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  assert [row["program"] for row in rows] == [
    "encode images b256",
    "encode captions b256",
  ]
  keys = "program compiled compile_s argument_bytes output_bytes temp_bytes fits"
  for row in rows:
    assert set(keys.split()) <= set(row)
    assert row["target"] == "v5e-8" and row["fits"]


@pytest.mark.accelerator
@needs_tpu
def test_a_program_too_large_for_the_chip_exits_non_zero(tmp_path):
  # 2**23 images of 8 x 64 float32 regions: 16 GiB of input alone, all of a
  # v5e chip's memory.
  result, rows = _aot(
    tmp_path, "v5e-1", "--programs=encode images", "--config.eval.batch_size=8388608"
  )
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert "does not compile or fit: encode images" in result.stderr
  assert not rows[0]["fits"]


def test_each_target_resolves_the_sizes_a_run_there_would():
  plan = lambda name: execution.resolve(
    demo.get_config().execution, device=aot._TargetDevice(targets.TARGETS[name])
  )
  h200, h100, v5e = plan("h200"), plan("h100"), plan("v5e-1")
  assert (h200.preset, h200.img_chunk, h200.img_tile) == ("gpu", 32, 1024)
  # An H100's 60 usable GiB are more than the gpu preset was sized for.
  assert (h100.preset, h100.img_chunk, h100.img_tile) == ("gpu", 32, 1024)
  assert (v5e.preset, v5e.img_chunk) == ("tpu", 8)


def test_a_dataset_s_sizes_come_from_the_config_or_are_stated():
  from configs import flickr

  f30k = shapes.data_shapes(flickr.get_config())
  assert (f30k.caption_len, f30k.vocab_size, f30k.num_regions) == (77, 8481, 36)
  assert "77" in f30k.note
  assert shapes.data_shapes(flickr.get_config(), caption_len=48).caption_len == 48
  assert shapes.data_shapes(demo.get_config()).num_regions == 8


@pytest.mark.accelerator
@needs_tpu
def test_v5e_8_train_step_loops_hold_only_the_collectives_the_math_needs(tmp_path):
  accelerator_checks = load_benchmark("accelerator_checks")

  result, rows = _aot(
    tmp_path, "v5e-8", "--programs=train step main", f"--hlo_dir={tmp_path}", *FAST
  )
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  (hlo,) = tmp_path.glob("v5e-8.*.hlo.txt")
  loops = accelerator_checks.scan_collectives(hlo.read_text())
  assert loops  # the head's scan and the text GRU
  # SGR's scans run per chip under shard_map: gradients are summed once, after.
  assert [loop["sources"] for loop in loops if loop["collectives"]] == []


def test_the_tpu_preset_lowers_xla_s_compile_effort_and_no_other_does():
  plan = lambda name: execution.resolve(
    demo.get_config().execution, device=aot._TargetDevice(targets.TARGETS[name])
  )
  assert plan("v5e-8").compiler_options() == {"exec_time_optimization_effort": -1.0}
  assert "compile effort -1" in plan("v5e-1").reason
  assert plan("h200").compiler_options() is None
  assert execution.resolve(None, device=jax.devices("cpu")[0]).compiler_options() is None


def test_the_compile_effort_leaves_scores_and_gradients_bitwise_unchanged():
  """The option reaches XLA and changes no number of a train-mode SGR step's
  loss and gradients (image chunks, length groups) on the CPU; for TPU the
  optimised HLO holds the same products either way (benchmarks/RESULTS.md)."""
  from srem_jax.models.sgraf import SGRAF

  rng = np.random.default_rng(0)
  model = SGRAF(vocab_size=50, img_dim=12, embed_dim=16, word_dim=8, sim_dim=8,
                dropout=0.0, img_chunk=2, length_group=4)  # fmt: skip
  lengths = np.array([3, 20, 5, 9, 2, 13])  # buckets 8, 12, 16, 20
  tokens = rng.integers(4, 50, size=(6, 20))
  tokens = np.where(np.arange(20)[None] < lengths[:, None], tokens, 0)
  images = rng.normal(size=(5, 6, 12)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), images, tokens, lengths, train=False)

  def loss(params):
    scores, _ = model.apply(
      {**variables, "params": params}, images, tokens, lengths, train=True,
      mutable=["batch_stats"],
    )  # fmt: skip
    return jnp.sum(scores * jnp.arange(scores.size).reshape(scores.shape))

  fn = jax.jit(jax.value_and_grad(loss))
  options = {"exec_time_optimization_effort": -1.0}
  plain = fn.lower(variables["params"]).compile()(variables["params"])
  tuned = fn.lower(variables["params"]).compile(compiler_options=options)
  jax.tree.map(np.testing.assert_array_equal, tuned(variables["params"]), plain)
