"""The GPU/TPU programs, checked on the CPU: precision, platform paths,
collectives of the sharded step, memory, and the execution presets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scripts import load_benchmark

from srem_jax import config_checks, execution
from srem_jax.errors import UserError
from srem_jax.models import heads, numerics
from srem_jax.models.dims import TINY_DIMS

ac = load_benchmark("accelerator_checks")

# ---- exports for cuda and tpu, paper dimensions -----------------------------


@pytest.mark.parametrize("preset, platform", [("gpu", "cuda"), ("tpu", "tpu")])
@pytest.mark.parametrize("head", ["sgr", "saf"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exported_train_step_is_exact_and_has_no_cpu_constructs(
  preset, platform, head, dtype
):
  fn, args = ac.train_step_program(head, dtype, ac.plan_for(preset))
  summary = ac.dot_summary(ac.exported_text(fn, args, platform))
  assert summary["dots"] > 40
  assert summary["precisions"] == {"HIGHEST/HIGHEST": summary["dots"]}
  assert summary["optimization_barriers"] == 0


@pytest.mark.parametrize("preset, platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_exported_encoders_and_scorer_are_exact(preset, platform):
  plan = ac.plan_for(preset)
  for fn, args in (
    ac.encoders_program("bfloat16", plan),
    ac.scorer_program("sgr", "float32", plan),
    ac.scorer_program("saf", "bfloat16", plan),
  ):
    summary = ac.dot_summary(ac.exported_text(fn, args, platform))
    assert summary["dots"] > 5
    assert summary["precisions"] == {"HIGHEST/HIGHEST": summary["dots"]}
    assert summary["optimization_barriers"] == 0


def test_requested_precision_reaches_every_dot():
  fn, args = ac.train_step_program(
    "sgr", "float32", ac.plan_for("gpu", "high"), batch=8, dims=TINY_DIMS
  )
  summary = ac.dot_summary(ac.exported_text(fn, args, "cuda"))
  assert summary["precisions"] == {"HIGH/HIGH": summary["dots"]}


def test_cpu_lowering_keeps_the_cpu_layout_and_only_there():
  """The bf16 backward's barrier is in the CPU program, not the CUDA one."""
  fn, args = ac.train_step_program(
    "sgr", "bfloat16", ac.plan_for("cpu"), batch=8, dims=TINY_DIMS
  )
  cpu = ac.dot_summary(fn.lower(*args).as_text())
  cuda = ac.dot_summary(ac.exported_text(fn, args, "cuda"))
  assert cpu["optimization_barriers"] > 0
  assert cuda["optimization_barriers"] == 0


# ---- the CPU formulations equal the plain ones ------------------------------


def _dot_dims(spec, a, b):
  """The dimension numbers einsum hands to dot_general for `spec`."""
  found = []

  def capture(x, y, dims, *args, **kwargs):
    found.append(dims)
    return jax.lax.dot_general(x, y, dims, *args, **kwargs)

  jnp.einsum(spec, a, b, _dot_general=capture)
  return numerics._freeze(found[0])


@pytest.mark.parametrize(
  "spec",
  ["ij,jk->ik", "nre,cle->nrcl", "ncij,ncjs->ncis", "nrm,nre->nme", "ji,kj->ik"],
)
def test_bf16_backward_products_equal_on_both_paths(spec):
  rng = np.random.default_rng(0)
  sizes = dict(i=5, j=7, k=3, n=2, r=4, e=6, c=3, l=5, s=4, m=6)
  a_spec, b_spec = spec.split("->")[0].split(",")
  shape = lambda term: tuple(sizes[ch] for ch in term)
  a = jnp.asarray(rng.normal(size=shape(a_spec)), jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=shape(b_spec)), jnp.bfloat16)
  dims = _dot_dims(spec, a, b)
  out = jax.eval_shape(lambda x, y: jax.lax.dot_general(x, y, dims), a, b)
  g = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  prec = jax.lax.Precision.HIGHEST
  cpu = numerics.backward_products(g, a, b, dims, prec, "cpu")
  plain = numerics.backward_products(g, a, b, dims, prec, "plain")
  for x, y, operand in zip(cpu, plain, (a, b)):
    assert x.shape == y.shape == operand.shape
    assert x.dtype == y.dtype == jnp.bfloat16
    # Both accumulate the same bf16 products in float32; only the final
    # rounding to bf16 may differ by one unit.
    np.testing.assert_allclose(np.float32(x), np.float32(y), rtol=1e-2, atol=1e-6)


