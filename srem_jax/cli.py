"""Command-line plumbing shared by every entry point.

Owns: loading `--config` files (`configs` is an installed package, so a
variant's `from configs import base` works from any directory),
turning flag and config mistakes into one clear line, and running a main
function so that a `UserError` exits with status 2 and no traceback.

    _CONFIG = cli.define_config_flag()
    if __name__ == "__main__":
      cli.run(main)
"""

import importlib.util
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from srem_jax.errors import UserError


def define_config_flag():
  return config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/flickr.py; override fields with --config.a.b=v.",
    lock_config=True,
  )


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_file(path: str):
  spec = importlib.util.spec_from_file_location("_srem_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _explain_flag_error(argv: list[str], err: Exception) -> str:
  """Names the override that failed, the field it addressed and what exists."""
  path = _config_path(argv)
  if path is None:
    return f"{err}"
  if not os.path.isfile(path):
    return f"--config: no such file {path!r} (expected e.g. configs/flickr.py)"
  try:
    config = _load_config_file(path)
  except Exception as load_err:  # the user's config file itself is broken
    return f"--config={path}: could not load it: {type(load_err).__name__}: {load_err}"
  for arg in argv:
    match = re.match(r"--config\.([\w.]+)(=.*)?$", arg)
    if not match:
      continue
    node = config
    keys = match.group(1).split(".")
    for depth, key in enumerate(keys):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(keys[:depth]) or "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else ""
        return (
          f"unknown config key {'.'.join(keys)!r} in {arg!r}: {where} has no "
          f"field {key!r} (fields: {known}); see configs/base.py"
        )
      node = node[key]
  return re.sub(r"\s+", " ", str(err)).strip()


def run(main: Callable[[list[str]], None]) -> None:
  """Runs `main` under absl with clear one-line errors for user mistakes."""

  def parse(argv):
    try:
      remaining = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as err:
      fail(_explain_flag_error(argv, err))
    # config_flags defers a load failure to the first use of the config.
    if "config" in flags.FLAGS and type(flags.FLAGS["config"].value).__name__ == (
      "_ErrorConfig"
    ):
      fail(_explain_flag_error(argv, RuntimeError("could not load --config")))
    return remaining

  def guarded_main(argv):
    logging.set_verbosity(logging.WARNING)
    try:
      main(argv)
    except UserError as err:
      fail(str(err))
    except KeyboardInterrupt:
      fail("interrupted")

  app.run(guarded_main, flags_parser=parse)
