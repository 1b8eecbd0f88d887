"""The README and docs/ match the code: config reference, overrides, commands,
links."""

import glob
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base  # noqa: E402


def read(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


README = read("README.md")
CONFIG_DOC = read("docs/configuration.md")
# Every page a reader reaches from the README, with its path.
PAGES = {
  path: read(path)
  for path in ["README.md"]
  + sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
  )
}


def flat_defaults(config, prefix=""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from flat_defaults(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def documented_fields(markdown):
  """{key: default text} from the rows `| `key` | `default` | meaning |`."""
  return dict(re.findall(r"^\| `([a-z_][\w.]*)` \| `([^`]*)` \|", markdown, re.M))


def test_configuration_reference_lists_exactly_the_config_fields():
  fields = dict(flat_defaults(base.get_config()))
  documented = documented_fields(CONFIG_DOC)
  missing = sorted(set(fields) - set(documented))
  extra = sorted(set(documented) - set(fields))
  assert not missing, f"config fields missing from docs/configuration.md: {missing}"
  assert not extra, f"docs/configuration.md documents fields not in the config: {extra}"
  for key, value in fields.items():
    assert eval(documented[key]) == value, (key, documented[key], value)


def test_every_override_in_the_docs_names_a_real_field():
  keys = dict(flat_defaults(base.get_config()))
  for path, text in PAGES.items():
    for key in re.findall(r"--config\.([a-z_][\w.]*)=", text):
      assert key in keys, f"{path} shows --config.{key}, which is not a field"


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


def test_readme_is_a_front_door():
  assert len(README.splitlines()) <= 200, "README.md: move detail into docs/"
  begin = README.index("<!-- demo-results:begin -->")
  assert begin < README.index("<!-- demo-results:end -->")


def test_documented_modules_exist():
  for path, text in PAGES.items():
    for module in re.findall(r"python -m (srem_jax[\w.]*)", text):
      # `python -m` runs a module file or a package's __main__.py.
      target = os.path.join(REPO, *module.split("."))
      runnable = os.path.isfile(target + ".py") or os.path.isfile(
        os.path.join(target, "__main__.py")
      )
      assert runnable, (path, module)
    for script in re.findall(r"`(launch/[\w.]+)`", text):
      assert os.path.isfile(os.path.join(REPO, script)), (path, script)


def test_relative_links_resolve():
  for path, text in PAGES.items():
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      file = target.split("#")[0]
      resolved = os.path.join(REPO, os.path.dirname(path), file)
      assert os.path.exists(resolved), f"{path} links to {target}, which is missing"