def test_bf16_gradients_equal_on_both_paths_through_the_custom_vjp():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  loss = lambda x, y: jnp.sum(w * numerics.matmul("ij,jk->ik", x, y, jnp.bfloat16))
  on_cpu = jax.grad(loss, argnums=(0, 1))(a, b)
  # The same custom VJP with its platform choice forced to the plain path.
  plain_only = lambda cpu_fn, default_fn, *args: default_fn(*args)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(numerics, "on_cpu", plain_only)
    plain = jax.grad(loss, argnums=(0, 1))(a, b)
  for x, y in zip(on_cpu, plain):
    np.testing.assert_array_equal(np.float32(x), np.float32(y))


def test_image_slices_sum_equally_on_both_paths():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(7, 3, 5, 4)), jnp.float32)
  np.testing.assert_allclose(
    heads.sum_image_slices(x, "cpu"), heads.sum_image_slices(x, "plain"), rtol=1e-6
  )
  np.testing.assert_allclose(
    heads.sum_image_slices(x, "plain"), np.sum(np.float64(x), axis=0), rtol=1e-6
  )
  context = jnp.asarray(np.random.default_rng(4).normal(size=(7, 3, 5, 4)), jnp.float32)
  words = x[0]
  grads = lambda: jax.grad(
    lambda c, w: jnp.sum(jnp.sin(heads.squared_difference(c, w))), argnums=(0, 1)
  )(context, words)
  on_cpu = grads()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(heads, "on_cpu", lambda cpu_fn, default_fn, *args: default_fn(*args))
    plain = grads()
  for a, b in zip(on_cpu, plain):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---- the sharded step's collectives on 8 host devices -----------------------


def _loop_collective_sources(head):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  fn, args = ac.train_step_program(
    head, "float32", ac.plan_for("cpu"), batch=32, caption_len=6, dims=TINY_DIMS,
    mesh=mesh,
  )  # fmt: skip
  loops = ac.scan_collectives(fn.lower(*args).compile().as_text())
  assert len(loops) >= 3  # GRU forward and backward, the head's scan and its backward
  return [s for loop in loops for s in loop["sources"]]


def test_sgr_step_loops_hold_no_collective():
  """The head's scan and the text GRU run per device (shard_map): their
  weights' gradients are summed once, outside the loops."""
  assert jax.device_count() == 8
  assert _loop_collective_sources("sgr") == []


def test_saf_step_loops_add_only_the_batch_statistics_sums():
  """SAF's train-mode BatchNorm statistics of a caption span the images of
  every device: their sums are the one collective its scan body needs."""
  sources = _loop_collective_sources("saf")
  assert sources and all("SAF_module/psum" in s["op_name"] for s in sources), sources
  assert {s["kind"] for s in sources} == {"all-reduce"}


# ---- memory at paper dimensions ---------------------------------------------


def test_gpu_preset_train_step_and_eval_tile_fit_an_h200_with_room():
  plan = ac.plan_for("gpu")
  step = ac.memory_needs(
    *ac.train_step_program("sgr", "float32", plan, caption_len=ac.F30K_CAPTION_LEN)
  )
  tile = ac.memory_needs(
    *ac.scorer_program("sgr", "float32", plan, caption_len=ac.F30K_CAPTION_LEN)
  )
  for need in (step, tile):
    assert 1e9 < need["peak_estimate"] < 0.5 * ac.DEVICE_MEMORY["H200"], need


def test_tpu_preset_eval_tile_fits_a_16_gb_chip():
  plan = ac.plan_for("tpu")
  tile = ac.memory_needs(
    *ac.scorer_program("sgr", "float32", plan, caption_len=ac.F30K_CAPTION_LEN)
  )
  assert tile["peak_estimate"] < 0.75 * ac.DEVICE_MEMORY["TPU v5e"], tile


# ---- execution presets ------------------------------------------------------


