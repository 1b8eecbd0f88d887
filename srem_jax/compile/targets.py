"""The accelerators a run can be compiled for without them (`srem_jax.aot`).

Owns `TARGETS`: for each target name (h100, h200, v5e-1, v5e-8, v4-8) the
chips, their memory and what a run may allocate of it, the peak matmul rate
per matmul dtype and precision and the memory bandwidth (for a roofline
time), and how to obtain jax devices standing for them (`Target.devices`):
a TPU topology by name (needs libtpu, the `tpu` extra) or a GPU described by
an XLA `GpuTargetConfig` text (needs the CUDA 12 plugin, `gpu_target_config`).
Nothing here imports an accelerator library until `devices` is called.

    target = TARGETS["v5e-8"]
    devices = target.devices()  # 8 "TPU v5 lite" devices to build a Mesh on
    seconds = target.roofline(flops, bytes_accessed, "float32", "highest")
"""

import dataclasses

GIB = 1024**3

# ---- NVIDIA: GpuTargetConfig texts ------------------------------------------
#
# The numbers are those of XLA's own descriptions of these cards,
# openxla/xla xla/backends/gpu/target_config/specs/h100_sxm.txtpb and
# h200.txtpb (2026), kept to the fields the pinned jaxlib (0.10.2) parses:
# `collective_memory_granularity`, newer than it, is left out. H100 SXM and
# H200 are the same GH100 chip (132 SMs, same clocks and rate tables); they
# differ in memory size and bandwidth.

_GH100 = dict(
  threads_per_block_limit=1024,
  threads_per_warp=32,
  shared_memory_per_block=49152,
  shared_memory_per_core=233472,
  threads_per_core_limit=2048,
  core_count=132,
  fpus_per_core=128,
  block_dim_limit_x=2147483647,
  block_dim_limit_y=65535,
  block_dim_limit_z=65535,
  l2_cache_size=52428800,
  clock_rate_ghz=1.98,
  shared_memory_per_block_optin=232448,
  registers_per_core_limit=65536,
  registers_per_block_limit=65536,
  thread_dim_limit_x=1024,
  thread_dim_limit_y=1024,
  thread_dim_limit_z=64,
  device_vendor="NVIDIA Corporation",
  platform_version="Compute Capability 9.0a",
  device_address_bits=64,
  pcie_bandwidth=34359738368,
  ecc_enabled=True,
  driver_version="13.0.0",
  runtime_version="12.8.0",
  compile_time_toolkit_version="12.8.0",
  dnn_version="9.10.0",
  cub_version="3.1.2",
)
# Per XLA element type (its PrimitiveType number: 2 s8, 4 s32, 6 u8, 8 u32,
# 10 f16, 11 f32, 12 f64, 16 bf16, 19 and higher the f8/f4 types): clock
# (GHz), units per SM, operations per clock per unit. XLA's cost model reads
# these; the matrix f32 row is TF32 on the tensor cores.
_GH100_SCALAR = {
  4: (1.98, 64, 1),
  8: (1.98, 64, 1),
  10: (1.98, 128, 2),
  11: (1.98, 128, 1),
  12: (1.98, 64, 1),
  16: (1.98, 128, 2),
}
_TC_CLOCK = 1.8295201
_GH100_MATRIX = {
  2: (_TC_CLOCK, 4, 1024),
  6: (_TC_CLOCK, 4, 1024),
  10: (_TC_CLOCK, 4, 512),
  11: (_TC_CLOCK, 4, 256),
  12: (1.98, 4, 32),
  16: (_TC_CLOCK, 4, 512),
  **{key: (_TC_CLOCK, 4, 1024) for key in (19, 20, 23, 24, 25, 28, 29, 33, 35, 36)},
}


def _field(name, value, indent) -> str:
  pad = " " * indent
  if isinstance(value, bool):
    return f"{pad}{name}: {'true' if value else 'false'}"
  if isinstance(value, str):
    return f'{pad}{name}: "{value}"'
  return f"{pad}{name}: {value}"


def _rates(name, table) -> list[str]:
  lines = [f"  {name} {{"]
  for key, (clock, units, ops) in table.items():
    lines += [
      "    rate_infos {",
      f"      key: {key}",
      f"      value {{ clock_rate_ghz: {clock} units_per_core: {units} "
      f"ops_per_clock: {ops} }}",
      "    }",
    ]
  return lines + ["  }"]


def gpu_target_config(
  name: str, memory_bytes: int, bandwidth: int, dnn=(9, 10, 0)
) -> str:
  """A GpuTargetConfig text for a GH100 card (compute capability 9.0a)."""
  lines = ["gpu_device_info {"]
  lines += [_field(k, v, 2) for k, v in _GH100.items()]
  lines += [
    _field("memory_bandwidth", bandwidth, 2),
    _field("device_memory_size", memory_bytes, 2),
    _field("name", name, 2),
    "  cuda_compute_capability { major: 9 feature_extension: ACCELERATED_FEATURES }",
    "  device_interconnect_info { active_links: 18 }",
  ]
  lines += _rates("scalar_unit_description", _GH100_SCALAR)
  lines += _rates("matrix_unit_description", _GH100_MATRIX)
  lines += [
    "}",
    'platform_name: "CUDA"',
    f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}",
    f'device_description_str: "{name}"',
  ]
  return "\n".join(lines) + "\n"


