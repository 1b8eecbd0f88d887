"""Shared test setup: 8 fake CPU devices compiling fast, parsed absl flags, a cache.

XLA_FLAGS must be set before jax initialises, so this runs before any test
module imports jax.
"""

import atexit
import os
import shutil
import sys
import tempfile

import xla_env

os.environ.setdefault("XLA_FLAGS", xla_env.flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Make `configs` importable the way `python -m srem_jax.main` sees it from the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The end-to-end tests train the same tiny model many times, each run jitting
# fresh step closures; a persistent cache for this session compiles each
# program once (three runs of tests/test_main.py: 75 s -> 47 s). In-process
# only: subprocesses started by tests compile for themselves, so concurrent
# processes never share cache files.
_CACHE = tempfile.mkdtemp(prefix="srem_jax_tests_xla_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
