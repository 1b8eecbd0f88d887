"""A run killed with SIGKILL while orbax writes a checkpoint resumes unaided.

The main command runs in a subprocess that saves after every step; it is
killed as soon as a half-written `*.orbax-checkpoint-tmp*` folder appears next
to a complete one. Rerunning the same command must resume from that complete
step and end with exactly the parameters of an uninterrupted run.
"""

import os
import re
import signal
import subprocess
import sys
import time

import chex
import pytest
import xla_env

from srem_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"
ATTEMPTS = 6
pytestmark = pytest.mark.slow  # the main job in a subprocess, several times
ENV = xla_env.subprocess_env()


def command(data_dir, workdir):
  """The tiny run of tests/test_main.py, saving after every step."""
  overrides = {
    "data.raw_dir": data_dir,
    "data.synthetic.num_train": 24,
    "data.synthetic.num_dev": 10,
    "data.synthetic.num_test": 10,
    "data.synthetic.num_regions": 4,
    "data.synthetic.feature_dim": 16,
    "data.synthetic.num_concepts": 12,
    "model.img_dim": 16,
    "model.embed_dim": 16,
    "model.word_dim": 8,
    "model.sim_dim": 8,
    "mesh.data": 1,
    "train.batch_size": 16,
    "train.epochs": 2,
    "train.warmup_epochs": 1,
    "train.lr_decay_epochs": 1,
    "train.steps_per_epoch": 4,
    "train.log_every_steps": 2,
    "train.checkpoint_every_steps": 1,
    "eval.batch_size": 16,
    "execution.img_tile": 8,
    "execution.cap_tile": 16,
  }
  return [
    sys.executable,
    "-m",
    "srem_jax.main",
    f"--config={os.path.join(REPO, 'configs', 'demo.py')}",
    *[f"--config.{k}={v}" for k, v in overrides.items()],
    f"--workdir={workdir}",
  ]


def run_to_end(data_dir, workdir):
  result = subprocess.run(
    command(data_dir, workdir),
    cwd=REPO,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def checkpoint_folders(workdir):
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else []
  complete = sorted(int(n) for n in names if n.isdigit())
  return complete, [n for n in names if TMP_MARK in n]


def kill_during_a_save(data_dir, workdir, log_path):
  """SIGKILLs the run while a save is half written; returns the complete steps.

  Returns None when the run got past every save without being caught.
  """
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      command(data_dir, workdir), cwd=REPO, env=ENV, stdout=log, stderr=log
    )
    try:
      while proc.poll() is None:
        complete, partial = checkpoint_folders(workdir)
        if complete and partial:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
          break
        time.sleep(0.001)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if proc.returncode != -signal.SIGKILL:
    return None
  complete, partial = checkpoint_folders(workdir)
  # The kill landed only if the half-written folder outlived the process.
  return complete if complete and partial else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  run_to_end(data_dir, workdir)
  return workdir


def test_kill_during_save_resumes_from_last_complete_checkpoint(
  uninterrupted, data_dir, tmp_path
):
  for attempt in range(ATTEMPTS):
    workdir = str(tmp_path / f"attempt{attempt}")
    complete = kill_during_a_save(data_dir, workdir, tmp_path / f"log{attempt}")
    if complete is not None:
      break
  else:
    pytest.fail(f"no SIGKILL landed during a save in {ATTEMPTS} runs")

  stdout = run_to_end(data_dir, workdir)
  resumed = re.search(r"resumed at step (\d+)", stdout)
  assert resumed, stdout
  assert int(resumed.group(1)) == complete[-1]
  assert checkpoint_folders(workdir)[1] == []  # the partial save was cleaned up
  final, _ = checkpoint.load_variables(os.path.join(workdir, "checkpoints"))
  reference, _ = checkpoint.load_variables(os.path.join(uninterrupted, "checkpoints"))
  chex.assert_trees_all_equal(final, reference)
