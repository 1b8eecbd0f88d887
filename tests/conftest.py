"""Shared test setup: 8 fake CPU devices and parsed absl flags.

XLA_FLAGS must be set before jax initialises, so this runs before any test
module imports jax.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Make `configs` importable the way `python -m srem_jax.main` sees it from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
