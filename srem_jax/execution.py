"""How the model's computation is laid out on the hardware, apart from the model.

Owns the execution presets (`PRESETS`: scan chunk sizes, rematerialisation,
all-pairs evaluation tiles and XLA's compile effort for CPUs, data-centre GPUs
and 16-32 GB TPU chips),
the matmul precisions (`PRECISIONS`) and `resolve`, which turns
`config.execution` into concrete sizes for the device at hand: with
`preset="auto"` the backend picks the preset, and a device that reports less
memory than the preset was sized for gets proportionally smaller chunks and
tiles (never larger ones). None of this changes what is computed, only in how many pieces, so a
checkpoint trained under one preset evaluates identically under another
(up to float32 summation order).

    plan = execution.resolve(config.execution)
    print(plan.reason)  # "preset gpu (auto: ...): img_chunk 32, ..."
    model = build_model(config.model, vocab_size, plan)
"""

import dataclasses
from typing import Any, NamedTuple

import jax


@dataclasses.dataclass(frozen=True)
class Preset:
  img_chunk: int  # images per device per scan step, training SGR
  cap_chunk: int  # captions per scan step: scoring, SAF training
  remat: str  # what a scan step keeps for the backward pass
  length_group: int  # captions per length group, training SGR
  img_tile: int  # images per all-pairs evaluation tile
  cap_tile: int  # captions per all-pairs evaluation tile
  sized_for_bytes: float  # device memory the sizes above were chosen for
  why: str
  # XLA's exec_time_optimization_effort, in [-1, 1]; 0 is XLA's default
  # (`compiler_options`). Every program a run compiles (train, init,
  # selection and NCR steps, encoders, scorer) and `python -m srem_jax.aot`
  # compile with it; only evaluation's layout glue, which has no products,
  # compiles at XLA's default.
  compile_effort: float = 0.0


GIB = 1024**3

# Per scan step, the largest tensors are (images, captions, words, E) float32:
# ~40 MB per image against 128 captions of 77 words at E = 1024 when
# training, ~0.3 GB per caption against 1,000 images when scoring. The
# compiled programs' own needs at these sizes are printed by
# `python benchmarks/bench.py checks` (and tested).
PRESETS = {
  "cpu": Preset(
    img_chunk=4,
    cap_chunk=4,
    remat="dots",
    length_group=16,
    img_tile=128,
    cap_tile=256,
    sized_for_bytes=0,
    why="chunks that stay in a CPU's caches",
  ),
  "gpu": Preset(
    img_chunk=32,
    cap_chunk=16,
    remat="dots",
    length_group=32,
    img_tile=1024,
    cap_tile=1024,
    # Compiled for an H200 at F30K's sizes (batch 128, 77-token captions),
    # the train step needs 5.1 GB and the scorer tile 7.3 GB; img_chunk 64 /
    # 128 would need 5.9 / 8.5 GB and 2048-square tiles 14.6 GB, all peaks
    # from benchmarks/RESULTS.md. Memory does not bound these sizes on any
    # current data-centre GPU, so a device keeps them from 24 GiB up (an
    # H100's 60 usable GiB, an A100's 30) and scales them down below.
    sized_for_bytes=24 * GIB,
    why="few, large scan steps for a data-centre GPU (24 GB or more)",
  ),
  "tpu": Preset(
    img_chunk=8,
    cap_chunk=8,
    remat="dots",
    length_group=32,
    img_tile=256,
    cap_tile=512,
    sized_for_bytes=15 * GIB,
    why="sized for a 16 GB TPU chip (v5e); fits 32 GB chips too",
    # A TPU train step's compile time goes to the backend generating and
    # scheduling machine code, most of it for the head's many small float32
    # products (3 SGR steps of 6-pass products; forward, recomputed forward
    # and backward; once per caption-length branch). At effort -1 it emits
    # about half as much and compiles the head ~5x faster. The optimised HLO
    # is the same program (the same fusions and products, other memory
    # placement), so results do not change; the effect on the step's run
    # time is not measured on a TPU (benchmarks/RESULTS.md).
    compile_effort=-1.0,
  ),
}
PRESET_NAMES = ("auto", *PRESETS)


class Execution(NamedTuple):
  """Concrete execution sizes for one run, and why they were chosen."""

  preset: str
  img_chunk: int
  cap_chunk: int
  remat: str
  img_tile: int
  cap_tile: int
  matmul_precision: str
  length_group: int  # 0: every caption scored at its batch's padded length
  reason: str
  compile_effort: float = 0.0  # XLA's exec_time_optimization_effort

  def compiler_options(self) -> dict[str, float] | None:
    """Options for `jax.jit(..., compiler_options=)` or `Lowered.compile`:
    the preset's compile effort where it is not XLA's default, else None.
    jax refuses a jit with options when it is traced inside another jit or
    `make_jaxpr`; `eval_shape` of the jit itself is fine."""
    if not self.compile_effort:
      return None
    return {"exec_time_optimization_effort": self.compile_effort}

  def model_kwargs(self) -> dict[str, Any]:
    """The SGRAF fields these sizes set."""
    return dict(
      img_chunk=self.img_chunk,
      cap_chunk=self.cap_chunk,
      remat=self.remat,
      precision=self.matmul_precision,
      length_group=self.length_group,
    )