# ---- targets ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str  # "cuda" or "tpu": the PJRT plugin that compiles for it
  chips: int  # devices of the mesh
  device_kind: str
  memory_bytes: int  # per chip
  usable: float  # share of `memory_bytes` a run may allocate (see `budget_bytes`)
  bandwidth: float  # memory bytes/s per chip
  peak_flops: dict  # matmul FLOP/s per chip by "dtype/precision"
  topology: str  # TPU topology name; "1x1x1" for one GPU
  chips_per_host_bounds: tuple = (1, 1, 1)
  chip_config: str = "default"  # TPU: "megacore" fuses a v4 chip's two cores
  gpu_config: str = ""  # GpuTargetConfig text (GPUs)

  @property
  def budget_bytes(self) -> int:
    return int(self.memory_bytes * self.usable)

  def peak(self, dtype: str, precision: str) -> float:
    key = "bfloat16" if dtype == "bfloat16" else f"float32/{precision}"
    return self.peak_flops[key]

  def roofline(self, flops, bytes_accessed, dtype, precision) -> float:
    """Seconds a program of this cost needs at least: compute or memory bound."""
    return max(flops / self.peak(dtype, precision), bytes_accessed / self.bandwidth)

  def extra(self) -> str:
    return "cuda" if self.platform == "cuda" else "tpu"

  def devices(self) -> list:
    """jax devices standing for the target's chips (compile-only)."""
    from jax.experimental import topologies

    if self.platform == "cuda":
      topology = topologies.get_topology_desc(
        self.name, "cuda", target_config=self.gpu_config, topology=self.topology
      )
    else:
      topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=self.topology,
        chip_config_name=self.chip_config,
        chips_per_host_bounds=self.chips_per_host_bounds,
        num_slices=1,
        wrap=(False, False, False),
      )
    devices = list(topology.devices)
    if len(devices) != self.chips:
      raise RuntimeError(f"{self.name}: expected {self.chips} devices, got {devices}")
    return devices


def _nvidia(peak_fp32, peak_tf32, peak_bf16) -> dict:
  # matmul_precision "highest" keeps float32 on the CUDA cores (no TF32);
  # "high" and "default" let cuBLAS use TF32 tensor cores.
  return {
    "float32/highest": peak_fp32,
    "float32/high": peak_tf32,
    "float32/default": peak_tf32,
    "bfloat16": peak_bf16,
  }


def _tpu(peak_bf16) -> dict:
  # The MXU multiplies bfloat16; XLA computes a float32 matmul at precision
  # "highest" as 6 bfloat16 passes, at "high" as 3, at "default" as 1.
  return {
    "float32/highest": peak_bf16 / 6,
    "float32/high": peak_bf16 / 3,
    "float32/default": peak_bf16,
    "bfloat16": peak_bf16,
  }


# jax's GPU allocator takes 75% of the memory by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); a TPU program may use all of its HBM.
_GPU_USABLE, _TPU_USABLE = 0.75, 1.0

TARGETS = {
  # NVIDIA H100 SXM5 80 GB datasheet: FP32 67 TFLOPS, TF32 495 and BF16 989
  # TFLOPS dense (half the "with sparsity" figures), HBM3 3.35 TB/s. Memory:
  # XLA's h100_sxm spec (84942979072 bytes, what the card reports).
  "h100": Target(
    name="h100",
    platform="cuda",
    chips=1,
    device_kind="NVIDIA H100 80GB HBM3",
    memory_bytes=84942979072,
    usable=_GPU_USABLE,
    bandwidth=3.35e12,
    peak_flops=_nvidia(67e12, 494.7e12, 989.4e12),
    topology="1x1x1",
    gpu_config=gpu_target_config("NVIDIA H100 80GB HBM3", 84942979072, 3352320000000),
  ),
  # NVIDIA H200 SXM 141 GB datasheet: the H100 SXM's compute (FP32 67, TF32
  # 495, BF16 989 TFLOPS dense), HBM3e 4.8 TB/s. Memory: XLA's h200 spec.
  "h200": Target(
    name="h200",
    platform="cuda",
    chips=1,
    device_kind="NVIDIA H200 141GB HBM3e",
    memory_bytes=151397597184,
    usable=_GPU_USABLE,
    bandwidth=4.8e12,
    peak_flops=_nvidia(67e12, 494.7e12, 989.4e12),
    topology="1x1x1",
    gpu_config=gpu_target_config(
      "NVIDIA H200 141GB HBM3e", 151397597184, 4800000000000
    ),
  ),
  # Google Cloud TPU v5e (cloud.google.com/tpu/docs/v5e): 197 TFLOPS bf16
  # per chip, 16 GB HBM2 at 819 GB/s; v5litepod-1 is one chip, -8 a 2x4 slice.
  "v5e-1": Target(
    name="v5e-1",
    platform="tpu",
    chips=1,
    device_kind="TPU v5 lite",
    memory_bytes=16 * GIB,
    usable=_TPU_USABLE,
    bandwidth=819e9,
    peak_flops=_tpu(197e12),
    topology="v5e:1x1",
  ),
  "v5e-8": Target(
    name="v5e-8",
    platform="tpu",
    chips=8,
    device_kind="TPU v5 lite",
    memory_bytes=16 * GIB,
    usable=_TPU_USABLE,
    bandwidth=819e9,
    peak_flops=_tpu(197e12),
    topology="v5e:2x4",
    chips_per_host_bounds=(2, 2, 1),
  ),
  # Google Cloud TPU v4 (cloud.google.com/tpu/docs/v4): 275 TFLOPS bf16 per
  # chip, 32 GiB HBM2 at 1,200 GB/s; v4-8 is 4 chips in a 2x2x1 slice, each
  # one jax device (its two TensorCores as one megacore), as on the VM.
  "v4-8": Target(
    name="v4-8",
    platform="tpu",
    chips=4,
    device_kind="TPU v4",
    memory_bytes=32 * GIB,
    usable=_TPU_USABLE,
    bandwidth=1.2e12,
    peak_flops=_tpu(275e12),
    topology="v4:2x2x1",
    chips_per_host_bounds=(2, 2, 1),
    chip_config="megacore",
  ),
}
