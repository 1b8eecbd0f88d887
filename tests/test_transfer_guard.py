"""`main` and `evaluate` with `JAX_TRANSFER_GUARD=disallow` for the whole process.

big_vision runs its trainers so; every host<->device copy must then be an
explicit `jax.device_put` / `jax.device_get` (or happen inside `jit`). The
guard only turns an implicit copy into an error, so a run that completes
computes what an unguarded run computes; `evaluate` then reproduces its test.
"""

import json
import os
import subprocess
import sys

import pytest
import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Three subprocesses of a tiny run, each compiling its own functions.
pytestmark = pytest.mark.slow

TINY = [
  f"--config={REPO}/configs/demo.py",
  "--config.data.synthetic.num_train=24",
  "--config.data.synthetic.num_dev=10",
  "--config.data.synthetic.num_test=10",
  "--config.data.synthetic.num_regions=4",
  "--config.data.synthetic.feature_dim=16",
  "--config.data.synthetic.num_concepts=12",
  "--config.model.img_dim=16",
  "--config.model.embed_dim=16",
  "--config.model.word_dim=8",
  "--config.model.sim_dim=8",
  "--config.mesh.data=1",
  "--config.train.batch_size=16",
  "--config.train.epochs=2",
  "--config.train.warmup_epochs=1",
  "--config.train.lr_decay_epochs=1",
  "--config.eval.batch_size=16",
]


def _run(module, args, guard="disallow"):
  env = xla_env.subprocess_env(JAX_TRANSFER_GUARD=guard)
  result = subprocess.run(
    [sys.executable, "-m", module, *TINY, *args],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]


def test_main_and_evaluate_under_a_process_wide_transfer_guard(tmp_path):
  data = f"--config.data.raw_dir={tmp_path / 'data'}"
  guarded = tmp_path / "guarded"
  _run("srem_jax.main", [data, f"--workdir={guarded}"])
  test = json.loads((guarded / "results.json").read_text())["test"]
  # The guard changes no number: an unguarded run of the same command.
  unguarded = tmp_path / "unguarded"
  _run("srem_jax.main", [data, f"--workdir={unguarded}"], guard="allow")
  assert json.loads((unguarded / "results.json").read_text())["test"] == test
  evaluated = tmp_path / "eval"
  _run("srem_jax.evaluate", [data, f"--checkpoint={guarded}", f"--workdir={evaluated}"])
  again = json.loads((evaluated / "results.json").read_text())
  for key, value in test.items():
    assert again[key] == pytest.approx(value, abs=1e-9), key
