"""Entry points turn user mistakes into one line, exit 2, and write nothing."""

import os
import subprocess
import sys

import pytest
import xla_env

from srem_jax import config_checks
from srem_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd):
  return subprocess.run(
    [sys.executable, "-m", "srem_jax.main", *args],
    cwd=cwd,
    env=xla_env.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


def assert_one_line_error(result, *fragments):
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: ")
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
  "override, fragments",
  [
    ("--config.train.nope=1", ("train.nope", "configs/base.py")),
    ("--config.nope.deeper=1", ("nope.deeper",)),
    ("--config.train.lr=abc", ("train.lr",)),
  ],
)
def test_bad_override_is_one_line(tmp_path, override, fragments):
  workdir = tmp_path / "run"
  cfg = os.path.join(REPO, "configs", "demo.py")
  result = run_main(f"--config={cfg}", override, f"--workdir={workdir}", cwd=tmp_path)
  assert_one_line_error(result, *fragments)
  assert not workdir.exists()


def test_missing_config_file(tmp_path):
  result = run_main("--config=nowhere/cfg.py", cwd=tmp_path)
  assert_one_line_error(result, "nowhere/cfg.py")


def test_missing_features_say_where_and_what(tmp_path):
  workdir = tmp_path / "run"
  cfg = os.path.join(REPO, "configs", "flickr.py")
  result = run_main(
    f"--config={cfg}",
    f"--config.data.raw_dir={tmp_path}/nothing",
    f"--workdir={workdir}",
    cwd=tmp_path,
  )
  assert_one_line_error(result, f"{tmp_path}/nothing", "_ims.npy", "configs/demo.py")
  assert not workdir.exists()


def test_invalid_value_named_before_any_write(tmp_path):
  workdir = tmp_path / "run"
  cfg = os.path.join(REPO, "configs", "demo.py")
  result = run_main(
    f"--config={cfg}",
    "--config.noise.protocol=pairs",
    f"--workdir={workdir}",
    cwd=tmp_path,
  )
  assert_one_line_error(result, "noise.protocol", "caption", "image")
  assert not workdir.exists()


def _demo_config():
  sys.path.insert(0, REPO)
  from configs import demo

  return demo.get_config()


@pytest.mark.parametrize(
  "key, value, fragment",
  [
    ("noise.ratio", 1.0, "noise.ratio"),
    ("noise.ratio", -0.1, "noise.ratio"),
    ("loss.name", "vse", "loss.name"),
    ("loss.eps", 1.0, "loss.eps"),
    ("loss.tau", 0.0, "loss.tau"),
    ("loss.beta", 1.5, "loss.beta"),
    ("loss.selection", "gmm", "loss.selection"),
    ("model.head", "sgraf", "model.head"),
    ("train.epochs", 0, "train.epochs"),
  ],
)
def test_validate_names_the_key(key, value, fragment):
  config = _demo_config()
  section, field = key.split(".")
  with config.unlocked():
    config[section][field] = value
  with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
    config_checks.validate(config, num_devices=8)


def test_validate_batch_divisible_by_devices():
  config = _demo_config()
  config.train.batch_size = 100
  with pytest.raises(UserError, match="train.batch_size=100.*3 devices"):
    config_checks.validate(config, num_devices=3)
  config_checks.validate(config, num_devices=4)


def test_validate_accepts_shipped_configs():
  sys.path.insert(0, REPO)
  from configs import cc152k, coco, demo, flickr

  for module in (flickr, coco, cc152k, demo):
    config_checks.validate(module.get_config(), num_devices=8)
