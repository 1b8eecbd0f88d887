"""Load a script of benchmarks/ (a folder of scripts, not a package) as a module."""

import importlib.util
import pathlib
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# Scripts import each other by name (`import bench`), as when run from there.
if str(BENCHMARKS) not in sys.path:
  sys.path.append(str(BENCHMARKS))


def load_benchmark(name: str):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