def compiler_options(plan: Execution | None) -> dict[str, float] | None:
  """`plan.compiler_options()`; None, XLA's defaults, without a plan."""
  return None if plan is None else plan.compiler_options()


def platform_preset(platform: str) -> str:
  """The preset for a jax platform name (cpu, gpu/cuda/rocm, tpu)."""
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return "tpu" if platform == "tpu" else "cpu"


def device_memory_bytes(device) -> int | None:
  """Memory a device reports it can allocate, or None (the CPU reports none)."""
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    return None
  return (stats or {}).get("bytes_limit") or None


def _floor_pow2(x: float) -> int:
  return 1 << max(0, int(x).bit_length() - 1) if x >= 1 else 1


def _scaled(preset: Preset, memory: int | None) -> tuple[Preset, str]:
  """The preset with chunks and tiles scaled down to a device with less
  memory than the preset was sized for (never up)."""
  if not memory or not preset.sized_for_bytes:
    return preset, ""
  ratio = memory / preset.sized_for_bytes
  if ratio >= 0.9:
    return preset, f"{memory / GIB:.1f} GiB per device"
  shrink = lambda x: _floor_pow2(x * ratio)
  scaled = dataclasses.replace(
    preset,
    img_chunk=shrink(preset.img_chunk),
    cap_chunk=shrink(preset.cap_chunk),
    img_tile=max(8, shrink(preset.img_tile)),
  )
  return scaled, f"{memory / GIB:.1f} GiB per device, sizes scaled by {ratio:.2f}"


def resolve(exec_cfg=None, device=None) -> Execution:
  """Concrete sizes from `config.execution` (None = all defaults) for `device`
  (default: the first device). Fields left at 0 or "" come from the preset.
  The fields were checked at start-up (`config_checks.validate_execution`)."""
  get = (lambda k, d: d) if exec_cfg is None else (lambda k, d: exec_cfg.get(k, d))
  name = get("preset", "auto")
  precision = get("matmul_precision", "highest")
  device = device or jax.devices()[0]
  how = "chosen"
  if name == "auto":
    name = platform_preset(device.platform)
    how = f"auto: backend {device.platform}, {device.device_kind}"
  preset, memory_note = _scaled(PRESETS[name], device_memory_bytes(device))
  sizes = {}
  for key in ("img_chunk", "cap_chunk", "length_group", "img_tile", "cap_tile"):
    sizes[key] = get(key, 0) or getattr(preset, key)
  remat = get("remat", "") or preset.remat
  if not get("by_length", True):
    sizes["length_group"] = 0
  notes = ", ".join(x for x in (how, memory_note) if x)
  reason = (
    f"preset {name} ({notes}; {preset.why}): img_chunk {sizes['img_chunk']}, "
    f"cap_chunk {sizes['cap_chunk']}, remat {remat}, "
    f"length groups {sizes['length_group'] or 'off'}, eval tiles "
    f"{sizes['img_tile']}x{sizes['cap_tile']}, matmul precision {precision}"
  )
  if preset.compile_effort:
    reason += f", XLA compile effort {preset.compile_effort:g}"
  return Execution(
    preset=name, remat=remat, matmul_precision=precision, reason=reason,
    compile_effort=preset.compile_effort, **sizes,
  )  # fmt: skip


def _accelerator_on_machine() -> str | None:
  """ "an NVIDIA GPU" or "a TPU" when the machine has one, whatever jax uses."""
  import glob
  import shutil

  if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
    return "an NVIDIA GPU"
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return "a TPU"
  return None


def cpu_fallback_warning(exec_cfg=None, backend: str | None = None) -> str | None:
  """A warning when the run is on jax's CPU backend although the machine has an
  accelerator or the config asks for an accelerator preset; None otherwise."""
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return None
  preset = "auto" if exec_cfg is None else exec_cfg.get("preset", "auto")
  found = _accelerator_on_machine()
  if not found and preset not in ("gpu", "tpu"):
    return None
  why = f"this machine has {found}" if found else f"execution.preset={preset!r}"
  return (
    f"warning: jax runs on the CPU although {why}; the CPU-only jaxlib is "
    "installed. Install the accelerator build: pip install -e '.[cuda]' "
    "(NVIDIA) or pip install -e '.[tpu]' (TPU VM); see README 'On a GPU or TPU'"
  )
