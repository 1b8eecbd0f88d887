"""XLA settings for the test process and for the processes tests start.

Tests compile many tiny programs and run each only a few times, so compiling
is most of their time. Without LLVM optimisation a tiny train step compiles
two to three times faster; what the tests check does not depend on how fast
the compiled code runs. (Adding --xla_cpu_use_fusion_emitters=false compiles
faster still, but then the summed and the plain train step of test_loop.py
stop agreeing bit for bit.)

    subprocess.run([...], env=xla_env.subprocess_env(devices=2))
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def flags(devices: int) -> str:
  """XLA_FLAGS for `devices` fake CPU devices, compiling fast."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment for a child on `devices` CPU devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags(devices), **extra)