class _Device:
  def __init__(self, platform, memory=None, kind="test device"):
    self.platform, self.device_kind, self._memory = platform, kind, memory

  def memory_stats(self):
    return None if self._memory is None else {"bytes_limit": self._memory}


def test_auto_preset_follows_the_backend_and_says_why():
  cpu = execution.resolve(None, _Device("cpu"))
  assert (cpu.preset, cpu.img_chunk, cpu.remat) == ("cpu", 4, "dots")
  gpu = execution.resolve(None, _Device("gpu", 140 * execution.GIB, "NVIDIA H200"))
  assert gpu.preset == "gpu" and gpu.img_chunk == execution.PRESETS["gpu"].img_chunk
  assert "auto: backend gpu, NVIDIA H200" in gpu.reason and "img_chunk 32" in gpu.reason
  tpu = execution.resolve(None, _Device("tpu", 16 * execution.GIB))
  assert tpu.preset == "tpu" and tpu.img_tile == execution.PRESETS["tpu"].img_tile


def test_smaller_device_gets_smaller_chunks_and_overrides_win():
  small = execution.resolve(None, _Device("gpu", 10 * execution.GIB))
  full = execution.PRESETS["gpu"]
  assert small.img_chunk < full.img_chunk and small.img_tile < full.img_tile
  assert "scaled by 0.42" in small.reason
  chosen = execution.resolve(
    {"preset": "gpu", "img_chunk": 3, "remat": "full", "matmul_precision": "high"},
    _Device("cpu"),
  )
  assert (chosen.preset, chosen.img_chunk, chosen.remat) == ("gpu", 3, "full")
  assert chosen.cap_chunk == full.cap_chunk
  assert chosen.model_kwargs()["precision"] == "high"
  assert chosen.model_kwargs()["length_group"] == full.length_group > 0
  grouped = execution.resolve({"length_group": 8}, _Device("cpu"))
  assert (
    grouped.model_kwargs()["length_group"] == 8 and "length groups 8" in grouped.reason
  )
  plain = execution.resolve({"by_length": False, "length_group": 8}, _Device("cpu"))
  assert (
    plain.model_kwargs()["length_group"] == 0 and "length groups off" in plain.reason
  )


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("preset", "h100", "execution.preset='h100'"),
    ("matmul_precision", "tf32", "execution.matmul_precision='tf32'"),
    ("img_chunk", -1, "execution.img_chunk=-1"),
    ("remat", "some", "execution.remat='some'"),
    ("length_group", 2.5, "execution.length_group=2.5"),
    ("by_length", "yes", "execution.by_length='yes'"),
  ],
)
def test_bad_execution_fields_name_the_field(field, value, message):
  with pytest.raises(UserError, match=message.replace(".", r"\.")):
    config_checks.validate_execution({field: value})


def test_platform_dependent_choice_is_made_at_lowering():
  f = jax.jit(functools.partial(numerics.on_cpu, lambda x: x + 1.0, lambda x: x + 2.0))
  assert float(f(jnp.float32(0))) == 1.0  # this machine lowers for the CPU
  exported = jax.export.export(f, platforms=["cuda"])(
    jax.ShapeDtypeStruct((), jnp.float32)
  )
  assert "2.0" in exported.mlir_module() and "1.0" not in exported.mlir_module()


def test_cpu_fallback_is_warned_about_only_when_an_accelerator_is_expected(
  monkeypatch,
):
  monkeypatch.setattr(execution, "_accelerator_on_machine", lambda: None)
  assert execution.cpu_fallback_warning(None, "cpu") is None
  assert execution.cpu_fallback_warning({"preset": "cpu"}, "cpu") is None
  asked = execution.cpu_fallback_warning({"preset": "gpu"}, "cpu")
  assert "execution.preset='gpu'" in asked and "pip install -e '.[cuda]'" in asked
  monkeypatch.setattr(execution, "_accelerator_on_machine", lambda: "an NVIDIA GPU")
  found = execution.cpu_fallback_warning(None, "cpu")
  assert found.startswith("warning: jax runs on the CPU although this machine has an")
  assert execution.cpu_fallback_warning(None, "gpu") is None
