"""The README matches the code: config table, overrides, commands."""

import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base  # noqa: E402

README = open(os.path.join(REPO, "README.md")).read()


def flat_defaults(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from flat_defaults(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def test_every_config_field_is_documented_with_its_default():
  for key, value in flat_defaults(base.get_config()):
    row = re.search(rf"^\| `{re.escape(key)}` \| `([^`]*)` \|", README, re.M)
    assert row, f"config field {key} missing from the README reference"
    assert eval(row.group(1)) == value, (key, row.group(1), value)


def test_every_override_in_the_readme_names_a_real_field():
  config = base.get_config()
  keys = dict(flat_defaults(config))
  for key in re.findall(r"--config\.([a-z_][\w.]*)=", README):
    assert key in keys, f"README shows --config.{key}, which is not a field"


def test_quick_start_is_setup_test_demo():
  block = README.split("<!-- quickstart:begin -->")[1].split("<!-- quickstart:end -->")[
    0
  ]
  commands = [
    line for line in block.splitlines() if line and not line.startswith(("```", "#"))
  ]
  assert commands[0] == "pip install -e '.[test]'"
  assert commands[1] == "pytest"
  assert commands[2].startswith("python -m srem_jax.main --config=configs/demo.py")
  assert README.index("<!-- quickstart:begin -->") < README.index("## Commands")


def test_documented_modules_exist():
  for module in re.findall(r"python -m (srem_jax[\w.]*)", README):
    # `python -m` runs a module file or a package's __main__.py.
    path = os.path.join(REPO, *module.split("."))
    runnable = os.path.isfile(path + ".py") or os.path.isfile(
      os.path.join(path, "__main__.py")
    )
    assert runnable, module
  for script in re.findall(r"`(launch/[\w.]+)`", README):
    assert os.path.isfile(os.path.join(REPO, script)), script
